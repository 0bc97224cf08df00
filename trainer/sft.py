"""Supervised fine-tuning (SFT) on expert demos: OpenVLA's token cross-entropy (REF 3.1, 6.2), LoRA or full.

    run_sft(SftConfig(demos=Path("demos/libero_spatial"), output_dir=Path("runs/sft-spatial"),
                      checkpoint="openvla/openvla-7b"))

The demos are a `libero_env.demos` directory. Their actions are normalised with the demos' own statistics, which
replace the checkpoint's under the same key, so that the exported policy decodes what it was taught.

The output directory, which a run creates (and only `resume` continues):

    config.json     the SftConfig
    metrics.jsonl   one line every `log_every` steps: step, sft/loss, sft/accuracy, sft/lr, sft/samples_per_second,
                    sft/data_wait (share of the time spent waiting for batches)
    checkpoint/step_NNNNNN/
                    what `resume` continues from, every `save_every` steps and at the end: adapter/ (LoRA, PEFT
                    format) or model/ (full, the released layout), optimizer.pt (AdamW and scheduler states) and
                    state.json (step, the losses of the unfinished log window). Written into a temporary directory
                    and renamed, then the older one is removed, so a killed run always leaves a complete one.
    adapter/        (LoRA) the final PEFT adapter; it applies to `checkpoint`, whose statistics are not the demos'
    model/          the final released layout with every weight merged and the demos' statistics under their key
                    in dataset_statistics.json and config.json. `load_policy` and `OpenVLA_GRPO.py train
                    --checkpoint` start from it.

Batches are a pure function of (seed, step): the shuffle of each epoch and the augmentation of each step are
seeded from them. So a resumed run, with any number of loader workers, sees the batches an uninterrupted run sees
and ends with the same weights.
"""

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from libero_env.demos import STATISTICS_FILE, decode_images, episode_paths, load_episode, write_json
from libero_env.processing import CENTER_CROP_AREA, POLICY_IMAGE_SIZE
from trainer.checkpoint import write_text
from trainer.errors import UserError
from vla_actor import LoraSettings, VLAPolicy, load_policy
from vla_actor.action_tokens import find_stats
from vla_actor.checkpoint import CONFIG_FILE, read_json, read_norm_stats, resolve_directory

SFT_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FINETUNE_MODES = ("lora", "full")
LR_SCHEDULES = ("constant", "cosine")
RESUME_MAY_CHANGE = ("resume", "steps", "log_every", "save_every", "max_seconds", "loader_workers", "device",
                     "gradient_checkpointing")
"""SftConfig fields a resumed run may set differently from the run it continues; the rest must be equal."""
CROP_SHIFT = round(POLICY_IMAGE_SIZE * (1 - math.sqrt(CENTER_CROP_AREA)) / 2 / math.sqrt(CENTER_CROP_AREA))
"""6 pixels: how far OpenVLA's random 0.9-area crop can lie from the centred one, in the centre crop's pixels."""
SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1


@dataclass
class SftConfig:
    """Supervised fine-tuning of an OpenVLA / OpenVLA-OFT checkpoint on expert demos."""

    demos: Path
    """Demo directory in the libero_env.demos format: episodes/task*_init*.npz and dataset_statistics.json."""
    output_dir: Path
    """Directory this run creates (config.json, metrics.jsonl, checkpoint/, adapter/, model/); an existing one is
    an error unless `resume` is set."""
    checkpoint: str = "openvla/openvla-7b"
    """Local directory or hub id of the checkpoint to fine-tune (REF 1.1); OpenVLA or token-head OFT. A randomly
    initialised one (scripts/make_small_vla.py) trains a small VLA from scratch."""
    unnorm_key: str | None = None
    """Key of the demos' dataset_statistics.json whose statistics normalise the actions; they replace the
    checkpoint's statistics under this key (and its _no_noops twin). None: the file's only key (the suite)."""
    finetune: Literal["lora", "full"] = "lora"
    """lora: train a PEFT LoRA adapter on every linear layer of the Llama decoder, the rest frozen; full: train
    every parameter (for small models; the 7B needs far more than 24 GB for it)."""
    lora_rank: int = 32
    """LoRA rank r (OpenVLA's LIBERO fine-tunes: 32, REF 5.4)."""
    lora_alpha: int = 16
    """LoRA alpha (OpenVLA's LIBERO fine-tunes: min(r, 16) = 16, REF 5.4)."""
    lr: float = 5e-4
    """Peak AdamW learning rate (OpenVLA's LIBERO LoRA recipe: 5e-4 constant, REF 5.4; full fine-tuning of a
    pretrained model wants far less)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: constant (OpenVLA's LIBERO recipe) or a cosine decay from lr to 0 at the last step."""
    warmup_steps: int = 0
    """Steps of linear warmup: step k (1-based) of the warmup uses lr * k / (warmup_steps + 1)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, on every trainable parameter."""
    batch_size: int = 8
    """Samples (demo steps) per optimizer step, drawn without replacement from a fresh shuffle every epoch."""
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run may raise it; the cosine then spreads over the new total)."""
    seed: int = 0
    """Seed of the LoRA initialisation, of the shuffling and of the image augmentation."""
    image_aug: bool = False
    """Augment every training image on its own as OpenVLA's LIBERO fine-tunes did (all released LIBERO models were
    trained with it, REF 5.3): a random position of the 0.9-area crop, then brightness, contrast, saturation and
    hue jitter. The demos hold the evaluation's centre crop, so the crop is a shift of up to 6 pixels (edges
    repeated): the random 0.9-area crop expressed around that centre crop, at the same scale."""
    log_every: int = 10
    """Steps between metrics lines (the loss is the mean over these steps)."""
    save_every: int = 500
    """Steps between resumable checkpoints (checkpoint/); the last step always saves and exports."""
    resume: bool = False
    """Continue an existing output_dir from its last checkpoint exactly: weights, AdamW and scheduler states, step,
    the batch sequence and metrics.jsonl (lines past the checkpoint are dropped). Its config must be equal except
    for RESUME_MAY_CHANGE. Without a checkpoint yet (or without output_dir) the run starts from step 0."""
    max_seconds: float = 0.0
    """Save a checkpoint and return after this many seconds of wall time (model loading included), even before
    `steps`; a later run with resume continues. For machines lent in fixed slices of time. 0: no limit."""
    loader_workers: int = 0
    """Processes that decode (and augment) batches ahead of the training step; 0 does it in the main process.
    JPEG decoding costs about 1 ms an image and the augmentation 4-8 ms (one core, 224x224)."""
    device: str = "auto"
    """Torch device; auto: cuda when available, else cpu."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weight dtype; auto: bfloat16 on CUDA, float32 on CPU. LoRA weights always train in float32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (the 7B on a 24 GB card needs it); off is faster."""


def config_dict(config: SftConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))


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
    if config.finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {config.finetune!r}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
    for name in ("lora_rank", "lora_alpha", "batch_size", "steps", "log_every", "save_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "seed", "loader_workers", "weight_decay", "max_seconds"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {config.lr}")
    if config.output_dir.exists():
        check_resumable(config)


def check_resumable(config: SftConfig) -> None:
    """An existing output_dir continues only with resume, the same config (but RESUME_MAY_CHANGE) and a last
    checkpoint not past `steps`."""
    if not config.resume:
        raise FileExistsError(f"output directory {config.output_dir} already exists; pass --resume to continue "
                              f"it from its last checkpoint, or choose a new output_dir")
    saved_path = config.output_dir / SFT_CONFIG_FILE
    if not saved_path.is_file():
        if any(config.output_dir.iterdir()):
            raise FileExistsError(f"{config.output_dir} is not an SFT output directory (it has no "
                                  f"{SFT_CONFIG_FILE}); choose a new output_dir")
        return
    saved, current = read_json(saved_path), config_dict(config)
    changed = [f"{name} (saved {saved.get(name)!r}, now {value!r})" for name, value in current.items()
               if name not in RESUME_MAY_CHANGE and saved.get(name) != value]
    if changed:
        raise ValueError(f"--resume continues {config.output_dir} only with its own settings, but these differ: "
                         f"{'; '.join(changed)}. Pass the saved values, or choose a new output_dir")
    last = latest_checkpoint(config.output_dir)
    if last is not None and read_json(last / STATE_FILE)["step"] > config.steps:
        raise ValueError(f"{last} is past steps={config.steps}; pass --steps {read_json(last / STATE_FILE)['step']} "
                         f"or more")


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


def action_chunks(actions: np.ndarray, length: int) -> np.ndarray:
    """[T, 7] -> [T - length + 1, length, 7]: the chunk of every step whose `length` actions lie inside the
    episode. OFT's data pipeline (chunk_act_obs, effective_traj_len = T - 7) skips the steps whose chunk would run
    past the end; length 1 is OpenVLA's single action."""
    starts = np.arange(len(actions) - length + 1)
    return actions[starts[:, None] + np.arange(length)]


@dataclass(frozen=True)
class EncodedCamera:
    """One camera of one episode as stored: encoded images back to back and their offsets [T + 1]."""

    blob: np.ndarray
    """uint8 [B] encoded images."""
    offsets: np.ndarray
    """int64 [T + 1]: image t is blob[offsets[t]:offsets[t + 1]]."""

    def image(self, t: int) -> np.ndarray:
        return decode_images(self.blob, self.offsets[t:t + 2])[0]


@dataclass
class DemoSteps:
    """Every usable step of a demo directory as an SFT sample; images stay encoded until a batch needs them."""

    instructions: list[str]
    """Raw task language of each sample."""
    actions: np.ndarray
    """float32 [N, 7] (OpenVLA) or [N, 8, 7] chunks (OFT), dataset units: the targets."""
    proprio: np.ndarray
    """float32 [N, 8] robot state when the first action was chosen."""
    steps: np.ndarray
    """int64 [N, 2]: (episode, step) of each sample."""
    agentview: list[EncodedCamera]
    """Per episode."""
    wrist: list[EncodedCamera]
    """Per episode."""

    def __len__(self) -> int:
        return len(self.actions)

    def images(self, rows: np.ndarray, wrist: bool = False) -> np.ndarray:
        """uint8 [len(rows), 224, 224, 3] of the samples `rows`."""
        cameras = self.wrist if wrist else self.agentview
        return np.stack([cameras[episode].image(step) for episode, step in self.steps[rows]])


def read_demo_steps(demos: Path, chunk: int) -> DemoSteps:
    """The samples of a demo directory; `chunk` actions per sample (1 for OpenVLA, 8 for OFT)."""
    instructions, actions, proprio, steps, agentview, wrist = [], [], [], [], [], []
    for episode_index, path in enumerate(episode_paths(demos)):
        episode = load_episode(path, images=False)
        with np.load(path, allow_pickle=False) as data:
            agentview.append(EncodedCamera(data["agentview"], data["agentview_offsets"]))
            wrist.append(EncodedCamera(data["wrist"], data["wrist_offsets"]))
        chunks = action_chunks(episode.actions, chunk)
        instructions += [episode.instruction] * len(chunks)
        actions.append(chunks)
        proprio.append(episode.proprio[:len(chunks)])
        steps.append(np.stack([np.full(len(chunks), episode_index), np.arange(len(chunks))], axis=1))
    samples = DemoSteps(instructions, np.concatenate(actions, dtype=np.float32), np.concatenate(proprio),
                        np.concatenate(steps).astype(np.int64), agentview, wrist)
    if len(samples) == 0:
        raise ValueError(f"the episodes in {demos} hold no sample: OFT needs episodes of at least {chunk} steps")
    if chunk == 1:
        samples.actions = samples.actions[:, 0]
    return samples


def image_augmentation() -> v2.Compose:
    """OpenVLA's LIBERO training augmentation (REF 5.3; dlimp's augment_image, in its fixed order) for uint8
    [3, H, W] images that already are the evaluation's centre crop.

    The 0.9-area random crop becomes a random shift of up to CROP_SHIFT pixels each way with repeated edges: the
    same crop positions relative to the centre crop, at the scale the evaluation sees (cropping the centre crop
    again would zoom in to 0.81 of the frame). torchvision's jitters differ in detail from TF's: brightness
    scales (TF adds up to +-0.2), contrast and saturation blend with the grey image (TF: per-channel mean, HSV)."""
    return v2.Compose([
        v2.RandomCrop(POLICY_IMAGE_SIZE, padding=CROP_SHIFT, padding_mode="edge"),
        v2.ToDtype(torch.float32, scale=True),
        v2.ColorJitter(brightness=0.2),
        v2.ColorJitter(contrast=(0.8, 1.2)),
        v2.ColorJitter(saturation=(0.8, 1.2)),
        v2.ColorJitter(hue=0.05),
        v2.ToDtype(torch.uint8, scale=True),
    ])


def augment(images: np.ndarray, transform: v2.Transform) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> uint8 [B, H, W, 3], each image through `transform` with its own random draw."""
    channels_first = torch.from_numpy(images).permute(0, 3, 1, 2)
    return torch.stack([transform(image) for image in channels_first]).permute(0, 2, 3, 1).contiguous()


def stream_seed(seed: int, stream: int, index: int) -> int:
    """Independent 64-bit seeds for the shuffle of each epoch and the augmentation of each step."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0])


class DemoBatches(Dataset):
    """Item `step` (1-based) is that optimizer step's batch: the samples of its place in its epoch's shuffle (the
    incomplete last batch of an epoch is dropped), decoded and, with `image_aug`, augmented."""

    def __init__(self, samples: DemoSteps, targets: torch.Tensor, batch_size: int, seed: int, *, wrist: bool,
                 proprio: bool, image_aug: bool):
        if batch_size > len(samples):
            raise ValueError(f"batch_size {batch_size} is larger than the {len(samples)} demo samples; lower it")
        self.samples, self.targets, self.batch_size, self.seed = samples, targets, batch_size, seed
        self.wrist, self.proprio = wrist, proprio
        self.transform = image_augmentation() if image_aug else None

    def rows(self, step: int) -> np.ndarray:
        epoch, position = divmod(step - 1, len(self.samples) // self.batch_size)
        order = np.random.default_rng(stream_seed(self.seed, SHUFFLE_STREAM, epoch)).permutation(len(self.samples))
        return order[position * self.batch_size:(position + 1) * self.batch_size]

    def __getitem__(self, step: int) -> dict[str, Any]:
        rows = self.rows(step)
        views = {"images": self.samples.images(rows)}
        if self.wrist:
            views["wrist"] = self.samples.images(rows, wrist=True)
        if self.transform is None:
            views = {name: torch.from_numpy(images) for name, images in views.items()}
        else:
            with torch.random.fork_rng(devices=[]):  # v2 draws from torch's global CPU generator
                torch.random.default_generator.manual_seed(stream_seed(self.seed, AUGMENT_STREAM, step))
                views = {name: augment(images, self.transform) for name, images in views.items()}
        batch = {"step": step, "instructions": [self.samples.instructions[i] for i in rows],
                 "targets": self.targets[rows], **views}
        if self.proprio:
            batch["proprio"] = torch.from_numpy(self.samples.proprio[rows])
        return batch


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for the optimizer step after `step` steps (LambdaLR's count, 0-based): linear
    warmup over `warmup_steps`, then constant or a cosine from 1 down to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINT_DIR
    found = root.glob("step_[0-9]*") if root.is_dir() else []
    return sorted(found, key=lambda path: int(path.name.removeprefix("step_")))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def load_for_sft(config: SftConfig, key: str, statistics: dict, resumed: Path | None) -> VLAPolicy:
    """The checkpoint with the demos' statistics and the chosen trainable parameters, their values from the
    checkpoint `resumed` when there is one."""
    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available()
                          else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[config.dtype]
    if resumed is not None and config.finetune == "full":
        policy = load_policy(resumed / MODEL_DIR, unnorm_key=key, device=device, dtype=dtype)
    else:
        directory = resolve_directory(config.checkpoint)
        present, _ = read_norm_stats(directory, read_json(directory / CONFIG_FILE))
        # load_policy needs a key the checkpoint has (a base model has none for the demos' suite); it is replaced.
        loadable = key if key in present or f"{key}_no_noops" in present else next(iter(sorted(present)), key)
        policy = load_policy(directory, unnorm_key=loadable, device=device, dtype=dtype)
    use_statistics(policy, key, statistics)
    if config.finetune == "lora":
        torch.manual_seed(config.seed)
        policy.apply_lora(LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha))
        if resumed is not None:
            policy.load_adapter(resumed / ADAPTER_DIR)
    else:
        policy.model.requires_grad_(True)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


def save_checkpoint(policy: VLAPolicy, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: SftConfig, step: int,
                    window: list[float]) -> Path:
    """checkpoint/step_<step>, written beside and renamed into place; then the older ones are removed."""
    root = config.output_dir / CHECKPOINT_DIR
    final, staging = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if config.finetune == "lora":
        policy.save_adapter(staging / ADAPTER_DIR)
    else:
        policy.merge_and_export(staging / MODEL_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_FILE)
    write_json(staging / STATE_FILE, {"step": step, "window_losses": window})
    staging.replace(final)
    for old in checkpoint_dirs(config.output_dir)[:-1]:
        shutil.rmtree(old)
    return final


def keep_metrics_until(output_dir: Path, step: int) -> None:
    """Drop the metrics lines a killed run wrote after its last checkpoint, so the resumed run writes them once."""
    path = output_dir / METRICS_FILE
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(path, "".join(f"{line}\n" for line in lines))


def run_sft(config: SftConfig) -> Path:
    """Fine-tune `config.checkpoint` on `config.demos`. Returns the exported checkpoint directory (model/), or,
    when `max_seconds` stopped the run early, the checkpoint that `resume` continues from."""
    started = time.monotonic()
    check_sft(config)
    key, statistics = demo_statistics(config.demos, config.unnorm_key)
    resumed = latest_checkpoint(config.output_dir) if config.resume else None
    policy = load_for_sft(config, key, statistics, resumed)
    samples = read_demo_steps(config.demos, policy.tokens_per_query // policy.action_dim)
    batches = DemoBatches(samples, policy.action_tokens(samples.actions), config.batch_size, config.seed,
                          wrist=policy.num_images == 2, proprio=policy.uses_proprio, image_aug=config.image_aug)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps, config.lr_schedule))
    first_step, window = 1, []
    if resumed is not None:
        saved = torch.load(resumed / OPTIMIZER_FILE, map_location=policy.device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = read_json(resumed / STATE_FILE)
        first_step, window = state["step"] + 1, state["window_losses"]

    config.output_dir.mkdir(parents=True, exist_ok=config.resume)
    for partial in (config.output_dir / CHECKPOINT_DIR).glob(".tmp-step_*"):
        shutil.rmtree(partial)
    keep_metrics_until(config.output_dir, first_step - 1)
    write_json(config.output_dir / SFT_CONFIG_FILE, config_dict(config))
    print(f"SFT of {config.checkpoint} ({config.finetune}, {sum(p.numel() for p in params):,} trainable "
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
            raise UserError(f"the SFT loss is {loss.item()} at step {step}; lower lr (now {config.lr})")
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
            metrics = {"step": step, "sft/loss": sum(window) / len(window),
                       "sft/accuracy": (greedy.cpu() == batch["targets"]).float().mean().item(), "sft/lr": lr,
                       "sft/samples_per_second": timed_steps * config.batch_size / seconds,
                       "sft/data_wait": waited / seconds}
            with (config.output_dir / METRICS_FILE).open("a") as file:
                file.write(json.dumps({"time": time.time(), **metrics}) + "\n")
            print(" | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
            window, timed_steps, seconds, waited = [], 0, 0.0, 0.0
        out_of_time = config.max_seconds > 0 and time.monotonic() - started > config.max_seconds
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            checkpoint = save_checkpoint(policy, optimizer, scheduler, config, step, window)
            if out_of_time and step < config.steps:
                print(f"max_seconds {config.max_seconds:g} reached: stopped at step {step} of {config.steps}; "
                      f"continue with --resume", flush=True)
                return checkpoint
        ready = time.perf_counter()
    if config.finetune == "lora":
        policy.save_adapter(config.output_dir / ADAPTER_DIR)
    return policy.merge_and_export(config.output_dir / MODEL_DIR)
