"""The small-VLA experiment on real LIBERO: scripted demos -> a small VLA trained from scratch by SFT -> GRPO, with
greedy success on held-out and training init states before and after GRPO.

Run from the repository root (on a GPU machine without network, LIBERO and its assets travel as a bundle of the
pure-Python packages plus a mujoco wheel; then the same command):

    python -m scripts.libero_learning --work-dir runs/libero_learning --tasks 0 1 2 3 --workers 16

Stages, each skipped when its output is complete and resumed from its own files otherwise, so the same command
continues after a stop, here or on another machine:
  demos      python -m scripts.collect_demos collect (training init states only)
  init       python -m scripts.make_small_vla (random weights, the demos' statistics)
  sft        python OpenVLA_GRPO.py sft --finetune full (resumable; --max-seconds for machines lent in slices of time)
  eval_sft   the SFT model cast to bfloat16 in 15 MB shards (the form that ships), then
             python OpenVLA_GRPO.py eval --protocol heldout / train on it, and --protocol train --temperature T
             (success with actions sampled as GRPO's rollouts sample them: the signal GRPO starts from)
  grpo       python OpenVLA_GRPO.py train --finetune full from the bfloat16 SFT model the evals measured (periodic
             held-out eval = the learning curve), then its last checkpoint exported the same way (with
             --grpo-finetune lora: a LoRA adapter trains on that model and its float32 copy is the export); with
             --min-start-success, the sampled eval comes first and a start too weak to learn from stops the run
  eval_grpo  the same evals of that export (an adapter on the SFT model)
  record     --result-json, the curve PNG and the before/after videos under --media-dir
With --heldout-evals grpo the held-out success before and after GRPO is GRPO's own held-out eval at its first and
last iteration, so no eval stage plays the held-out episodes again and one command on the training machine records
a seed (scripts/libero_seeds.py).
Every command it runs is printed, so each stage can be reproduced by hand.

Across machines: once sft_export (or a GRPO export) exists, the demos and the SFT run are no longer read.
`--until grpo` runs only SFT (if needed) and GRPO, e.g. on the GPU machine with sft_export brought along; bring back
the work directory (`python -m scripts.transfer pack` there, `unpack` here: the exports whole, with their .pt files,
and the runs' metrics), and the same command without --until evaluates and records here. Carried to another machine,
grpo<N>_export lets `--until grpo` continue GRPO in grpo_from<N>/ (fresh optimizer state). stage_devices.json says
where each stage ran.
"""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

from libero_env.suites import NUM_INIT_STATES, init_state_split
from trainer.checkpoint import (ADAPTER_DIR, MODEL_DIR, checkpoint_dirs, checkpoint_iteration, latest_checkpoint,
                                write_json)
from trainer.errors import one_line_errors, traceback_requested
from trainer.evaluation import paired_comparison, run_eval_dir
from trainer.metrics import read_metrics
from trainer.plot import plot_metrics
from vla_actor import load_policy
from vla_actor.checkpoint import CONFIG_FILE, atomic_directory
from vla_actor.policy import ADAPTER_CONFIG_FILE, checkpoint_dtype, resolve_dtype

TIMINGS_FILE = "stage_seconds.json"
DEVICES_FILE = "stage_devices.json"
CONTINUED_RUN_PREFIX = "grpo_from"
NOT_RECIPE = ("work_dir", "seed", "workers", "gpus", "loader_workers", "eval_videos", "result_json", "media_dir",
              "until")
"""Experiment fields that say where or how fast a seed runs, not what it learns: left out of its `recipe`."""


@dataclass
class Experiment:
    """Demos -> SFT from scratch -> GRPO on real LIBERO, resumable stage by stage."""

    work_dir: Path = Path("runs/libero_learning")
    """Everything of the experiment lives here; re-running the command continues it."""
    suite: str = "libero_spatial"
    """LIBERO suite (the scripted expert handles libero_spatial)."""
    tasks: tuple[int, ...] = (0, 1, 2, 3)
    """Task ids of the suite used for demos, training and evaluation."""
    seed: int = 0
    """Seed of the whole experiment: which training init states are demonstrated (0: the first demos_per_task of
    them, as the recorded single-seed runs; s > 0: demos_per_task drawn with numpy's default_rng(s)), and the seeds
    of SFT and of GRPO. Independent seeds need their own --work-dir."""
    num_heldout: int = 10
    """Init states per task held out of demos and training (libero_env.init_state_split); every held-out eval plays
    all of them: 25 with 4 tasks gives 100 episodes per eval."""
    demos_per_task: int = 20
    """Expert demos per task, from the first training init states (held-out ones are never demonstrated)."""
    workers: int = 16
    """Simulator processes for demos, evals and GRPO rollouts (one per core)."""
    gpus: int = 1
    """GPUs for GRPO, data parallel under torchrun: each takes 1/gpus of the workers, the groups and the
    mini-batch, so the update is the one of a single process with all the groups, in less time."""
    sft_steps: int = 3000
    """SFT optimizer steps (batch sft_batch_size, cosine schedule, image augmentation)."""
    sft_batch_size: int = 64
    """SFT samples per step."""
    sft_lr: float = 3e-4
    """SFT peak learning rate (from scratch)."""
    grpo_iterations: int = 15
    """GRPO iterations (each: group_size x groups rollouts, one PPO epoch)."""
    grpo_lr: float = 3e-5
    """GRPO learning rate."""
    grpo_finetune: Literal["full", "lora"] = "full"
    """full: GRPO trains every weight and its result is a whole model (24 MB in bfloat16 for the default size);
    lora: GRPO trains a LoRA adapter on the SFT model (--lora-* flags through extra_grpo) and its result is that
    adapter, evaluated as `--checkpoint sft_export --adapter grpo<N>_export`, so the SFT start and the GRPO result
    ship together in little more than the room of one model."""
    group_size: int = 8
    """G rollouts per (task, init state)."""
    groups: int = 8
    """Groups per iteration."""
    temperature: float = 1.0
    """Rollout sampling temperature (also of the sampled evals)."""
    ppo_epochs: int = 1
    """GRPO passes over each iteration's rollouts."""
    mini_batch_size: int = 256
    """GRPO policy steps per optimizer step (an iteration of 64 episodes holds ~1,000-1,500 steps)."""
    eval_every: int = 5
    """GRPO iterations between held-out evals (the learning curve)."""
    min_start_success: float = 0.0
    """Before GRPO starts from the SFT model, the SFT model's success with actions sampled at the rollout temperature
    on the training init states (the sampled eval) must reach this, or the run stops with that measurement instead
    of spending GPU time on groups without signal; 0: no check (a start at 2 % learned nothing in 6 iterations)."""
    train_eval_per_task: int = 10
    """Training init states per task in the train-split evals."""
    max_steps: int | None = None
    """Override the suite's policy-step horizon in evals and GRPO (short smoke runs only); None: the suite's."""
    train_evals: bool = True
    """Also evaluate greedily on the training init states (train_eval_per_task per task), before and after GRPO: how
    GRPO does on what it trains on. The seed records (scripts/libero_seeds.py) need only the held-out evals, and
    leaving these out saves two evals per seed."""
    sampled_evals: bool = True
    """Also evaluate the training init states with actions sampled at the rollout temperature, before and after
    GRPO (what GRPO optimises; greedy success is what it is judged by)."""
    heldout_evals: Literal["separate", "grpo"] = "separate"
    """Where the held-out success before and after GRPO comes from. separate: eval stages of sft_export and of the
    GRPO export (as shipped, on whichever machine runs them); grpo: GRPO's own held-out evals at its first and last
    iteration (the same episodes and scenes, the model it trains in the dtype it trains in, on the machine that
    trains it, at no extra cost); a GRPO run continued from an export plays other scenes, so it needs separate."""
    eval_videos: bool = True
    """Write one MP4 per task in the held-out evals, which the before/after videos come from (needs
    imageio-ffmpeg, which the GPU machine's image lacks: the start check's sampled eval runs there)."""
    loader_workers: int = 12
    """SFT data-loading processes (JPEG decoding and augmentation)."""
    extra_sft: str = ""
    """More flags for the sft command, as one string (e.g. "--max-seconds 500")."""
    extra_grpo: str = ""
    """More flags for the train command, as one string."""
    result_json: Path = Path("runs/libero_learning/record.json")
    """Where the record stage writes this run's record (a seed's, which scripts/libero_seeds.py combines into the
    top level of bench/results/libero_learning.json)."""
    media_dir: Path = Path("runs/libero_learning/media")
    """Where the record stage writes the curve PNG and the before/after videos."""
    until: Literal["eval_sft", "grpo", "all"] = "all"
    """Stop after this stage; eval_sft, then copies of work_dir, start several GRPO runs from one SFT model.
    grpo: SFT if needed, then GRPO and its export, without any eval (the GPU part; bring back grpo<N>_export and
    the runs' metrics.jsonl, and the same command without --until evaluates and records them; with grpo<N>_export
    carried to another machine it continues GRPO from there)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_start_success <= 1:
            raise ValueError(f"--min-start-success {self.min_start_success:g} is not a success rate: give one in "
                             "[0, 1] (0: no start check)")
        if self.heldout_evals == "grpo" and self.eval_every < 1:
            raise ValueError(f"--heldout-evals grpo reads GRPO's own held-out evals, which --eval-every "
                             f"{self.eval_every} turns off: give --eval-every >= 1 or --heldout-evals separate")
        if self.gpus < 1:
            raise ValueError(f"--gpus {self.gpus}: GRPO needs at least one GPU (1 also means the CPU)")
        split = {"--workers": self.workers, "--groups": self.groups, "--mini-batch-size": self.mini_batch_size}
        uneven = [f"{flag} {value}" for flag, value in split.items() if value % self.gpus]
        if uneven:
            raise ValueError(f"--gpus {self.gpus} must divide {', '.join(uneven)}: each GPU takes an equal share of "
                             "the simulator processes, groups and mini-batch")


def run(command: list[str], stage: str, work_dir: Path) -> None:
    """Runs one stage's command; its wall time is added to work_dir/stage_seconds.json (over all invocations) and
    the machine it ran on to work_dir/stage_devices.json."""
    print("+ " + shlex.join(command), flush=True)
    started = time.monotonic()
    try:
        subprocess.run(command, check=True)
    finally:
        timings = read_json(work_dir / TIMINGS_FILE)
        timings[stage] = round(timings.get(stage, 0.0) + time.monotonic() - started, 1)
        write_json(work_dir / TIMINGS_FILE, timings)
        devices = read_json(work_dir / DEVICES_FILE)
        devices[stage] = sorted({*devices.get(stage, []), device_name()})
        write_json(work_dir / DEVICES_FILE, devices)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def env_flags(ex: Experiment, num_envs: int | None = None) -> list[str]:
    horizon = [] if ex.max_steps is None else ["--max-steps", str(ex.max_steps)]
    return ["--task-suite", ex.suite, "--task-ids", *map(str, ex.tasks), "--num-envs", str(num_envs or ex.workers),
            "--num-heldout", str(ex.num_heldout), *horizon]


def demo_init_states(ex: Experiment) -> list[int]:
    """The training init states each task is demonstrated from (see Experiment.seed)."""
    train, _ = init_state_split(NUM_INIT_STATES, ex.num_heldout)
    if ex.seed == 0:
        return train[:ex.demos_per_task]
    return sorted(np.random.default_rng(ex.seed).choice(train, ex.demos_per_task, replace=False).tolist())


def grpo_seed(ex: Experiment, start: int) -> int:
    """GRPO's --seed: distinct for every experiment seed and for every run that continues from an export at
    iteration `start`."""
    return ex.seed * 100_000 + start


EvalKind = Literal["heldout", "train", "sampled"]
"""Greedy on the held-out or the training init states, or sampled at the rollout temperature on the training ones."""


def eval_protocols(ex: Experiment) -> tuple[EvalKind, ...]:
    """The eval stages before and after GRPO: held-out unless GRPO's own evals give it, the training init states as
    asked."""
    return (*(("heldout",) if ex.heldout_evals == "separate" else ()), *(("train",) if ex.train_evals else ()),
            *(("sampled",) if ex.sampled_evals else ()))


def evaluate(ex: Experiment, name: str, model: Path, protocol: EvalKind) -> Path:
    """Evaluates `model` (sft_export or a GRPO export, see model_flags) once, a finished eval being read back, and
    returns its results.json."""
    results = ex.work_dir / name / "results.json"
    if not results.is_file():
        shutil.rmtree(ex.work_dir / name, ignore_errors=True)  # an eval cut short is simply played again
        trials = ["--trials-per-task", str(ex.num_heldout if protocol == "heldout" else ex.train_eval_per_task)]
        sampling = ["--temperature", str(ex.temperature)] if protocol == "sampled" else []
        videos = len(ex.tasks) if ex.eval_videos and protocol == "heldout" else 0
        run(python("OpenVLA_GRPO.py", "eval", *model_flags(ex.work_dir / "sft_export", model), *env_flags(ex),
                   "--protocol", "heldout" if protocol == "heldout" else "train", *trials, *sampling,
                   "--num-videos", str(videos), "--output-dir", str(ex.work_dir), "--run-name", name,
                   "--no-progress"), name, ex.work_dir)
    return results


def success_rate(results: Path) -> float:
    return json.loads(results.read_text())["overall"]["success_rate"]


def main(ex: Experiment) -> None:
    ex.work_dir.mkdir(parents=True, exist_ok=True)
    sft_export = ex.work_dir / "sft_export"
    exports = grpo_exports(ex.work_dir)
    has_sft = (sft_export / CONFIG_FILE).is_file()
    if not has_sft and any(map(is_adapter, exports)):
        raise FileNotFoundError(f"{exports[-1]} is a LoRA adapter for {sft_export}, which is missing: bring "
                                "sft_export back together with the GRPO exports")
    if not has_sft and not exports:  # a whole GRPO model needs SFT only to start
        sft_model = supervised_fine_tuning(ex)
        if sft_model is None:
            print("SFT stopped early (--max-seconds in extra_sft); run the same command again to continue")
            return
        export_bfloat16(sft_model, sft_export)
    protocols = eval_protocols(ex)
    if ex.until == "grpo":
        reinforcement_learning(ex, sft_export)
        return
    before = {protocol: evaluate(ex, f"eval_sft_{protocol}", sft_export, protocol) for protocol in protocols}
    if ex.until == "eval_sft":
        return
    grpo_export = reinforcement_learning(ex, sft_export)
    done = export_iteration(grpo_export)
    after = {protocol: evaluate(ex, f"eval_grpo{done}_{protocol}", grpo_export, protocol) for protocol in protocols}
    record(ex, before, after)


def supervised_fine_tuning(ex: Experiment) -> Path | None:
    """Demos, the random small VLA and SFT (each resumed); the SFT model, or None if SFT stopped early."""
    demos, init, sft = (ex.work_dir / name for name in ("demos", "init", "sft"))
    tasks = ",".join(map(str, ex.tasks))
    states = ",".join(map(str, demo_init_states(ex)))
    run(python("-m", "scripts.collect_demos", "collect", "--out-dir", str(demos), "--suite", ex.suite, "--tasks", tasks,
               "--init-states", states, "--workers", str(ex.workers)), "demos", ex.work_dir)
    if not (init / "config.json").is_file():
        shutil.rmtree(init, ignore_errors=True)
        run(python("-m", "scripts.make_small_vla", "--output-dir", str(init), "--demos", str(demos)), "init",
            ex.work_dir)
    sft_model = sft / "model"
    if not (sft_model / "config.json").is_file():
        run(python("OpenVLA_GRPO.py", "sft", "--checkpoint", str(init), "--demos", str(demos), "--output-dir",
                   str(sft), "--finetune", "full", "--dtype", "float32", "--no-gradient-checkpointing",
                   "--batch-size", str(ex.sft_batch_size), "--steps", str(ex.sft_steps), "--lr", str(ex.sft_lr),
                   "--lr-schedule", "cosine", "--warmup-steps", "200", "--image-aug",
                   "--loader-workers", str(ex.loader_workers), "--save-every", "500", "--log-every", "100",
                   "--seed", str(ex.seed),
                   "--resume", *shlex.split(ex.extra_sft)), "sft", ex.work_dir)
    return sft_model if (sft_model / "config.json").is_file() else None


def reinforcement_learning(ex: Experiment, sft_export: Path) -> Path:
    """GRPO from the bfloat16 SFT model that the evals measure, resumed from its checkpoints; returns the export of
    its last checkpoint, grpo<N>_export after N iterations in all: the whole model in bfloat16, or with
    grpo_finetune lora the adapter (for sft_export).

    Without checkpoints but with an export, GRPO ran on another machine and grpo<N>_export (with the runs'
    metrics.jsonl) was brought back. Then that export is GRPO's result, unless `until` is grpo and fewer than
    grpo_iterations are done: a new run grpo_from<N>/ continues from the export (fresh optimizer state, seed N),
    so GRPO goes on across machines from which only the export comes back."""
    start, run_dir = grpo_runs(ex.work_dir)[-1]
    source = sft_export if start == 0 else grpo_export_dir(ex.work_dir, start)
    brought_back = grpo_exports(ex.work_dir)
    if brought_back and not checkpoint_dirs(run_dir):
        source = brought_back[-1]
        start = export_iteration(source)
        if ex.until != "grpo" or start >= ex.grpo_iterations:
            return source
        run_dir = ex.work_dir / f"{CONTINUED_RUN_PREFIX}{start}"
    if source != sft_export and is_adapter(source) != (ex.grpo_finetune == "lora"):
        raise ValueError(f"{source} is {'a LoRA adapter' if is_adapter(source) else 'a whole model'}, so GRPO cannot "
                         f"continue it with --grpo-finetune {ex.grpo_finetune}: pass --grpo-finetune "
                         f"{'lora' if is_adapter(source) else 'full'}")
    if start + grpo_iterations_done(run_dir) < ex.grpo_iterations:
        resuming = bool(checkpoint_dirs(run_dir))
        if ex.min_start_success > 0 and source == sft_export and not resuming:
            require_learnable_start(ex, sft_export)
        resume = ["--resume", str(run_dir)] if resuming else []
        launcher = (python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ex.gpus))
                    if ex.gpus > 1 else python())
        mini_batch = ex.mini_batch_size // ex.gpus  # sizes per rank (README "Several GPUs")
        run([*launcher, "OpenVLA_GRPO.py", "train", *model_flags(sft_export, source), "--finetune", ex.grpo_finetune,
             "--dtype", "float32", "--no-gradient-checkpointing", *env_flags(ex, ex.workers // ex.gpus),
             "--group-size", str(ex.group_size), "--groups-per-iteration", str(ex.groups // ex.gpus),
             "--temperature", str(ex.temperature), "--lr", str(ex.grpo_lr), "--ppo-epochs", str(ex.ppo_epochs),
             "--mini-batch-size", str(mini_batch), "--micro-batch-size", str(math.gcd(64, mini_batch)),
             "--iterations", str(ex.grpo_iterations - start), "--seed", str(grpo_seed(ex, start)),
             "--eval-every", str(ex.eval_every), "--num-videos", str(grpo_videos(ex)), "--save-every", "1",
             "--keep-last", "1",
             "--output-dir", str(ex.work_dir), "--run-name", run_dir.name, "--no-progress", *resume,
             *shlex.split(ex.extra_grpo)], "grpo", ex.work_dir)
    # Named by iteration: GRPO stopped by --max-seconds and later continued gets fresh final evals.
    done = start + grpo_iterations_done(run_dir)
    latest, export_dir = latest_checkpoint(run_dir), grpo_export_dir(ex.work_dir, done)
    if ex.grpo_finetune == "lora":
        return export_adapter(latest / ADAPTER_DIR, export_dir)
    return export_bfloat16(latest / MODEL_DIR, export_dir)


def grpo_videos(ex: Experiment) -> int:
    """Videos per GRPO eval: one per task when those evals are the before and after, none otherwise."""
    return len(ex.tasks) if ex.heldout_evals == "grpo" and ex.eval_videos else 0


def require_learnable_start(ex: Experiment, sft_export: Path) -> None:
    """Stops before GRPO when the SFT model's sampled success on the training init states is below
    min_start_success: its groups would almost all be all-fail, with no advantage to learn from."""
    results = evaluate(ex, "eval_sft_sampled", sft_export, "sampled")
    rate = success_rate(results)
    if rate < ex.min_start_success:
        raise SystemExit(f"the SFT model succeeds in {rate:.1%} of its sampled episodes on the training init states "
                         f"at temperature {ex.temperature:g} ({results}), below --min-start-success "
                         f"{ex.min_start_success:g}, so GRPO's groups would carry almost no signal: train SFT longer "
                         "(--sft-steps) or on more demos (--demos-per-task), or lower --min-start-success")
    print(f"start check: sampled success {rate:.1%} >= --min-start-success {ex.min_start_success:g}", flush=True)


def grpo_exports(work_dir: Path) -> list[Path]:
    """The complete grpo<N>_export directories (whole models or adapters), by iteration."""
    complete = {path.parent for name in (CONFIG_FILE, ADAPTER_CONFIG_FILE)
                for path in work_dir.glob(f"grpo*_export/{name}")}
    return sorted(complete, key=export_iteration)


def is_adapter(export_dir: Path) -> bool:
    """Whether a GRPO export is a LoRA adapter (to put on sft_export) rather than a whole model."""
    return (export_dir / ADAPTER_CONFIG_FILE).is_file()


def model_flags(sft_export: Path, model: Path) -> list[str]:
    """The eval / train flags that load `model`: sft_export itself, a whole exported model, or sft_export with an
    exported adapter."""
    if is_adapter(model):
        return ["--checkpoint", str(sft_export), "--adapter", str(model)]
    return ["--checkpoint", str(model)]


def grpo_runs(work_dir: Path) -> list[tuple[int, Path]]:
    """GRPO's run directories with the iteration each started from, in order: grpo/ from the SFT model, then each
    grpo_from<N>/ that continued from grpo<N>_export."""
    starts = {path: path.name.removeprefix(CONTINUED_RUN_PREFIX) for path in work_dir.glob(f"{CONTINUED_RUN_PREFIX}*")}
    continued = [(int(start), path) for path, start in starts.items() if path.is_dir() and start.isdigit()]
    return [(0, work_dir / "grpo"), *sorted(continued)]


def grpo_metrics(work_dir: Path) -> list[dict]:
    """The metrics rows of every GRPO run, iterations counted from the SFT model."""
    return [{**row, "iteration": start + row["iteration"]}
            for start, run_dir in grpo_runs(work_dir) for row in read_metrics(run_dir)]


def grpo_export_dir(work_dir: Path, iteration: int) -> Path:
    """Where the bfloat16 export after `iteration` GRPO iterations in all lives (export_iteration reads it back)."""
    return work_dir / f"grpo{iteration}_export"


def export_iteration(export_dir: Path) -> int:
    return int(export_dir.name.removeprefix("grpo").removesuffix("_export"))


def export_bfloat16(model_dir: Path, export_dir: Path) -> Path:
    """The model stored in bfloat16 in shards of at most 15 MB (under the 16 MiB file limit of a machine that returns
    only small files, scripts/transfer.py), with the dtype it was trained in recorded, so that `--dtype auto`
    computes in that dtype again."""
    if not (export_dir / "config.json").is_file():
        shutil.rmtree(export_dir, ignore_errors=True)
        load_policy(model_dir, dtype=checkpoint_dtype(model_dir)).merge_and_export(
            export_dir, max_shard_bytes=15_000_000, storage_dtype=torch.bfloat16)
    return export_dir


def export_adapter(adapter_dir: Path, export_dir: Path) -> Path:
    """A copy of GRPO's adapter as trained (float32: a few MB), written atomically."""
    if not is_adapter(export_dir):
        with atomic_directory(export_dir) as staging:
            shutil.copytree(adapter_dir, staging, dirs_exist_ok=True)
    return export_dir


def grpo_iterations_done(grpo_dir: Path) -> int:
    found = checkpoint_dirs(grpo_dir)
    return checkpoint_iteration(found[-1]) if found else 0


EVALUATED_MODELS = {
    "full": "sft_export and grpo<N>_export, stored in bfloat16 as shipped and computed in the dtype they were trained "
            "in (float32); the learning curve is GRPO's own periodic eval of the model it trains",
    "lora": "sft_export, stored in bfloat16 as shipped and computed in the dtype it was trained in (float32), without "
            "and with GRPO's float32 LoRA adapter grpo<N>_export; the learning curve is GRPO's own periodic eval of "
            "the model it trains",
    "grpo": "GRPO's own held-out evals of the model it trains, at iteration 0 (sft_export, stored in bfloat16 as "
            "shipped, computed in the dtype it was trained in, float32) and at its last iteration (the float32 weights "
            "or adapter it exports); the learning curve is the evals in between"}


@dataclass
class HeldoutEval:
    """One held-out eval of the before / after pair."""

    success_rate: float
    ci95: list[float] | None
    episodes: int
    dtype: str | None
    videos: list[Path]
    """Its videos, named <prefix>_task<t>_init<i>_<success|failure>.mp4."""
    results: Path
    """Its results.json (each episode's outcome in `episodes`, where the eval recorded them)."""


def stage_heldout_eval(results: Path) -> HeldoutEval:
    """An eval stage's results (evaluate)."""
    recorded = json.loads(results.read_text())
    return HeldoutEval(recorded["overall"]["success_rate"], recorded["overall"].get("ci95"),
                       recorded["overall"]["episodes"], recorded.get("dtype"),
                       sorted((results.parent / "videos").glob("*.mp4")), results)


def grpo_heldout_evals(ex: Experiment, rows: list[dict]) -> tuple[HeldoutEval, HeldoutEval]:
    """GRPO's own held-out evals at its first and last iteration (--heldout-evals grpo)."""
    if len(grpo_runs(ex.work_dir)) > 1:
        raise ValueError(f"{ex.work_dir} holds GRPO continued from an export in a new run, whose evals play other "
                         "scenes than the first run's: evaluate before and after with --heldout-evals separate")
    evals = [row for row in rows if "eval/success_rate" in row]
    last = rows[-1]["iteration"] if rows else None
    if not evals or evals[0]["iteration"] != 0 or evals[-1]["iteration"] != last:
        raise ValueError(f"GRPO's metrics in {ex.work_dir / 'grpo'} have held-out evals at iterations "
                         f"{[row['iteration'] for row in evals]}, not at 0 and at its last iteration {last}: run "
                         "GRPO with its start eval (no --no-eval-at-start) or use --heldout-evals separate")
    run_dir = ex.work_dir / "grpo"
    model = json.loads((run_dir / "config.json").read_text())["model"]
    dtype = model["dtype"]
    if dtype == "auto":  # as the trainer resolved it on the machine that ran it
        on_gpu = any(not name.startswith("CPU") for name in read_json(ex.work_dir / DEVICES_FILE).get("grpo", []))
        dtype = str(resolve_dtype("auto", model["checkpoint"], torch.device("cuda" if on_gpu else "cpu")))
    return tuple(HeldoutEval(row["eval/success_rate"],
                             [row["eval/success_rate_ci95_low"], row["eval/success_rate_ci95_high"]],
                             int(row["eval/episodes"]), dtype.removeprefix("torch."),
                             sorted((run_dir / "videos").glob(f"iter{row['iteration']:06d}_*.mp4")),
                             run_eval_dir(run_dir, row["iteration"]) / "results.json")
                 for row in (evals[0], evals[-1]))


def paired_heldout(sft: HeldoutEval, grpo: HeldoutEval) -> dict | None:
    """The before and after held-out evals compared episode by episode (trainer.evaluation.paired_comparison), or
    None where either eval did not record its episodes."""
    episodes = [json.loads(e.results.read_text()).get("episodes") if e.results.is_file() else None
                for e in (sft, grpo)]
    return paired_comparison(*episodes) if all(episodes) else None


def recipe(ex: Experiment) -> dict:
    """What every seed of one experiment shares: the Experiment's settings without NOT_RECIPE, and extra_grpo
    without --max-seconds (a bound on the machine's time, recorded per seed as grpo_iterations)."""
    settings = {name: getattr(ex, name) for name in ex.__dataclass_fields__ if name not in NOT_RECIPE}
    flags = shlex.split(ex.extra_grpo)
    if "--max-seconds" in flags:
        at = flags.index("--max-seconds")
        del flags[at:at + 2]
    settings["extra_grpo"] = shlex.join(flags)
    return {name: list(value) if isinstance(value, tuple) else value for name, value in settings.items()}


def record(ex: Experiment, before: dict[str, Path], after: dict[str, Path]) -> None:
    rows = grpo_metrics(ex.work_dir)
    restarts = [start for start, _ in grpo_runs(ex.work_dir)[1:]]
    timings, devices = read_json(ex.work_dir / TIMINGS_FILE), read_json(ex.work_dir / DEVICES_FILE)
    curve = {str(row["iteration"]): row["eval/success_rate"] for row in rows if "eval/success_rate" in row}
    sft, grpo = (grpo_heldout_evals(ex, rows) if ex.heldout_evals == "grpo"
                 else (stage_heldout_eval(before["heldout"]), stage_heldout_eval(after["heldout"])))
    result = {"suite": ex.suite, "tasks": list(ex.tasks), "seed": ex.seed, "num_heldout": ex.num_heldout,
              "dtype": grpo.dtype, "heldout_success_sft": sft.success_rate,
              "heldout_success_grpo": grpo.success_rate, "heldout_ci95_sft": sft.ci95, "heldout_ci95_grpo": grpo.ci95,
              "heldout_evals": ex.heldout_evals,
              **({"heldout_paired": paired} if (paired := paired_heldout(sft, grpo)) else {}),
              **({"train_success_sft": success_rate(before["train"]),
                  "train_success_grpo": success_rate(after["train"])} if ex.train_evals else {}),
              "episodes_eval": grpo.episodes, "grpo_iterations": rows[-1]["iteration"],
              "heldout_success_by_iteration": curve,
              "rollout_success_by_iteration": {str(row["iteration"]): row["rollout/success_rate"]
                                               for row in rows if "rollout/success_rate" in row},
              **({"rollout_temperature": ex.temperature,
                  "train_success_sft_sampled": success_rate(before["sampled"]),
                  "train_success_grpo_sampled": success_rate(after["sampled"])} if ex.sampled_evals else {}),
              "wall_seconds": round(sum(timings.values()), 1), "stage_seconds": timings,
              "demos_per_task": ex.demos_per_task,
              **({"grpo_continued_at": restarts,
                  "grpo_continued_note": "at these iterations GRPO continued from its bfloat16 export in a new run "
                                         "(fresh optimizer state, seed = the iteration) on a new machine lease"}
                 if restarts else {}),
              "grpo_finetune": ex.grpo_finetune, "recipe": recipe(ex),
              "evaluated_models": EVALUATED_MODELS["grpo" if ex.heldout_evals == "grpo" else ex.grpo_finetune],
              "command": "python -m scripts.libero_learning " + shlex.join(
                  sys.argv[1:]), "device": "; ".join(sorted({name for names in devices.values() for name in names})),
              "stage_devices": devices}
    write_json(ex.result_json, result)
    ex.media_dir.mkdir(parents=True, exist_ok=True)
    title = "GRPO" + (f" (continued from its export at iteration {', '.join(map(str, restarts))})" if restarts else "")
    plot_metrics(rows, title, ex.media_dir / "libero_learning_curves.png")
    pair = before_after_videos(sft.videos, grpo.videos)
    for stage, video in zip(("before", "after"), pair):
        shutil.copyfile(video, ex.media_dir / f"libero_learning_{stage}.mp4")
    print(json.dumps(result, indent=2), flush=True)


def before_after_videos(before_videos: list[Path], after_videos: list[Path]) -> tuple[Path, Path] | tuple[()]:
    """The same held-out episode filmed before and after GRPO: the first one GRPO turned from a failure into a
    success, else the first one filmed in both evals; () when there is none."""
    def by_episode(videos: list[Path]) -> dict[str, Path]:  # <prefix>_task<t>_init<i>_<success|failure>.mp4
        return {video.stem[video.stem.rindex("_task") + 1:].rsplit("_", 1)[0]: video for video in sorted(videos)}
    before, after = by_episode(before_videos), by_episode(after_videos)
    both = [episode for episode in before if episode in after]
    turned = [episode for episode in both
              if before[episode].stem.endswith("_failure") and after[episode].stem.endswith("_success")]
    return next(((before[episode], after[episode]) for episode in turned + both), ())


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    show_traceback, args = traceback_requested(sys.argv[1:])
    with one_line_errors("libero_learning.py", show_traceback):
        main(tyro.cli(Experiment, args=args))
