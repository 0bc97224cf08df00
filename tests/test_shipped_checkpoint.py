"""Both ends of the seed shipped in assets/ (BENCHMARKS.md, "Several seeds"): the SFT start, a small OFT policy in
the released layout, and GRPO's result, a LoRA adapter for it. They stay small, load, and still solve held-out
LIBERO episodes on the CPU at their recorded rates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import SHIPPED_GRPO_ADAPTER, SHIPPED_SFT
from vla_actor import load_policy

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "bench" / "results" / "libero_learning.json"
AGREEMENT_SLACK = 1
"""Episodes whose outcome may differ from the recorded eval's. The 12 are batched with other partners than in the
100-episode eval, and another CPU rounds differently; either can flip an episode decided by a hair (on the CPU
machine all 12 agreed for both ends, twice: 2 and 5 successes). With one, a weak end that lost its 2 successes
fails."""


def test_both_shipped_ends_load_as_one_small_oft_policy_and_its_adapter():
    sizes = [sum(path.stat().st_size for path in directory.iterdir())
             for directory in (SHIPPED_SFT, SHIPPED_GRPO_ADAPTER)]
    assert sizes[0] < 26_000_000 and sizes[1] < 2_500_000  # they travel to the GPU machine in 64 MiB with LIBERO
    policy = load_policy(SHIPPED_SFT)
    assert policy.is_oft and policy.num_images == 2 and policy.uses_proprio
    assert policy.dtype == torch.float32 and policy.unnorm_key == "libero_spatial"
    assert sum(p.numel() for p in policy.model.parameters()) == 11_788_084
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    policy.load_adapter(SHIPPED_GRPO_ADAPTER)
    trainable = {name for name, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".vision" in name or "featurizer" in name for name in trainable)  # the ViTs are adapted too
    frozen = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
              for name, p in policy.model.named_parameters() if "lora_" not in name}
    assert all(torch.equal(frozen[name], value) for name, value in before.items())


@pytest.mark.slow(seconds=140)
@pytest.mark.libero
@pytest.mark.parametrize("end", ["sft", "grpo"])
def test_shipped_ends_solve_heldout_episodes_at_their_recorded_rates(end, tmp_path):
    """Greedy success on the first 3 of the seed's held-out init states of tasks 0-3 (12 episodes) stays at or
    above the end's recorded 100-episode held-out success on this machine kind minus two binomial standard
    deviations for 12 episodes, and the 12 outcomes are those of the same episodes in the recorded eval, but for
    at most AGREEMENT_SLACK: that half also checks an end as weak as the SFT start, whose rate floor is below 0."""
    shipped = json.loads(RECORDED.read_text())["shipped"]
    recorded = shipped["cpu_check"][f"heldout_success_{end}"]
    episodes = 12
    floor = recorded - 2 * (recorded * (1 - recorded) / episodes) ** 0.5
    adapter = ["--adapter", str(SHIPPED_GRPO_ADAPTER)] if end == "grpo" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    result = subprocess.run([sys.executable, str(REPO / "OpenVLA_GRPO.py"), "eval", "--checkpoint", str(SHIPPED_SFT),
                             *adapter, "--task-suite", "libero_spatial", "--task-ids", "0", "1", "2", "3",
                             "--num-heldout", str(shipped["num_heldout"]), "--protocol", "heldout",
                             "--trials-per-task", str(episodes // 4),
                             "--num-envs", "2", "--num-videos", "0",
                             "--output-dir", str(tmp_path), "--run-name", end, "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / end / "results.json").read_text())
    overall = results["overall"]
    assert overall["episodes"] == episodes
    assert overall["success_rate"] >= floor, (overall, recorded, floor)
    recorded_outcomes = {tuple(episode[:3]): episode[3] for episode in shipped["cpu_check"][f"heldout_episodes_{end}"]}
    differ = [episode for episode in results["episodes"] if
              recorded_outcomes[episode["task_id"], episode["init_index"], episode["scene"]] != episode["success"]]
    assert len(differ) <= AGREEMENT_SLACK, differ
