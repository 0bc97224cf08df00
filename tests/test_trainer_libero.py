"""The trainer on real LIBERO (libero_spatial, software rendering): `make train`'s demo end to end, and an env
worker killed in the middle of an episode (its group is dropped as a unit and refilled)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from OpenVLA_GRPO import GRPOTrainer, parse_command
from trainer.checkpoint import ADAPTER_DIR, CHECKPOINTS
from trainer.rollout import collect_groups

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
pytestmark = [pytest.mark.slow, pytest.mark.libero]


def test_demo_writes_logs_checkpoint_plot_and_video(tmp_path):
    """`make train` with its defaults (the shipped SFT end with a fresh LoRA adapter), on a short horizon."""
    result = subprocess.run([sys.executable, str(REPO / "OpenVLA_GRPO.py"), "demo", "--output-dir", str(tmp_path),
                             "--run-name", "demo", "--iterations", "2", "--eval-every", "2",
                             "--eval-episodes-per-task", "1", "--max-steps", "16", "--no-progress"],
                            env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "demo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert all(row["rollout/episodes"] == 4 and row["rollout/episode_length"] <= 16 for row in rows[1:])
    assert rows[-1]["eval/success_rate"] is not None and "train/loss" in rows[-1]
    assert rows[-1]["perf/env_worker_physics_seconds"] > 0 and rows[-1]["perf/env_worker_render_seconds"] > 0
    assert (run / CHECKPOINTS / "iter_000002" / ADAPTER_DIR / "adapter_config.json").is_file()
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    videos = list((run / "videos").glob("iter000002_task00_*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000
    assert f"run finished: {run}" in result.stdout


class WorkerKiller:
    """The real policy; just before its `crash_at`-th query, env 0's simulator worker is killed (SIGKILL)."""

    def __init__(self, policy, env, crash_at: int) -> None:
        self.policy, self.env, self.crash_at, self.queries = policy, env, crash_at, 0

    def sample(self, *args, **kwargs):
        self.queries += 1
        if self.queries == self.crash_at:
            os.kill(self.env.worker_pids[0], signal.SIGKILL)
        return self.policy.sample(*args, **kwargs)


def test_lost_episode_drops_its_group_and_dynamic_sampling_refills(checkpoint, tmp_path):
    config = parse_command(["demo", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path), "--max-steps", "6",
                            "--no-progress"])
    trainer = GRPOTrainer(config)
    first_worker = trainer.env.worker_pids[0]
    policy = WorkerKiller(trainer.policy, trainer.env, crash_at=3)
    batch, counts = collect_groups(trainer.env, policy, trainer.sampler, trainer.inputs, group_size=2,
                                   groups_per_iteration=1, temperature=1.6, dynamic_sampling=True,
                                   max_refill_rounds=1)
    replaced = trainer.env.worker_pids[0]
    trainer.close()
    assert counts["lost_episodes"] == 1 and counts["groups_lost"] == 1
    assert counts["refill_rounds"] == 1 and counts["groups_played"] == 2  # the lost group was replaced
    assert counts["episodes"] == 4 and replaced != first_worker
    # the refilled group is kept only if its two rewards differ; the lost one never is
    assert batch.num_episodes == 2 * counts["groups_kept"] and not batch.lost.any()
    assert np.array_equal(np.bincount(batch.step_episode, minlength=batch.num_episodes), batch.lengths)
