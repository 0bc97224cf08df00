"""Rollout throughput on real LIBERO, as the trainer plays episodes (trainer.rollout.play_episodes): envs refilled
as soon as their episode ends, each worker keeping its simulator across resets (libero_env.suites.start_episode).
Two baselines in the same run: the same with every reset rebuilding the simulator from the scene XML (LIBERO's
hard reset, as the reference eval's env), and that with lockstep batches of num_envs episodes, where every env waits
for the batch's longest episode (the same function called once per batch). And one candidate: the trainer's way
with --overlap-rollouts (two halves of the envs, one half simulating while the policy samples the other's). On a
CPU the policy and the simulators share the cores, so overlapping them has little to gain there; its case is a GPU
policy (bench_e2e).

Greedy episodes of the shipped policy, each in scene 0 of its (task, init state), so all modes play the very
same episodes (checked: `same_episodes`). Counts env actions per second (policy steps summed over the envs),
including the policy, the image pipeline, resets and scene builds. Writes bench/results/rollout.json.
`worker_busy_fraction` is the share of the wall time the simulator processes spent answering (the rest they waited
for the policy or for the slowest env of a round). A quick check of every mode: --tasks 0 --episodes-per-task 2
--out /tmp/rollout.json. On the GPU machine (bench/gpu_job.sh's rollout stage) the policy runs where the trainer
runs it: --device cuda --num-envs 16 --modes refill_kept refill_kept_overlapped.

    OMP_NUM_THREADS=1 MUJOCO_GL=egl .venv/bin/python -m bench.bench_rollout
"""

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from libero_env import EpisodeSpec, LiberoVectorEnv
from libero_env.suites import init_state_split
from OpenVLA_GRPO import policy_inputs
from trainer.checkpoint import write_json
from trainer.config import SHIPPED_GRPO_ADAPTER, SHIPPED_SFT
from trainer.rollout import Rollouts, play_episodes
from vla_actor import load_policy


MODES = ("lockstep_rebuilt", "refill_rebuilt", "refill_kept", "refill_kept_overlapped")
MODE_SETTINGS = {"lockstep_rebuilt": dict(lockstep=True, rebuild_on_reset=True),
                 "refill_rebuilt": dict(lockstep=False, rebuild_on_reset=True),
                 "refill_kept": dict(lockstep=False, rebuild_on_reset=False),
                 "refill_kept_overlapped": dict(lockstep=False, rebuild_on_reset=False, overlap=True)}


@dataclass
class Args:
    checkpoint: Path = SHIPPED_SFT
    """Policy that plays the episodes (its successes end early, its failures run to the time limit)."""
    adapter: Path | None = SHIPPED_GRPO_ADAPTER
    """LoRA adapter on the checkpoint (default: the shipped GRPO result); None: the checkpoint alone."""
    suite: str = "libero_spatial"
    """LIBERO suite."""
    tasks: tuple[int, ...] = (0, 1, 2, 3)
    """Tasks played."""
    episodes_per_task: int = 3
    """Held-out init states per task."""
    num_envs: int = 2
    """Simulator processes."""
    device: str = "cpu"
    """Where the policy computes (cuda: as the trainer on a GPU machine, with its fixed-batch queries)."""
    modes: tuple[str, ...] = MODES
    """Modes to play, in this order (a subset of the four, e.g. refill_kept refill_kept_overlapped on a GPU)."""
    out: Path = Path("bench/results/rollout.json")
    """Result file, written atomically."""


class CountingEnv:
    """The env, counting its receive_step calls (rounds of policy queries, per half when overlapped)."""

    def __init__(self, env: LiberoVectorEnv) -> None:
        self.env, self.num_envs, self.step_calls = env, env.num_envs, 0

    def reset(self, specs, envs=None, wait=True):
        return self.env.reset(specs, envs, wait)

    def send_step(self, actions, envs=None):
        self.env.send_step(actions, envs)

    def receive_step(self, envs=None):
        self.step_calls += 1
        return self.env.receive_step(envs)

    def frames(self, i):
        return self.env.frames(i)


def play(args: Args, policy, specs: list[EpisodeSpec], lockstep: bool, rebuild_on_reset: bool,
         overlap: bool = False) -> dict:
    inputs = policy_inputs(policy)
    with LiberoVectorEnv(args.suite, num_envs=args.num_envs, rebuild_on_reset=rebuild_on_reset) as vector_env:
        env = CountingEnv(vector_env)
        batches = [specs[i:i + args.num_envs] for i in range(0, len(specs), args.num_envs)] if lockstep else [specs]
        started = time.perf_counter()
        results = [play_episodes(env, policy, batch, np.zeros(len(batch), np.int64), inputs, temperature=1.0,
                                 greedy=True, keep_steps=False, overlap=overlap, fixed_batch=policy.fixed_batch)
                   for batch in batches]
        seconds = time.perf_counter() - started
        worker_busy = vector_env.worker_seconds["answer"] / (args.num_envs * seconds)
    result = Rollouts.concat(results)
    actions = int(result.lengths.sum())
    return {"seconds": round(seconds, 1), "env_actions": actions, "actions_per_second": round(actions / seconds, 2),
            "step_calls": env.step_calls, "episode_lengths": result.lengths.tolist(),
            "success": result.success.tolist(), "model_seconds": round(result.model_seconds, 1),
            "env_seconds": round(result.env_seconds, 1), "worker_busy_fraction": round(worker_busy, 3)}


def main(args: Args) -> None:
    torch.manual_seed(0)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        raise SystemExit(f"bench_rollout: --modes takes some of {' '.join(MODES)}, got {' '.join(args.modes)}")
    policy = load_policy(args.checkpoint, unnorm_key=args.suite, device=args.device, dtype=torch.float32)
    if args.adapter is not None:
        policy.load_adapter(args.adapter)
    _, heldout = init_state_split()
    specs = [EpisodeSpec(task, init) for task in args.tasks for init in heldout[:args.episodes_per_task]]
    modes = {name: play(args, policy, specs, **MODE_SETTINGS[name]) for name in args.modes}
    rate = {name: mode["actions_per_second"] for name, mode in modes.items()}
    first = next(iter(modes.values()))
    speedups = {"speedup_kept_vs_rebuilt": ("refill_kept", "refill_rebuilt"),
                "speedup_refill_vs_lockstep": ("refill_rebuilt", "lockstep_rebuilt"),
                "speedup_vs_lockstep_rebuilt": ("refill_kept", "lockstep_rebuilt"),
                "speedup_overlapped_vs_kept": ("refill_kept_overlapped", "refill_kept")}
    result = {
        "what": "env actions per second of a greedy rollout of the same episodes: envs refilled as each episode ends "
                "with simulators kept across resets (the trainer's way), against refill with every reset rebuilding "
                "the simulator (LIBERO's hard reset) and lockstep batches of num_envs episodes with rebuilding; "
                "and the trainer's way with --overlap-rollouts (step_calls then counts each half's rounds)",
        **{name: round(rate[a] / rate[b], 3) for name, (a, b) in speedups.items() if a in rate and b in rate},
        "same_episodes": all(mode["episode_lengths"] == first["episode_lengths"]
                             and mode["success"] == first["success"] for mode in modes.values()),
        **modes, "episodes": len(specs), "num_envs": args.num_envs,
        "checkpoint": args.checkpoint.name, "adapter": args.adapter.name if args.adapter else None,
        "suite": args.suite, "tasks": list(args.tasks), "device": device_name(args),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["OMP_NUM_THREADS=1 MUJOCO_GL=egl python -m bench.bench_rollout", *sys.argv[1:]]),
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in modes}, indent=2))


def device_name(args: Args) -> str:
    return torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main(tyro.cli(Args))
