"""Supervised fine-tuning (SFT) on expert demos: OpenVLA's token cross-entropy (REF 3.1, 6.2), LoRA or full.

    run_sft(SftConfig(demos=Path("demos/libero_spatial"), output_dir=Path("runs/sft-spatial"),
                      checkpoint="openvla/openvla-7b"))

The demos are a `libero_env.demos` directory. Their actions are normalised with the demos' own statistics, which
replace the checkpoint's under the same key, so that the exported policy decodes what it was taught.

The output directory, which a run creates and never overwrites:

    config.json     the SftConfig
    metrics.jsonl   one line every `log_every` steps: step, sft/loss, sft/accuracy, sft/lr, sft/samples_per_second
    adapter/        (LoRA) the PEFT adapter, rewritten atomically every `save_every` steps and at the end; it
                    applies to `checkpoint`, whose statistics are not the demos' (prefer model/)
    model/          the released layout with every weight merged and the demos' statistics under their key in
                    dataset_statistics.json and config.json; written at the end (and every `save_every` steps with
                    full fine-tuning). `load_policy` and `OpenVLA_GRPO.py train --checkpoint` start from it.
"""

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from libero_env.demos import STATISTICS_FILE, decode_images, episode_paths, load_episode, write_json
from vla_actor import LoraSettings, VLAPolicy, load_policy
from vla_actor.action_tokens import find_stats
from vla_actor.checkpoint import CONFIG_FILE, read_json, read_norm_stats, resolve_directory

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
FINETUNE_MODES = ("lora", "full")


@dataclass
class SftConfig:
    """Supervised fine-tuning of an OpenVLA / OpenVLA-OFT checkpoint on expert demos."""

    demos: Path
    """Demo directory in the libero_env.demos format: episodes/task*_init*.npz and dataset_statistics.json."""
    output_dir: Path
    """Directory this run creates (it must not exist yet): config.json, metrics.jsonl, adapter/, model/."""
    checkpoint: str = "openvla/openvla-7b"
    """Local directory or hub id of the checkpoint to fine-tune (REF 1.1); OpenVLA or token-head OFT."""
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
    """Constant AdamW learning rate (OpenVLA's LIBERO LoRA recipe: 5e-4, REF 5.4; full fine-tuning of a
    pretrained model wants far less)."""
    batch_size: int = 8
    """Samples (demo steps) per optimizer step, drawn without replacement from a fresh shuffle every epoch."""
    steps: int = 1000
    """Optimizer steps."""
    seed: int = 0
    """Seed of the LoRA initialisation and of the shuffling."""
    log_every: int = 10
    """Steps between metrics lines (the loss is the mean over these steps)."""
    save_every: int = 500
    """Steps between saves (adapter/ with LoRA, model/ with full fine-tuning); the last step always saves."""
    device: str = "auto"
    """Torch device; auto: cuda when available, else cpu."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weight dtype; auto: bfloat16 on CUDA, float32 on CPU. LoRA weights always train in float32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (the 7B on a 24 GB card needs it); off is faster."""


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
    if config.output_dir.exists():
        raise FileExistsError(f"output directory {config.output_dir} already exists; choose a new one")
    if config.finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {config.finetune!r}")
    for name in ("lora_rank", "lora_alpha", "batch_size", "steps", "log_every", "save_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {config.lr}")


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


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of sample indices: each epoch a fresh permutation, the incomplete last batch dropped."""
    if batch_size > count:
        raise ValueError(f"batch_size {batch_size} is larger than the {count} demo samples; lower it")
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def load_for_sft(config: SftConfig, key: str, statistics: dict) -> VLAPolicy:
    """The checkpoint with the demos' statistics and the chosen trainable parameters."""
    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available()
                          else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[config.dtype]
    directory = resolve_directory(config.checkpoint)
    present, _ = read_norm_stats(directory, read_json(directory / CONFIG_FILE))
    # load_policy needs a key the checkpoint has (a base model has none for the demos' suite); it is replaced.
    loadable = key if key in present or f"{key}_no_noops" in present else next(iter(sorted(present)), key)
    policy = load_policy(directory, unnorm_key=loadable, device=device, dtype=dtype)
    use_statistics(policy, key, statistics)
    if config.finetune == "lora":
        torch.manual_seed(config.seed)
        policy.apply_lora(LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha))
    else:
        policy.model.requires_grad_(True)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


def save(policy: VLAPolicy, config: SftConfig, final: bool) -> None:
    """adapter/ (LoRA) or model/ (full) during training; both at the end. Every write is atomic."""
    if config.finetune == "lora":
        policy.save_adapter(config.output_dir / ADAPTER_DIR)
    if final or config.finetune == "full":
        policy.merge_and_export(config.output_dir / MODEL_DIR)


def run_sft(config: SftConfig) -> Path:
    """Fine-tune `config.checkpoint` on `config.demos`; returns the exported checkpoint directory (model/)."""
    check_sft(config)
    key, statistics = demo_statistics(config.demos, config.unnorm_key)
    policy = load_for_sft(config, key, statistics)
    samples = read_demo_steps(config.demos, policy.tokens_per_query // policy.action_dim)
    targets = policy.action_tokens(samples.actions)
    wrist, proprio = policy.num_images == 2, policy.uses_proprio
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    batches = shuffled_batches(len(samples), config.batch_size, np.random.default_rng(config.seed))

    config.output_dir.mkdir(parents=True)
    write_json(config.output_dir / "config.json", json.loads(json.dumps(asdict(config), default=str)))
    print(f"SFT of {config.checkpoint} ({config.finetune}, {sum(p.numel() for p in params):,} trainable "
          f"parameters) on {len(samples)} samples of {config.demos}, statistics {key!r}", flush=True)
    losses, train_seconds = [], 0.0
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        rows = next(batches)
        images, instructions = samples.images(rows), [samples.instructions[i] for i in rows]
        wrist_images = samples.images(rows, wrist=True) if wrist else None
        state = samples.proprio[rows] if proprio else None
        loss = policy.token_cross_entropy(images, instructions, targets[rows], wrist=wrist_images, proprio=state)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the SFT loss is {loss.item()} at step {step}; lower lr (now {config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        train_seconds += time.perf_counter() - started
        if step % config.log_every == 0 or step == config.steps:
            # The policy's own greedy choice over the 256 action tokens, as rollouts and evals make it.
            greedy = policy.sample(images, instructions, wrist=wrist_images, proprio=state, greedy=True).token_ids
            metrics = {"step": step, "sft/loss": sum(losses) / len(losses),
                       "sft/accuracy": (greedy == targets[rows]).float().mean().item(),
                       "sft/lr": optimizer.param_groups[0]["lr"],
                       "sft/samples_per_second": len(losses) * config.batch_size / train_seconds}
            with (config.output_dir / METRICS_FILE).open("a") as file:
                file.write(json.dumps({"time": time.time(), **metrics}) + "\n")
            print(" | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
            losses, train_seconds = [], 0.0
        if step % config.save_every == 0 or step == config.steps:
            save(policy, config, final=step == config.steps)
    return config.output_dir / MODEL_DIR
