"""Checks that turn a config that cannot work into one clear error before any model, env or process starts, and
the resolved plan (run directory, task ids, checkpoint to resume) that the trainer and the eval then trust."""

import importlib.util
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import (ADAPTER_DIR, MODEL_DIR, TRAINER_STATE_FILE, checkpoint_dirs, default_run_name,
                                latest_checkpoint, resolve_adapter)
from trainer.config import DemoConfig, EnvConfig, EvaluateConfig, ModelConfig, TrainConfig, config_to_dict
from trainer.envs import suite_names, suite_shape
from trainer.memory import ModelShape, Prediction, check_fits, checkpoint_shape, detected_card
from trainer.metrics import METRICS_FILE
from vla_actor.checkpoint import CONFIG_FILE, read_json
from vla_actor.policy import ADAPTER_CONFIG_FILE
from vla_actor.quant import check_base_quant

MAY_CHANGE_ON_RESUME = ("iterations", "timesteps", "max_seconds", "eval_every", "eval_at_start",
                        "eval_episodes_per_task", "num_videos", "save_every", "keep_last", "output_dir", "run_name",
                        "use_wandb", "wandb_mode", "wandb_project", "progress", "device", "attn_implementation",
                        "gradient_checkpointing", "cuda_graphs", "compile_layers", "fused_kernels", "num_envs",
                        "overlap_rollouts", "config", "resume", "dry_run")
"""Fields (flags) a resumed run may change: budgets, cadences, outputs and speed settings. Every other field
(model, adapter, LoRA, suite and task ids, algorithm, optimizer, seed) is what the saved optimizer state and random
generators belong to, and must match the run's config.json."""

ADAM_STATES = 2
"""AdamW keeps two moments per trained value (exp_avg, exp_avg_sq), each the size of the trained weights."""
CHECKPOINT_SLACK_BYTES = 16 * 2**20
"""Room for the small files of a checkpoint (scheduler, random generators, JSON) and the filesystem's rounding."""


@dataclass(frozen=True)
class TrainPlan:
    """What `check_train` resolved once for the trainer: where the run writes and what it trains on."""

    run_dir: Path
    """The run directory: new (created only after the model has loaded) or, with --resume, the existing one."""
    task_ids: list[int]
    """The task ids trained and evaluated on (every task of the suite when --task-ids is empty)."""
    resume_from: Path | None
    """The checkpoint directory to continue from; None for a new run."""
    prediction: Prediction | None = None
    """Predicted GPU memory and iteration time (trainer/memory.py), where the model applies."""


@dataclass(frozen=True)
class EvalPlan:
    """What `check_eval` resolved once for the eval."""

    results_dir: Path
    """The new results directory (created only after the model has loaded)."""
    task_ids: list[int]
    """The task ids evaluated."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def what_else_it_is(path: Path) -> str | None:
    """For a directory that our own runs wrote (an adapter, a run, a checkpoint, an SFT output), what it is and the
    flags that use it; None for anything else."""
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return (f"{path} is a LoRA adapter, not a model: pass --adapter {path} and the model it was trained on as "
                f"--checkpoint")
    checkpoint = (checkpoint_dirs(path) or [path])[-1]  # a run's latest checkpoint, else the directory itself
    if (checkpoint / MODEL_DIR / CONFIG_FILE).is_file():
        return f"{path} is not a model but holds one: pass --checkpoint {checkpoint / MODEL_DIR}"
    if (checkpoint / ADAPTER_DIR).is_dir():
        run_dir = path if checkpoint != path else path.parent.parent
        saved = read_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else {}
        base = saved.get("model", {}).get("checkpoint", "the model it was trained on")
        return f"{path} is a LoRA run or checkpoint, not a model: pass --adapter {path} --checkpoint {base}"
    if (path / METRICS_FILE).is_file():
        return f"{path} is a run directory with no model or adapter saved in it: pass a model directory"
    return None


def check_model(model: ModelConfig) -> None:
    path = Path(model.checkpoint).expanduser()
    if path.is_dir() and (instead := what_else_it_is(path)):
        raise ValueError(f"--checkpoint {instead}")
    looks_local = path.exists() or not _HUB_ID.match(model.checkpoint) or Path(path.parts[0]).is_dir()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {model.checkpoint} not found: expected a directory with config.json "
                                f"(REF 1.1) or a hub id such as openvla/openvla-7b-finetuned-libero-spatial; "
                                f"`OpenVLA_GRPO.py demo` builds a tiny local one")
    if model.adapter is not None:
        check_adapter_base(model, resolve_adapter(model.adapter))
    if model.device != "auto":
        try:
            device = torch.device(model.device)
        except RuntimeError as error:
            raise ValueError(f"--device {model.device!r} is not a torch device ({error}); use auto, cpu, cuda or "
                             f"cuda:N") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {model.device}: no CUDA device is visible here; use --device cpu (or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {model.device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn-implementation flash_attention_2 needs the flash-attn package, which is not "
                         "installed: pip install flash-attn (CUDA only), or use --attn-implementation sdpa")
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_base_quant(model.base_quant, auto if model.device == "auto" else torch.device(model.device))
    if model.base_quant_vision and model.base_quant == "none":
        raise ValueError("--base-quant-vision quantizes the ViTs of a quantized base: add --base-quant int8 / nf4 / "
                         "fp8 / fp8-dynamic, or drop --base-quant-vision")


def check_adapter_base(model: ModelConfig, adapter: Path) -> None:
    """An adapter saved by a run (its checkpoint's config.json beside adapter/) was trained on that run's base: one
    quantized differently gives it other log-probs, so the flags must name the same --base-quant."""
    saved_path = adapter.parent / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = flat_fields(read_json(saved_path))
    for name in ("base_quant", "base_quant_vision"):
        if name in saved and saved[name] != getattr(model, name):
            wanted = (flag(name) if saved[name] else "--no-" + flag(name)[2:]) if isinstance(saved[name], bool) \
                else f"{flag(name)} {saved[name]}"
            raise ValueError(f"adapter {adapter} was trained on a base with {flag(name)} = {saved[name]} "
                             f"({saved_path}), given {getattr(model, name)}: pass {wanted}, or merge the adapter into "
                             f"a full checkpoint first to evaluate it on another base")


def check_finetune_base(finetune: str, model: ModelConfig) -> None:
    """A quantized base is frozen: only LoRA adapters train on top of it. Compiled blocks are measured and tested
    with LoRA only (full fine-tuning shards the model with FSDP around them)."""
    if finetune == "full" and model.base_quant != "none":
        raise ValueError(f"--base-quant {model.base_quant} stores a frozen quantized base, which --finetune full "
                         f"would train: use --finetune lora, or --base-quant none")
    if finetune == "full" and model.compile_layers:
        raise ValueError("--compile-layers is for LoRA fine-tuning: use --finetune lora, or drop --compile-layers")


def check_env(env: EnvConfig) -> list[int]:
    """The task ids the config selects (all of the suite when none are given)."""
    if env.task_suite not in suite_names():
        raise ValueError(f"unknown --task-suite {env.task_suite!r}; valid suites: {', '.join(suite_names())}")
    shape = suite_shape(env.task_suite)
    bad = [t for t in env.task_ids if not 0 <= t < shape.num_tasks]
    if bad:
        raise ValueError(f"unknown task id(s) {bad} for {env.task_suite}: valid task ids are 0..{shape.num_tasks - 1}")
    if len(set(env.task_ids)) != len(env.task_ids):
        raise ValueError(f"--task-ids has repeats: {list(env.task_ids)}")
    if env.num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {env.num_envs}")
    if env.max_steps is not None and env.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (or omitted for the suite's {shape.max_steps}), "
                         f"got {env.max_steps}")
    if not 0 < env.num_heldout < shape.num_init_states:
        raise ValueError(f"--num-heldout must be in 1..{shape.num_init_states - 1} ({shape.num_init_states} init "
                         f"states per task), got {env.num_heldout}")
    return list(env.task_ids) or list(range(shape.num_tasks))


def flag(name: str) -> str:
    """The command-line flag of a config field (every field is a flat flag, trainer/config.py)."""
    return "--" + name.replace("_", "-")


def flat_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict as {field name: value}; field names are unique across the nested configs."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flat_fields(value) if isinstance(value, dict) else {key: value})
    return flat


def changed_settings(saved: dict[str, Any], config: Any, may_change: tuple[str, ...]) -> list[str]:
    """"--flag (saved X, given Y)" for every field of `config` that differs from the run's saved config.json
    (`saved`) and is not in `may_change`."""
    saved, given = flat_fields(saved), flat_fields(config_to_dict(config))
    return [f"{flag(name)} (saved {saved[name]!r}, given {value!r})" for name, value in given.items()
            if name in saved and name not in may_change and saved[name] != value]


def check_finite(config: Any) -> None:
    """Refuses a non-finite float (inf, nan) anywhere in the config, naming its flag."""
    for name, value in flat_fields(config_to_dict(config)).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(name)} must be a finite number, got {value}")


def check_output_space(directory: Path, needed_bytes: int, what: str) -> None:
    """`directory` (or, when it does not exist yet, its nearest existing parent) can take a new file and has
    `needed_bytes` free. A probe file is created and removed at once: permission bits alone miss read-only
    mounts, and root ignores them."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {directory} cannot be created: {existing} is a file, not a directory; "
                                 f"choose another --output-dir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"{what} {directory} is not writable ({error.strerror} in {existing}); choose "
                              f"another --output-dir or make {existing} writable") from error
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise OSError(f"{what} {directory} needs about {needed_bytes / 2**30:.2f} GiB free for a checkpoint, but "
                      f"{existing} has {free / 2**30:.2f} GiB free; free space or choose an --output-dir on "
                      f"another disk")


def checkpoint_bytes(trained_values: int, value_bytes: int) -> int:
    """Size of one training checkpoint: the trained weights and AdamW's two moments, plus small files."""
    return trained_values * value_bytes * (1 + ADAM_STATES) + CHECKPOINT_SLACK_BYTES


def estimated_checkpoint_bytes(config: TrainConfig, shape: ModelShape | None) -> int:
    """The next checkpoint's size, from the model's shapes before any weight is read: its LoRA adapters or, with
    full fine-tuning, every weight, as float32 values (an upper bound); 0 for a hub id not downloaded yet (the
    trainer checks again after loading)."""
    if shape is None:
        return 0
    return checkpoint_bytes(shape.frozen_parameters if config.finetune == "full" else shape.lora_parameters, 4)


def check_resume_compatible(config: TrainConfig, checkpoint: Path) -> None:
    """The flags given with --resume against the run's saved config.json and the checkpoint's job size: one
    error listing every field that may not change, before anything is written."""
    saved_path = config.resume / CONFIG_FILE
    changed = changed_settings(read_json(saved_path), config, MAY_CHANGE_ON_RESUME)
    if changed:
        may_change = ", ".join(flag(name) for name in MAY_CHANGE_ON_RESUME if name not in ("resume", "config"))
        raise ValueError(f"--resume {config.resume} cannot change {'; '.join(changed)}: the run was trained with "
                         f"the saved values ({saved_path}). A resumed run may change only {may_change}; start a new "
                         f"run (another --run-name) to change the others")
    state = read_json(checkpoint / TRAINER_STATE_FILE)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if state.get("world_size") != world_size:
        raise ValueError(f"{checkpoint} was written by {state.get('world_size')} ranks, this job has {world_size}; "
                         f"resume with the same number of processes (torchrun --nproc-per-node)")


def check_numbers(config: TrainConfig) -> None:
    """Hyper-parameters out of range, each named by its flag."""
    check_finite(config)
    grpo, optim, lora = config.grpo, config.optim, config.lora
    if grpo.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (advantages compare rollouts of one group), got {grpo.group_size}")
    positive = {"--groups-per-iteration": grpo.groups_per_iteration, "--mini-batch-size": optim.mini_batch_size,
                "--micro-batch-size": optim.micro_batch_size, "--ppo-epochs": optim.ppo_epochs,
                "--temperature": grpo.temperature, "--lr": optim.lr, "--clip-low": grpo.clip_low,
                "--clip-high": grpo.clip_high, "--max-grad-norm": optim.max_grad_norm,
                "--skip-grad-norm": optim.skip_grad_norm, "--timesteps": config.timesteps,
                "--save-every": config.checkpointing.save_every, "--log-ratio-clamp": grpo.log_ratio_clamp,
                "--advantage-clamp": grpo.advantage_clamp, "--lora-rank": lora.lora_rank,
                "--lora-alpha": lora.lora_alpha}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    non_negative = {"--weight-decay": optim.weight_decay, "--warmup-iterations": optim.warmup_iterations,
                    "--kl-coef": grpo.kl_coef, "--entropy-coef": grpo.entropy_coef,
                    "--max-refill-rounds": grpo.max_refill_rounds, "--max-seconds": config.max_seconds,
                    "--keep-last": config.checkpointing.keep_last, "--eval-every": config.evaluation.eval_every,
                    "--num-videos": config.evaluation.num_videos, "--seed": config.seed,
                    "--max-skipped-in-a-row": optim.max_skipped_in_a_row}
    for name, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if optim.lr > 1:
        raise ValueError(f"--lr must be <= 1 (an AdamW step moves each weight by about lr; LIBERO GRPO uses "
                         f"1e-6..1e-4), got {optim.lr}")
    if not 0 <= lora.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {lora.lora_dropout}")
    if optim.mini_batch_size % optim.micro_batch_size:
        divisors = [d for d in range(1, optim.mini_batch_size + 1) if optim.mini_batch_size % d == 0]
        raise ValueError(f"--mini-batch-size {optim.mini_batch_size} is not divisible by --micro-batch-size "
                         f"{optim.micro_batch_size}; valid micro-batch sizes: {divisors}")
    if config.iterations is not None and config.iterations < 1:
        raise ValueError(f"--iterations must be >= 1 (or omitted), got {config.iterations}")


def run_dir_of(config: TrainConfig) -> Path:
    if config.resume is not None:
        return config.resume
    prefix = "demo" if isinstance(config, DemoConfig) else config.env.task_suite
    return config.logging.output_dir / (config.logging.run_name or default_run_name(prefix))


def check_train(config: TrainConfig, rank: int = 0) -> TrainPlan:
    """Raises on the first problem; returns the plan the trainer follows. Nothing is written: only rank 0 writes
    the run directory, so only rank 0 checks that a new one does not exist yet and that it has room."""
    check_model(config.model)
    task_ids = check_env(config.env)
    check_numbers(config)
    per_task = config.evaluation.eval_episodes_per_task
    if per_task is not None and not 1 <= per_task <= config.env.num_heldout:
        raise ValueError(f"--eval-episodes-per-task must be in 1..--num-heldout ({config.env.num_heldout}), got "
                         f"{per_task}")
    check_finetune_base(config.finetune, config.model)
    if config.finetune == "full" and config.grpo.kl_coef > 0:
        raise ValueError(f"--kl-coef {config.grpo.kl_coef} needs the base model, which is the policy with its LoRA "
                         f"adapter disabled; --finetune full has no adapter: use --kl-coef 0 or --finetune lora")
    if config.finetune == "full" and config.model.adapter is not None:
        raise ValueError(f"--adapter {config.model.adapter} is a LoRA adapter and --finetune full trains no adapter: "
                         f"merge it into a full checkpoint first (VLAPolicy.merge_and_export; an SFT run writes one to "
                         f"model/) and pass that as --checkpoint")
    run_dir = run_dir_of(config)
    resume_from = None
    if config.resume is not None:
        resume_from = latest_checkpoint(config.resume)
        expected = MODEL_DIR if config.finetune == "full" else ADAPTER_DIR
        if not (resume_from / expected).is_dir():
            saved = "full" if config.finetune == "lora" else "lora"
            raise ValueError(f"{resume_from} has no {expected}/: the run was trained with --finetune {saved}; "
                             f"resume it with --finetune {saved} (or without --finetune)")
        check_resume_compatible(config, resume_from)
    elif rank == 0 and run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} already exists: continue it with --resume {run_dir}, or "
                              f"choose another --run-name")
    shape = checkpoint_shape(config)
    if rank == 0:
        check_output_space(run_dir, estimated_checkpoint_bytes(config, shape), "run directory")
    prediction = check_fits(config, shape, *detected_card(config.model.device))
    return TrainPlan(run_dir=run_dir, task_ids=task_ids, resume_from=resume_from, prediction=prediction)


def check_eval(config: EvaluateConfig, rank: int = 0) -> EvalPlan:
    """Raises on the first problem; returns the plan, whose results directory is new (results are never
    overwritten). Nothing is written."""
    check_model(config.model)
    task_ids = check_env(config.env)
    check_finite(config)
    if not 1 <= config.trials_per_task <= suite_shape(config.env.task_suite).num_init_states:
        raise ValueError(f"--trials-per-task must be in 1..{suite_shape(config.env.task_suite).num_init_states}, "
                         f"got {config.trials_per_task}")
    if config.temperature is not None and not config.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (or left out for greedy actions), got {config.temperature}")
    if config.seed < 0:
        raise ValueError(f"--seed must be >= 0 (it also picks the scenes), got {config.seed}")
    results_dir = config.output_dir / (config.run_name or default_run_name(f"eval-{config.env.task_suite}"))
    if rank == 0 and results_dir.exists():
        raise FileExistsError(f"results directory {results_dir} already exists; choose another --run-name")
    if rank == 0:
        check_output_space(results_dir, CHECKPOINT_SLACK_BYTES, "results directory")
    return EvalPlan(results_dir=results_dir, task_ids=task_ids)
