"""A randomly initialised small VLA in the released OpenVLA / OpenVLA-OFT layout, to train from scratch by SFT.

Run from the repository root:

    python -m scripts.make_small_vla --output-dir checkpoints/small-oft --demos demos/libero_spatial
    python OpenVLA_GRPO.py sft --checkpoint checkpoints/small-oft --finetune full --demos demos/libero_spatial ...

The defaults are the preset trained on libero_spatial demos: OFT (8-action chunks of parallel tokens), agentview +
wrist images and proprio, a 4-layer Llama of width 128, two 5-block ViT towers of width 128, about 11.8M parameters
of which 8.2M are the 32064-row embedding and LM head that the released token layout needs.

Initialisation: the Llama weights are normal(0, init_std); the ViTs keep timm's own initialisation (truncated
normal 0.02, LayerScale 1e-5 in the DINOv2 tower); the projectors keep PyTorch's default for nn.Linear.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from sft import demo_statistics
from trainer.errors import one_line_errors, traceback_requested
from vla_actor import make_tiny_checkpoint
from vla_actor.checkpoint import CONFIG_FILE, read_json
from vla_actor.model import ModelSpec, build_model

DEFAULT_UNNORM_KEY = "libero_spatial"


@dataclass
class SmallVla:
    """Write a randomly initialised small VLA checkpoint."""

    output_dir: Path
    """Checkpoint directory to write (it must not exist yet)."""
    demos: Path | None = None
    """Demo directory whose dataset_statistics.json provides the action / proprio statistics; None: the
    libero_spatial statistics of the released OpenVLA checkpoints (SFT replaces them with the demos' anyway)."""
    unnorm_key: str | None = None
    """Key of the statistics: with demos, the key to read from their file (None: its only key); without demos, the
    key to store libero_spatial's statistics under (None: libero_spatial)."""
    variant: Literal["openvla", "oft"] = "oft"
    """openvla: 7 autoregressive action tokens, one image, no proprio; oft: 8x7 parallel action tokens."""
    num_images: int = 2
    """OFT only: 1 (agentview) or 2 (agentview + wrist)."""
    use_proprio: bool = True
    """OFT only: a proprio projector turns the 8-D robot state into one token."""
    llm_dim: int = 128
    """Llama hidden size (its MLP is 11/4 of it)."""
    llm_layers: int = 4
    """Llama decoder layers."""
    llm_heads: int = 4
    """Llama attention heads (llm_dim must be a multiple)."""
    dino_dim: int = 128
    """Width of the DINOv2-style ViT tower."""
    siglip_dim: int = 128
    """Width of the SigLIP-style ViT tower."""
    vit_depth: int = 5
    """Blocks of each ViT; OpenVLA reads the patches after the second-to-last, so depth - 1 of them are used."""
    vit_heads: int = 4
    """Attention heads of each ViT (dino_dim and siglip_dim must be multiples)."""
    init_std: float = 0.02
    """Standard deviation of the Llama weights (its initializer_range; 0.02 is Llama's own)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the stored weights."""
    seed: int = 0
    """Seed of the random initialisation."""
    max_shard_mb: float = 15.0
    """Largest safetensors shard in MiB, so that each file stays small enough to move on its own."""


def statistics(args: SmallVla) -> tuple[str, dict | None]:
    """(key, statistics entry or None for the built-in libero_spatial one)."""
    if args.demos is None:
        return args.unnorm_key or DEFAULT_UNNORM_KEY, None
    return demo_statistics(args.demos, args.unnorm_key)


def make_small_vla(args: SmallVla) -> Path:
    if args.output_dir.exists():
        raise FileExistsError(f"{args.output_dir} already exists; choose a new output_dir")
    key, norm_stats = statistics(args)
    directory = make_tiny_checkpoint(
        args.output_dir, variant=args.variant, unnorm_key=key, seed=args.seed, norm_stats=norm_stats,
        llm_dim=args.llm_dim, llm_layers=args.llm_layers, llm_heads=args.llm_heads, dino_dim=args.dino_dim,
        siglip_dim=args.siglip_dim, vit_depth=args.vit_depth, vit_heads=args.vit_heads,
        num_images=args.num_images, use_proprio=args.use_proprio, init_std=args.init_std,
        dtype=getattr(torch, args.dtype), max_shard_bytes=int(args.max_shard_mb * 2**20))
    with_proprio = args.variant == "oft" and args.use_proprio
    spec = ModelSpec.from_config(read_json(directory / CONFIG_FILE), proprio_dim=8 if with_proprio else None)
    parameters = sum(p.numel() for p in build_model(spec, device="meta").parameters())
    size = sum(path.stat().st_size for path in directory.iterdir() if path.is_file())
    print(f"{args.variant} VLA with {parameters:,} parameters ({args.dtype}), {size / 1e6:.1f} MB on disk, "
          f"statistics {key!r} -> {directory}")
    return directory


if __name__ == "__main__":
    show_traceback, args = traceback_requested(sys.argv[1:])
    with one_line_errors("make_small_vla.py", show_traceback):
        make_small_vla(tyro.cli(SmallVla, args=args, description=__doc__.split("\n\n")[0]))
