"""GRPO learns: the tiny look-alike VLA, trained on the one-step toy task from random weights, goes from chance to
well above it on 40 held-out toy instances in every run (the runs of bench/bench_toy_learning.py, two seeds in
processes side by side, ~6-7 minutes on 2 cores).

How far above depends on the CPU's float rounding, which changes the trajectory after ~5 iterations: the two
seeds have ended between 0.475 and 0.85 on different machines (docs/experiments.md), so the test asserts what holds
on all of them, and BENCHMARKS.md records the current curves."""

import pytest

from bench.bench_toy_learning import toy_learning_seeds

pytestmark = pytest.mark.slow(seconds=500)
LEARNED = 0.45
"""18 of 40 held-out instances: P(>= 18 | chance 25 %) = 0.5 %."""


def test_grpo_lifts_heldout_toy_success_from_chance():
    runs = toy_learning_seeds()
    curves = {run["seed"]: run["eval_success_by_iteration"] for run in runs}
    assert all(run["success_before"] <= 0.30 for run in runs), curves
    assert all(run["success_after"] >= LEARNED for run in runs), curves
