"""GRPO learns: the tiny look-alike VLA, trained on the one-step toy task from random weights, goes from chance to
>= 80 % greedy success on 40 held-out toy instances (the run of bench/bench_toy_learning.py, a few CPU minutes)."""

import pytest

from bench.bench_toy_learning import toy_learning

pytestmark = pytest.mark.slow


def test_grpo_lifts_heldout_toy_success_from_chance_to_80_percent():
    result = toy_learning()
    assert result["success_before"] <= 0.30
    assert result["success_after"] >= 0.80, result["eval_success_by_iteration"]
