"""Whole GRPO iterations of the real trainer (`OpenVLA_GRPO.py train`, run as a user runs it) on real LIBERO, under
a GPU memory cap, against a baseline checkout measured in the same run.

On a GPU: random-weight OpenVLA-7B checkpoints in the released layout (the OpenVLA token head, and the OFT token
head with 2 images + proprio) are written once, then each (code version, model) runs `train` for a few iterations
in its own process, capped with torch.cuda.set_per_process_memory_fraction before the trainer starts. Random
weights never succeed, so every group is uninformative: `--no-dynamic-sampling` keeps the groups anyway and the
update runs the forward and backward pass of every played step (zero advantages, same work); `train/steps` equal
to the env steps played is checked. With `--model tiny --task-suite toy` every code path runs on the CPU (the CI
smoke test).

    python -m bench.bench_e2e --baseline-repo .baseline --output bench/results/gpu_7b_e2e.json
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

from bench.bench_gpu import BenchConfig, actions_per_second, build_policy
from trainer.checkpoint import write_json
from trainer.envs import suite_shape
from vla_actor import make_tiny_checkpoint, random_7b_policy
from vla_actor.fused_kernels import fused_kernels_available

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MODELS = {  # name -> (variant, images, proprio, train flags of that model)
    "openvla": ("openvla", 1, False, ("--micro-batch-size", "16")),
    "oft": ("oft", 2, True, ("--micro-batch-size", "8")),
}
LAUNCH = """import sys, torch
cap = float(sys.argv[1])
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / torch.cuda.get_device_properties(0).total_memory))
sys.argv = ["OpenVLA_GRPO.py", *sys.argv[2:]]
sys.path.insert(0, ".")
import runpy
runpy.run_path("OpenVLA_GRPO.py", run_name="__main__")
"""


@dataclass
class E2EConfig:
    """What to run; the defaults are the documented run of BENCHMARKS.md."""

    model: Literal["7b", "tiny"] = "7b"
    """7b: random-weight OpenVLA-7B shapes on CUDA; tiny: look-alike checkpoints on the CPU (smoke test)."""
    models: tuple[Literal["openvla", "oft"], ...] = ("openvla", "oft")
    """Checkpoints to run: openvla (token head, agentview) and oft (2 images + proprio, chunks of 8)."""
    task_suite: str = "libero_spatial"
    """Suite; toy for the CPU smoke test."""
    num_envs: int = 16
    """Env workers (one group of 8 fills 8 of them)."""
    group_size: int = 8
    """Rollouts per group."""
    groups_per_iteration: int = 2
    """Groups per iteration: 2 x 8 = 16 episodes, one per env."""
    max_steps: int | None = None
    """Policy-step horizon; None: the suite's (220 for libero_spatial)."""
    iterations: int = 2
    """Iterations per run; the first is a warm-up (scene builds), the rest are the steady state."""
    mem_cap_gib: float = 24.0
    """Per-process GPU memory cap (the 24 GB card)."""
    baseline_repo: Path | None = None
    """A checkout of the code to compare with (e.g. `git worktree add .baseline main`), run the same way."""
    baseline_flags: tuple[str, ...] = ()
    """Extra train flags of the baseline runs only; each value is split as a shell would, so one value can carry
    several flags (`--baseline-flags="--gradient-checkpointing --micro-batch-size 16"`)."""
    extra_flags: tuple[str, ...] = ()
    """Extra train flags of every run (e.g. --old-log-probs rollout), split as --baseline-flags are."""
    microbench_batch: int = 16
    """Batch of bench_gpu's rollout measurement that the in-training rate is compared with."""
    work_dir: Path | None = None
    """Where checkpoints and runs go (kept, so a later call reuses the checkpoints); None: a temporary one."""
    output: Path = Path("bench/results/gpu_7b_e2e.json")
    """Where the result JSON goes."""


def write_checkpoints(config: E2EConfig, work_dir: Path) -> dict[str, Path]:
    """One checkpoint per model in the released layout, reused when already there."""
    paths = {}
    for name in config.models:
        variant, images, proprio, _ = MODELS[name]
        path = work_dir / f"{config.model}-{name}"
        paths[name] = path
        if (path / "config.json").is_file():
            continue
        if config.model == "tiny":
            make_tiny_checkpoint(path, variant=variant, num_images=images, use_proprio=proprio)
            continue
        torch.manual_seed(0)
        policy = random_7b_policy("cuda", torch.bfloat16, variant=variant, num_images=images, use_proprio=proprio)
        policy.merge_and_export(path)
        del policy
        torch.cuda.empty_cache()
    return paths


def microbench_fused() -> bool:
    """Whether the microbenchmark fuses kernels: where `train` does by default (CUDA with liger-kernel)."""
    return torch.cuda.is_available() and fused_kernels_available()


def microbench(config: E2EConfig, work_dir: Path) -> dict[str, float]:
    """bench_gpu's batched rollout rate of each model at `microbench_batch`, in this process, with the kernels
    `train` uses by default (`microbench_fused`)."""
    rates = {}
    for name in config.models:
        variant, images, proprio, _ = MODELS[name]
        policy = build_policy(BenchConfig(model=config.model, repeats=3), variant, work_dir / "microbench",
                              images, proprio)
        if microbench_fused():
            policy.fuse_kernels()
        rates[name] = actions_per_second(BenchConfig(model=config.model, repeats=3), policy,
                                         config.microbench_batch, np.random.default_rng(0))
        del policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rates


def split_flags(values: tuple[str, ...]) -> tuple[str, ...]:
    """Train flags from --extra-flags / --baseline-flags values, each split as a shell would."""
    return tuple(flag for value in values for flag in shlex.split(value))


def run_trainer(config: E2EConfig, repo: Path, checkpoint: Path, name: str, run_dir: Path,
                flags: tuple[str, ...]) -> list[dict]:
    """`OpenVLA_GRPO.py train` of `repo` in a fresh process; returns its metrics.jsonl rows."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = ["train", "--checkpoint", str(checkpoint), "--task-suite", config.task_suite,
            "--num-envs", str(config.num_envs), "--group-size", str(config.group_size),
            "--groups-per-iteration", str(config.groups_per_iteration), "--iterations", str(config.iterations),
            "--no-dynamic-sampling", "--eval-every", "0", "--no-eval-at-start", "--num-videos", "0",
            "--mini-batch-size", "256", "--ppo-epochs", "1", "--no-progress", "--save-every", "1000",
            "--output-dir", str(run_dir.parent), "--run-name", run_dir.name, *MODELS[name][3], *flags]
    if config.max_steps is not None:
        args += ["--max-steps", str(config.max_steps)]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCH, str(config.mem_cap_gib), *args], cwd=repo, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_e2e: the {name} run of {repo} failed (exit {done.returncode}); its log is above")
    print(f"{name} in {repo}: {time.perf_counter() - started:.0f} s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(rows: list[dict], microbench_rate: float) -> dict:
    """Steady-state figures of a run: its iterations after the first (the first alone if there is one)."""
    steady = rows[1:] or rows
    env_steps = sum(r["rollout/episode_length"] * r["rollout/episodes"] for r in steady)
    seconds = sum(r["perf/iteration_seconds"] for r in steady)
    rollout_seconds = sum(r["perf/rollout_seconds"] for r in steady)
    update_seconds = seconds - rollout_seconds
    trained = sum(r["train/steps"] for r in steady)
    queries = sum(r["rollout/policy_queries"] for r in rows[1:] or rows if "rollout/policy_queries" in r)
    if queries and trained != queries:
        raise SystemExit(f"bench_e2e: the update trained {trained} of {queries} policy steps played: it skipped work")
    rollout_rate = env_steps / rollout_seconds
    # a rollout blocks on its first reset once however many episodes it plays: scaled by episodes, the rest
    first_reset = sum(r.get("perf/rollout_first_reset_seconds", 0.0) for r in steady)
    episodes = sum(r["rollout/episodes"] for r in steady)
    summary = {
        "iterations_measured": len(steady), "env_steps": env_steps,
        "env_steps_per_s": env_steps / seconds, "rollout_actions_per_s": rollout_rate,
        "rollout_share_of_microbench": rollout_rate / microbench_rate, "microbench_actions_per_s": microbench_rate,
        "update_samples_per_s": trained / update_seconds, "rollout_seconds": rollout_seconds,
        "update_seconds": update_seconds, "peak_gib": max(r.get("perf/gpu_memory_gib", 0.0) for r in rows),
        "iteration_seconds_128_episodes_estimate": 128 * (seconds - first_reset) / episodes
        + first_reset / len(steady),
    }
    breakdown = ("perf/rollout_model_seconds", "perf/rollout_env_wait_seconds", "perf/rollout_host_seconds",
                 "perf/rollout_first_reset_seconds")
    if all(key in steady[0] for key in breakdown):
        summary["rollout_breakdown_seconds"] = {key.split("/")[1].removeprefix("rollout_").removesuffix("_seconds"):
                                                sum(r[key] for r in steady) for key in breakdown}
        model_rate = env_steps / summary["rollout_breakdown_seconds"]["model"]  # the simulators' wait left out
        summary.update(rollout_model_actions_per_s=model_rate,
                       rollout_model_share_of_microbench=model_rate / microbench_rate)
    workers = sorted(key for key in steady[0] if key.startswith("perf/env_worker_"))
    if workers:  # mean per simulator: set against env_wait above
        summary["env_worker_seconds"] = {key.removeprefix("perf/env_worker_").removesuffix("_seconds"):
                                         sum(r[key] for r in steady) for key in workers}
    if "train/rollout_logprob_mismatch" in steady[0]:
        summary["rollout_logprob_mismatch"] = float(np.mean([r["train/rollout_logprob_mismatch"] for r in steady]))
    if "train/rollout_logprob_mismatch_max" in steady[0]:
        summary["rollout_logprob_mismatch_max"] = max(r["train/rollout_logprob_mismatch_max"] for r in steady)
    return summary


def main(config: E2EConfig) -> dict:
    if config.model == "7b" and not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py --model 7b needs a CUDA GPU; use --model tiny --task-suite toy on the CPU")
    if torch.cuda.is_available():  # the microbenchmark runs under the trainer runs' cap
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.mem_cap_gib * GIB / total))
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = config.work_dir or Path(scratch)
        work_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = write_checkpoints(config, work_dir)
        rates = microbench(config, work_dir)
        extra_flags, baseline_flags = split_flags(config.extra_flags), split_flags(config.baseline_flags)
        versions = {"": (REPO, extra_flags)}
        if config.baseline_repo is not None:
            versions["_baseline"] = (config.baseline_repo.resolve(), extra_flags + baseline_flags)
        results: dict = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "model": config.model, "task_suite": config.task_suite,
            "mem_cap_gib": config.mem_cap_gib, "num_envs": config.num_envs, "group_size": config.group_size,
            "groups_per_iteration": config.groups_per_iteration, "iterations": config.iterations,
            "max_steps": config.max_steps or suite_shape(config.task_suite).max_steps,
            "extra_flags": list(extra_flags), "baseline_flags": list(baseline_flags),
            "microbench_fused_kernels": microbench_fused(),
            "update_work": "random weights never succeed; --no-dynamic-sampling keeps every group, so the update "
                           "runs forward and backward on every played policy step (zero advantages); checked: "
                           "train/steps == rollout/policy_queries",
        }
        for name in config.models:
            prefix = "" if name == "openvla" else "oft_"
            for suffix, (repo, flags) in versions.items():
                rows = run_trainer(config, repo, checkpoints[name], name, work_dir / "runs" / f"{name}{suffix}",
                                   flags)
                results.update({f"{prefix}{key}{suffix}": value
                                for key, value in summarize(rows, rates[name]).items()})
                config.output.parent.mkdir(parents=True, exist_ok=True)
                write_json(config.output, results)  # after each run: a job cut short keeps what it measured
    for key in sorted(k for k in results if k.removeprefix("oft_").startswith(("env_steps_per_s", "update_samples"))):
        print(f"{key}: {results[key]:.2f}")
    return results


if __name__ == "__main__":
    main(tyro.cli(E2EConfig))
