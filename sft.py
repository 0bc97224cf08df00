"""Supervised fine-tuning (SFT) on expert demos, the `sft` subcommand: OpenVLA's token cross-entropy (REF 3.1, 6.2),
LoRA or full. It gives GRPO its warm start.

    run_sft(SftConfig(demos=Path("demos/libero_spatial"), output_dir=Path("runs/sft-spatial"),
                      model=ModelConfig(checkpoint="openvla/openvla-7b")))

The demos' actions are normalised with the demos' own statistics, which replace the checkpoint's under the same key,
so that the exported policy decodes what it was taught.

The output directory is a run directory as GRPO's (trainer/checkpoint.py), the optimizer step counting as the
iteration; a run creates it, and only `resume` continues it:

    config.json     the SftConfig
    metrics.jsonl   one line every `log_every` steps: step, sft/loss, sft/accuracy, sft/lr, sft/samples_per_second,
                    sft/data_wait (share of the time spent waiting for batches)
    checkpoints/iter_NNNNNN/
                    the newest checkpoint (NNNNNN: its step), what `resume` continues from, every `save_every` steps
                    and at the end; trainer_state.json also holds the losses of the unfinished log window
    adapter/        (LoRA) the final PEFT adapter; it applies to `checkpoint`, whose statistics are not the demos'
    model/          the final released layout with every weight merged and the demos' statistics under their key
                    in dataset_statistics.json and config.json. `load_policy` and `OpenVLA_GRPO.py train
                    --checkpoint` start from it.

Batches are a pure function of (seed, step) (trainer/demo_batches.py), so a resumed run sees the batches an
uninterrupted run sees and ends with the same weights.
"""

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from libero_env.demos import STATISTICS_FILE, episode_paths
from trainer import distributed, fsdp
from trainer.checkpoint import (ADAPTER_DIR, MODEL_DIR, checkpoint_dirs, checkpoint_iteration, load_checkpoint,
                                new_run_directory, remove_partial_checkpoints, rng_state, save_checkpoint, write_json)
from trainer.config import SftConfig, config_to_dict
from trainer.demo_batches import DemoBatches, read_demo_steps
from trainer.errors import UserError
from trainer.metrics import MetricsLogger
from trainer.policy_builder import build_policy
from trainer.validation import changed_settings, check_finetune_base, check_model
from vla_actor import VLAPolicy
from vla_actor.action_tokens import find_stats
from vla_actor.checkpoint import CONFIG_FILE, read_json, read_norm_stats, resolve_directory

RESUME_MAY_CHANGE = ("resume", "steps", "log_every", "save_every", "max_seconds", "loader_workers", "device",
                     "gradient_checkpointing")
"""SftConfig fields a resumed run may set differently from the run it continues; the rest must be equal."""
EARLIER_LAYOUT = "checkpoint"
"""Where SFT run directories kept their checkpoints (checkpoint/step_N) before SFT shared GRPO's layout."""


def check_sft(config: SftConfig) -> None:
    """One clear error for a config that cannot work, before any model is loaded."""
    if not config.demos.is_dir():
        raise FileNotFoundError(f"demo directory {config.demos} does not exist; collect demos with "
                                f"libero_env.demos.collect_demos first")
    if not episode_paths(config.demos):
        raise FileNotFoundError(f"no episodes in {config.demos / 'episodes'} (expected task*_init*.npz files "
                                f"written by libero_env.demos)")
    if not (config.demos / STATISTICS_FILE).is_file():
        raise FileNotFoundError(f"{config.demos / STATISTICS_FILE} does not exist; write it with "
                                f"libero_env.demos.write_dataset_statistics({str(config.demos)!r})")
    check_model(config.model)
    if config.finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be lora or full, got {config.finetune!r}")
    if config.finetune == "full" and config.model.adapter is not None:
        raise ValueError(f"--adapter {config.model.adapter} is a LoRA adapter and --finetune full trains no adapter: "
                         f"merge it into a full checkpoint first and pass that as --checkpoint")
    check_finetune_base(config.finetune, config.model)
    if config.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, got {config.lr_schedule!r}")
    at_least_one = {"lora_rank": config.lora.lora_rank, "lora_alpha": config.lora.lora_alpha,
                    "batch_size": config.batch_size, "steps": config.steps, "log_every": config.log_every,
                    "save_every": config.save_every}
    for name, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    at_least_zero = {"warmup_steps": config.warmup_steps, "seed": config.seed, "loader_workers": config.loader_workers,
                     "weight_decay": config.optim.weight_decay, "max_seconds": config.max_seconds}
    for name, value in at_least_zero.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(config.optim.lr) and config.optim.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {config.optim.lr}")
    if config.output_dir.exists():
        check_resumable(config)


def check_resumable(config: SftConfig) -> None:
    """An existing output_dir continues only with resume, the same config (but RESUME_MAY_CHANGE) and a last
    checkpoint not past `steps`."""
    if (config.output_dir / EARLIER_LAYOUT).is_dir():
        raise ValueError(f"{config.output_dir} holds SFT checkpoints of the earlier layout ({EARLIER_LAYOUT}/step_N), "
                         f"which this version does not resume: choose a new output_dir and start from its weights "
                         f"(--checkpoint {config.output_dir / MODEL_DIR}, or --adapter on a step_N/adapter)")
    if not config.resume:
        raise FileExistsError(f"output directory {config.output_dir} already exists; pass --resume to continue "
                              f"it from its last checkpoint, or choose a new output_dir")
    saved_path = config.output_dir / "config.json"
    if not saved_path.is_file():
        if any(config.output_dir.iterdir()):
            raise FileExistsError(f"{config.output_dir} is not an SFT output directory (it has no config.json); "
                                  f"choose a new output_dir")
        return
    changed = changed_settings(read_json(saved_path), config, RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"--resume continues {config.output_dir} only with its own settings, but these differ: "
                         f"{'; '.join(changed)}. Pass the saved values, or choose a new output_dir")
    saved_checkpoints = checkpoint_dirs(config.output_dir)
    if saved_checkpoints and checkpoint_iteration(saved_checkpoints[-1]) > config.steps:
        last = saved_checkpoints[-1]
        raise ValueError(f"{last} is past steps={config.steps}; pass --steps {checkpoint_iteration(last)} or more")


def demo_statistics(demos: Path, unnorm_key: str | None) -> tuple[str, dict]:
    """(key, statistics) of the demos' dataset_statistics.json (REF 1.3 layout)."""
    statistics = read_json(demos / STATISTICS_FILE)
    if unnorm_key is None:
        if len(statistics) != 1:
            raise ValueError(f"{demos / STATISTICS_FILE} has keys {sorted(statistics)}; choose one with unnorm_key")
        unnorm_key = next(iter(statistics))
    if unnorm_key not in statistics:
        raise ValueError(f"unnorm_key {unnorm_key!r} is not in {demos / STATISTICS_FILE}; available keys: "
                         f"{sorted(statistics)}")
    find_stats(statistics, unnorm_key, str(demos / STATISTICS_FILE))  # parses, so a bad file fails here
    return unnorm_key, statistics[unnorm_key]


def use_statistics(policy: VLAPolicy, key: str, statistics: dict) -> None:
    """Make `statistics` the policy's under `key`, in memory and in every checkpoint it writes. They replace `key`
    and drop its `_no_noops` twin (a stale copy of the same suite); the checkpoint's other keys stay."""
    norm_stats = {k: v for k, v in policy.norm_stats.items() if k not in (key, f"{key}_no_noops")}
    norm_stats[key] = statistics
    unnorm_key, stats = find_stats(norm_stats, key, "the demos' statistics")
    if stats.action_dim != policy.action_dim:
        raise ValueError(f"the demos' statistics {key!r} have {stats.action_dim} action dimensions, the policy "
                         f"{policy.action_dim}")
    if policy.uses_proprio and stats.proprio_q01 is None:
        raise ValueError(f"the policy uses proprio but the demos' statistics {key!r} have no proprio q01/q99")
    policy.norm_stats, policy.unnorm_key, policy.stats = norm_stats, unnorm_key, stats
    # dataset_statistics.json replaces config.json's norm_stats on load (REF 1.3); both are kept equal anyway.
    policy.config = {**policy.config, "norm_stats": norm_stats}


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for the optimizer step after `step` steps (LambdaLR's count, 0-based): linear
    warmup over `warmup_steps`, then constant or a cosine from 1 down to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_policy(config: SftConfig, key: str, statistics: dict, device: torch.device) -> VLAPolicy:
    """The checkpoint with the demos' statistics under `key` and the chosen trainable parameters."""
    directory = resolve_directory(config.model.checkpoint)
    present, _ = read_norm_stats(directory, read_json(directory / CONFIG_FILE))
    # load_policy needs a key the checkpoint has (a base model has none for the demos' suite); it is replaced.
    loadable = key if key in present or f"{key}_no_noops" in present else next(iter(sorted(present)), key)
    torch.manual_seed(config.seed)  # the fresh LoRA adapter
    full = config.finetune == "full"
    policy = build_policy(config.model, None if full else config.lora, loadable, device, full=full)
    use_statistics(policy, key, statistics)
    return policy


def save(policy: VLAPolicy, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
         config: SftConfig, step: int, window: list[float]) -> Path:
    """checkpoints/iter_<step>, the only one kept."""
    full_state = fsdp.full_state(policy.model, optimizer) if config.finetune == "full" else None
    state = {"iteration": step, "world_size": 1, "window_losses": window}
    return save_checkpoint(config.output_dir, step, policy, optimizer, scheduler, state, [rng_state()],
                           config_to_dict(config), keep_last=1, full_state=full_state)


def run_sft(config: SftConfig) -> Path:
    """Fine-tune `config.model.checkpoint` on `config.demos`. Returns the exported checkpoint directory (model/),
    or, when `max_seconds` stopped the run early, the checkpoint that `resume` continues from."""
    started = time.monotonic()
    check_sft(config)
    key, statistics = demo_statistics(config.demos, config.model.unnorm_key)
    saved_checkpoints = checkpoint_dirs(config.output_dir) if config.resume else []
    resumed = saved_checkpoints[-1] if saved_checkpoints else None
    policy = sft_policy(config, key, statistics, distributed.setup(config.model.device).device)
    with new_run_directory(config.output_dir, remove_on_failure=True):
        return fit(config, policy, key, resumed, started)


def fit(config: SftConfig, policy: VLAPolicy, key: str, resumed: Path | None, started: float) -> Path:
    """The SFT loop from the loaded policy (and the checkpoint to resume, if any) to the export; returns what
    run_sft returns."""
    samples = read_demo_steps(config.demos, policy.tokens_per_query // policy.action_dim)
    batches = DemoBatches(samples, policy.action_tokens(samples.actions), config.batch_size, config.seed,
                          wrist=policy.num_images == 2, proprio=policy.uses_proprio, image_aug=config.image_aug)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps, config.lr_schedule))
    first_step, window = 1, []
    if resumed is not None:
        state = load_checkpoint(resumed, policy, optimizer, scheduler, rank=0, world_size=1)
        first_step, window = state["iteration"] + 1, state["window_losses"]

    config.output_dir.mkdir(parents=True, exist_ok=config.resume)
    remove_partial_checkpoints(config.output_dir)
    write_json(config.output_dir / "config.json", config_to_dict(config))
    logger = MetricsLogger(config.output_dir, config_to_dict(config), None, True, resume_iteration=first_step - 1,
                           step_key="step", console=None)
    print(f"SFT of {config.model.checkpoint} ({config.finetune}, {sum(p.numel() for p in params):,} trainable "
          f"parameters) on {len(samples)} samples of {config.demos}, statistics {key!r}"
          + (f", resumed at step {first_step - 1} from {resumed}" if resumed else ""), flush=True)
    loader = DataLoader(batches, batch_size=None, sampler=range(first_step, config.steps + 1),
                        num_workers=config.loader_workers, pin_memory=policy.device.type == "cuda")
    timed_steps, seconds, waited = 0, 0.0, 0.0
    ready = time.perf_counter()
    for batch in loader:
        step, arrived = batch["step"], time.perf_counter()
        extra = {name: batch[name] for name in ("wrist", "proprio") if name in batch}
        loss = policy.token_cross_entropy(batch["images"], batch["instructions"], batch["targets"], **extra)
        if not torch.isfinite(loss):
            raise UserError(f"the SFT loss is {loss.item()} at step {step}; lower lr (now {config.optim.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        window.append(loss.item())
        now = time.perf_counter()
        timed_steps, seconds, waited = timed_steps + 1, seconds + now - ready, waited + arrived - ready
        if step % config.log_every == 0 or step == config.steps:
            # The policy's own greedy choice over the 256 action tokens, as rollouts and evals make it.
            greedy = policy.sample(batch["images"], batch["instructions"], greedy=True, **extra).token_ids
            logger.log({"step": step, "sft/loss": sum(window) / len(window),
                        "sft/accuracy": (greedy.cpu() == batch["targets"]).float().mean().item(), "sft/lr": lr,
                        "sft/samples_per_second": timed_steps * config.batch_size / seconds,
                        "sft/data_wait": waited / seconds})
            window, timed_steps, seconds, waited = [], 0, 0.0, 0.0
        out_of_time = config.max_seconds > 0 and time.monotonic() - started > config.max_seconds
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            checkpoint = save(policy, optimizer, scheduler, config, step, window)
            if out_of_time and step < config.steps:
                print(f"max_seconds {config.max_seconds:g} reached: stopped at step {step} of {config.steps}; "
                      f"continue with --resume", flush=True)
                return checkpoint
        ready = time.perf_counter()
    if config.finetune == "lora":
        policy.save_adapter(config.output_dir / ADAPTER_DIR)
    return policy.merge_and_export(config.output_dir / MODEL_DIR)
