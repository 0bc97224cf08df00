"""Ship both ends of one seed of the small-VLA experiment (scripts/libero_learning.py with --grpo-finetune lora) as
the repository's assets: its sft_export as-is (bfloat16 weights) in SHIPPED_SFT, and its last GRPO export, a LoRA
adapter trained in float32, stored in bfloat16 in SHIPPED_GRPO_ADAPTER (half the bytes; the tracked tree travels to
the GPU machine together with the LIBERO bundle in one 64 MiB transfer, bench/gpu_job.sh).

    python -m scripts.ship_seed runs/ll_seed3

Then measure both ends on this machine and record them under `shipped` in bench/results/libero_learning.json
(BENCHMARKS.md, "Several seeds", has the eval commands; tests/test_shipped_checkpoint.py reads that record)."""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from safetensors.torch import load_file, save_file

from scripts.libero_learning import grpo_exports, is_adapter
from trainer.config import SHIPPED_GRPO_ADAPTER, SHIPPED_SFT
from trainer.errors import one_line_errors, traceback_requested
from vla_actor.checkpoint import CONFIG_FILE, atomic_directory
from vla_actor.policy import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE


@dataclass
class Ship:
    """Copy a seed's SFT export and its GRPO adapter (in bfloat16) into assets/."""

    work_dir: tyro.conf.Positional[Path]
    """The seed's work directory (libero_learning's --work-dir), holding sft_export/ and grpo<N>_export/."""
    sft_dest: Path = SHIPPED_SFT
    """Where the SFT end goes."""
    adapter_dest: Path = SHIPPED_GRPO_ADAPTER
    """Where the GRPO end (the adapter) goes."""


def ship(args: Ship) -> dict:
    """Both ends written atomically (each replaces its old directory only once complete); returns what was shipped
    with the largest relative rounding of an adapter tensor."""
    sft = args.work_dir / "sft_export"
    if not (sft / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{sft} holds no exported model: pass the work directory of a seed whose SFT ran")
    adapters = [export for export in grpo_exports(args.work_dir) if is_adapter(export)]
    if not adapters:
        raise FileNotFoundError(f"{args.work_dir} holds no GRPO adapter export (grpo<N>_export/ with "
                                f"{ADAPTER_CONFIG_FILE}): bring it back from the machine that ran GRPO")
    adapter = adapters[-1]
    weights = load_file(adapter / ADAPTER_WEIGHTS_FILE)
    stored = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in weights.items()}
    rounding = max(((stored[name].float() - tensor.float()).abs().max() / tensor.float().abs().max().clamp_min(1e-30))
                   .item() for name, tensor in weights.items())
    with atomic_directory(args.sft_dest) as staging:
        shutil.copytree(sft, staging, dirs_exist_ok=True)
    with atomic_directory(args.adapter_dest) as staging:
        shutil.copyfile(adapter / ADAPTER_CONFIG_FILE, staging / ADAPTER_CONFIG_FILE)
        save_file(stored, staging / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    size = {path.name: sum(file.stat().st_size for file in path.iterdir())
            for path in (args.sft_dest, args.adapter_dest)}
    return {"sft": str(sft), "adapter": str(adapter), "bytes": size,
            "adapter_largest_relative_rounding": round(rounding, 5)}


if __name__ == "__main__":
    show_traceback, argv = traceback_requested(sys.argv[1:])
    with one_line_errors("ship_seed.py", show_traceback):
        print(json.dumps(ship(tyro.cli(Ship, args=argv)), indent=2))
