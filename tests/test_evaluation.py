"""Eval statistics (Wilson intervals, results files) and the dtype a policy is evaluated and trained in."""

import json

import pytest
import torch

from trainer.evaluation import TaskResults, compare_evals, paired_comparison, wilson_interval, write_results
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


def episodes(successes: list[bool], scene: int = 7) -> list[dict]:
    return [{"task_id": i % 2, "init_index": i, "scene": scene, "success": ok} for i, ok in enumerate(successes)]


def test_paired_comparison_matches_hand_computed_mcnemar_and_agresti_min():
    # 20 episodes: 5 solved by both, 2 only before, 8 only after, 5 by neither
    before = [True] * 7 + [False] * 13
    after = [True] * 5 + [False] * 2 + [True] * 8 + [False] * 5
    c = paired_comparison(episodes(before), episodes(after))
    assert (c["episodes"], c["only_before"], c["only_after"]) == (20, 2, 8)
    assert c["success_before"] == 0.35 and c["success_after"] == 0.65 and c["difference"] == pytest.approx(0.30)
    assert c["mcnemar_p"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 2 P(X <= 2), X ~ Bin(10, 1/2)
    # cells + 1/2: 2.5 and 8.5 of 22; 6 / 22 +- 1.96 sqrt(11 - 36 / 22) / 22
    assert c["difference_ci95"] == pytest.approx([0.27273 - 0.27262, 0.27273 + 0.27262], abs=1e-4)
    same = paired_comparison(episodes(before), episodes(before))
    assert same["mcnemar_p"] == 1.0 and same["difference"] == 0.0
    with pytest.raises(ValueError, match="did not play the same episodes"):
        paired_comparison(episodes(before), episodes(after, scene=0))


def test_results_record_each_episode_and_two_evals_compare(tmp_path):
    config = {"temperature": None, "protocol": "heldout", "env": {"task_suite": "libero_spatial"},
              "model": {"checkpoint": "c", "adapter": None}}
    for name, outcomes in (("a", [True, False, False, False]), ("b", [True, True, True, False])):
        results = TaskResults(successes={0: 1 + (name == "b"), 1: name == "b"}, episodes={0: 2, 1: 2},
                              outcomes=tuple((e["task_id"], e["init_index"], 7, e["success"])
                                             for e in episodes(outcomes)))
        (tmp_path / name).mkdir()
        write_results(tmp_path / name, results, {0: "zero", 1: "one"}, config, "float32")
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["episodes"][1] == {"task_id": 1, "init_index": 1, "scene": 7, "success": False}
    line = compare_evals(tmp_path / "a", tmp_path / "b" / "results.json")
    assert line.startswith("success 0.250 -> 0.750 on the same 4 episodes: +0.500") and "p = 0.5" in line
    del saved["episodes"]
    (tmp_path / "a" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="no per-episode outcomes"):
        compare_evals(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="holds no results.json"):
        compare_evals(tmp_path / "missing", tmp_path / "b")


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
