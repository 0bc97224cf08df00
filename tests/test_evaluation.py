"""Eval statistics (Wilson intervals, results files) and the dtype a policy is evaluated and trained in."""

import json

import pytest
import torch

from trainer.evaluation import TaskResults, wilson_interval, write_results
from vla_actor import load_policy, make_tiny_checkpoint, resolve_dtype
from vla_actor.checkpoint import TRAINING_DTYPE_KEY


@pytest.mark.parametrize("successes, episodes, expected", [
    (0, 10, (0.0, 0.27753)),     # upper bound z^2 / (n + z^2)
    (10, 10, (0.72247, 1.0)),
    (5, 10, (0.23659, 0.76341)),  # 0.5 +- 1.96 sqrt(0.025 + 0.0096) / 1.38415
    (19, 40, (0.32935, 0.62503)),  # center 0.523018 / 1.096037, half 1.96 * 0.0826717 / 1.096037
])
def test_wilson_interval_matches_hand_computed_bounds(successes, episodes, expected):
    low, high = wilson_interval(successes, episodes)
    assert low == pytest.approx(expected[0], abs=1e-5) and high == pytest.approx(expected[1], abs=1e-5)


def test_results_and_metrics_carry_intervals_per_task_and_the_dtype(tmp_path):
    results = TaskResults(successes={0: 5, 3: 0}, episodes={0: 10, 3: 10})
    metrics = results.metrics("eval")
    assert metrics["eval/success_rate"] == 0.25 and metrics["eval/episodes"] == 20
    assert metrics["eval/task_3/success_rate_ci95_high"] == pytest.approx(0.27753, abs=1e-5)
    assert metrics["eval/success_rate_ci95_low"] == pytest.approx(wilson_interval(5, 20)[0])
    config = {"temperature": None, "protocol": "heldout", "env": {"task_suite": "libero_spatial"},
              "model": {"checkpoint": "c", "adapter": None}}
    write_results(tmp_path, results, {0: "task zero", 3: "task three"}, config, "float32")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dtype"] == "float32" and saved["overall"]["ci95"] == list(wilson_interval(5, 20))
    assert saved["tasks"][1]["ci95"][0] == 0.0
    assert "computed in float32" in (tmp_path / "results.md").read_text()


def test_auto_dtype_follows_the_dtype_the_checkpoint_was_trained_in(checkpoint, tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # resolve_dtype only reads config.json
    assert resolve_dtype("auto", checkpoint, cpu) == torch.float32
    assert resolve_dtype("bfloat16", checkpoint, cpu) == torch.bfloat16
    released = make_tiny_checkpoint(tmp_path / "released-style", dtype=torch.bfloat16)
    assert resolve_dtype("auto", released, cuda) == torch.bfloat16  # no training_dtype: the stored dtype
    # a float32-trained policy shipped in bfloat16 records float32, and auto computes it in float32 on CUDA
    policy = load_policy(checkpoint, dtype=torch.float32)
    export = policy.merge_and_export(tmp_path / "export", storage_dtype=torch.bfloat16)
    config = json.loads((export / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config[TRAINING_DTYPE_KEY] == "float32"
    assert resolve_dtype("auto", export, cuda) == torch.float32
    reloaded = load_policy(export, dtype=torch.float32)
    original = dict(policy.model.named_parameters())
    for name, weight in reloaded.model.named_parameters():
        assert torch.equal(weight, original[name].to(torch.bfloat16).float()), name
