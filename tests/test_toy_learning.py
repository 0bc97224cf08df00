"""GRPO learns: the tiny look-alike VLA, trained on the one-step toy task from random weights, goes from chance to
well above it on 40 held-out toy instances in every run, and to >= 80 % greedy success in at least one of two
seeds (the runs of bench/bench_toy_learning.py, two processes side by side, ~17 minutes on 2 cores).

One seed's outcome at 60 iterations depends on the CPU's float rounding: on one machine seed 0 reached 0.95, on
another it stayed at 0.5 with every group all-success or all-fail (BENCHMARKS.md), so one run cannot carry the
80 % claim on every machine."""

import pytest

from bench.bench_toy_learning import toy_learning_seeds

pytestmark = pytest.mark.slow
LEARNED = 0.45
"""18 of 40 held-out instances: P(>= 18 | chance 25 %) = 0.5 %."""


def test_grpo_lifts_heldout_toy_success_from_chance():
    runs = toy_learning_seeds()
    curves = {run["seed"]: run["eval_success_by_iteration"] for run in runs}
    assert all(run["success_before"] <= 0.30 for run in runs), curves
    assert all(run["success_after"] >= LEARNED for run in runs), curves
    assert max(run["success_after"] for run in runs) >= 0.80, curves
