"""Run directories and checkpoints that a run can be resumed from exactly.

A checkpoint is checkpoints/iter_NNNNNN/ in the run directory, holding adapter/ (the LoRA weights, safetensors) or,
with full fine-tuning, model/ (every weight, in the released layout that `eval --checkpoint` and `load_policy` read),
optimizer.pt (with full fine-tuning keyed by parameter name, absent before the first optimizer step), scheduler.pt,
rng_rank<r>.pt (python, numpy and torch generator states of every rank), trainer_state.json (iteration, counters,
every rank's group-sampler state and its envs' last tasks) and config.json. It is written into a temporary
directory first and renamed into place, so a crash leaves either the whole checkpoint or none. SFT (sft.py) writes
the same layout, its optimizer step counting as the iteration.
"""

import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from trainer import fsdp
from trainer.errors import USER_ERRORS
from vla_actor.checkpoint import load_torch_file, read_json

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^iter_(\d{6,})$")


def write_text(path: Path, text: str) -> None:
    """Writes a text file atomically (temp file + os.replace): readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def outermost_missing(path: Path) -> Path:
    """The directory that `path.mkdir(parents=True)` creates first (`path` itself when its parent exists): what
    to remove to leave the disk as it was."""
    while not path.parent.exists():
        path = path.parent
    return path


@contextmanager
def new_run_directory(run_dir: Path, remove_on_failure: bool) -> Iterator[None]:
    """Around a run that creates `run_dir` (with `remove_on_failure`: a new run, on the rank that writes): when
    the block ends in a user error or Ctrl-C before the run saved its first checkpoint, the directories it created
    are removed, since a run without a checkpoint cannot be resumed and would only block the same command
    ("already exists"). A bug (any other exception) keeps them for the report."""
    created = outermost_missing(run_dir) if remove_on_failure and not run_dir.exists() else None
    try:
        yield
    except (*USER_ERRORS, KeyboardInterrupt):
        if created is not None and not checkpoint_dirs(run_dir):
            shutil.rmtree(created, ignore_errors=True)
        raise


def default_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=checkpoint_iteration)


def checkpoint_iteration(checkpoint: Path) -> int:
    """The iteration a checkpoints/iter_NNNNNN directory was saved after."""
    return int(_CHECKPOINT_DIR.match(checkpoint.name).group(1))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run directory, or a FileNotFoundError saying what is there instead."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({run_dir / CHECKPOINTS}/iter_NNNNNN/); it was stopped "
                                f"before its first save, so start it again under a new --run-name")
    return found[-1]


def resolve_adapter(path: Path) -> Path:
    """An adapter directory from an adapter, checkpoint or run directory."""
    checkpoint = latest_checkpoint(path) if (path / CHECKPOINTS).is_dir() else path
    if (checkpoint / ADAPTER_DIR).is_dir():
        return checkpoint / ADAPTER_DIR
    if (checkpoint / MODEL_DIR).is_dir():
        raise ValueError(f"{checkpoint} holds a fully fine-tuned model, not a LoRA adapter: pass --checkpoint "
                         f"{checkpoint / MODEL_DIR} and no --adapter")
    if path.is_dir():
        return path
    raise FileNotFoundError(f"adapter {path} does not exist; pass an adapter directory, a checkpoint directory "
                            f"(runs/<run>/checkpoints/iter_NNNNNN) or a run directory (runs/<run>)")


def rng_state() -> dict[str, Any]:
    """Every global generator this process samples from, in a form torch.load(weights_only=True) reads back."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, iteration: int, policy: Any, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict[str, Any],
                    rank_rng: list[dict[str, Any]], config: dict[str, Any], keep_last: int,
                    full_state: tuple[dict[str, torch.Tensor], dict | None] | None = None) -> Path:
    """Writes checkpoints/iter_<iteration> atomically and prunes all but the newest `keep_last` (0: keep all).
    With full fine-tuning, `full_state` holds the (model, optimizer) state dicts of `fsdp.full_state`."""
    root = run_dir / CHECKPOINTS
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        _write_checkpoint_files(tmp, policy, optimizer, scheduler, trainer_state, rank_rng, config, full_state)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # drop the half-written copy; the older checkpoints stay
        reason = " ".join(str(error).split())[:200]
        raise OSError(f"writing checkpoint {final} failed ({reason}); make room on {root} (or check the disk) and "
                      f"continue with --resume {run_dir}, which starts from the newest complete checkpoint"
                      ) from error
    os.replace(tmp, final)
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def _write_checkpoint_files(tmp: Path, policy: Any, optimizer: torch.optim.Optimizer,
                            scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict[str, Any],
                            rank_rng: list[dict[str, Any]], config: dict[str, Any],
                            full_state: tuple[dict[str, torch.Tensor], dict | None] | None) -> None:
    if full_state is None:
        policy.save_adapter(tmp / ADAPTER_DIR)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    else:
        model_state, optimizer_state = full_state
        fsdp.write_model(policy, model_state, tmp / MODEL_DIR)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, state in enumerate(rank_rng):
        torch.save(state, tmp / f"rng_rank{rank}.pt")
    write_json(tmp / TRAINER_STATE_FILE, trainer_state)
    write_json(tmp / "config.json", config)


def load_checkpoint(path: Path, policy: Any, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, world_size: int) -> dict[str, Any]:
    """Restores adapter (or full model), optimizer, scheduler and this rank's RNG from `path`; returns
    trainer_state.json. A full model is read by rank 0 and broadcast, so every rank must call this."""
    state = read_json(path / TRAINER_STATE_FILE)
    if state["world_size"] != world_size:
        raise ValueError(f"{path} was written by {state['world_size']} ranks, this job has {world_size}; resume "
                         f"with the same number of processes (torchrun --nproc-per-node)")
    if (path / MODEL_DIR).is_dir():
        reads = rank == 0
        model_state = fsdp.read_model(policy, path / MODEL_DIR) if reads else {}
        optimizer_state = None
        if (path / OPTIMIZER_FILE).is_file():  # mmap: read from disk tensor by tensor as it is restored
            optimizer_state = load_torch_file(path / OPTIMIZER_FILE, mmap=True) if reads else {}
        fsdp.load_full_state(policy.model, optimizer, model_state, optimizer_state, distributed=world_size > 1)
    else:
        policy.load_adapter(path / ADAPTER_DIR)
        device = next(iter(policy.trainable_parameters())).device
        optimizer.load_state_dict(load_torch_file(path / OPTIMIZER_FILE, map_location=device))
    scheduler.load_state_dict(load_torch_file(path / "scheduler.pt"))
    set_rng_state(load_torch_file(path / f"rng_rank{rank}.pt"))
    return state


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Deletes temporary directories a killed run left behind."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(".tmp-iter_*"):
            shutil.rmtree(tmp)
