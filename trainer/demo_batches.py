"""SFT's data: every usable step of a `libero_env.demos` directory as a sample, and the batch of each optimizer
step as a pure function of (seed, step), decoded and optionally augmented as OpenVLA's LIBERO fine-tunes were.

The shuffle of each epoch and the augmentation of each step are seeded from (seed, epoch) and (seed, step), so a
resumed run, with any number of loader workers, sees the batches an uninterrupted run sees.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from libero_env.demos import decode_images, episode_paths, load_episode
from libero_env.processing import CENTER_CROP_AREA, POLICY_IMAGE_SIZE

CROP_SHIFT = round(POLICY_IMAGE_SIZE * (1 - math.sqrt(CENTER_CROP_AREA)) / 2 / math.sqrt(CENTER_CROP_AREA))
"""6 pixels: how far OpenVLA's random 0.9-area crop can lie from the centred one, in the centre crop's pixels."""
SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1


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
