"""Peak memory of loading a quantized base (--base-quant), on the CPU: quantizing each layer as it is read
(`load_policy(base_quant=...)`) against loading the whole base in bf16 and quantizing it afterwards.

    python -m bench.bench_quant_load     # -> bench/results/quant_load_cpu.json

A mid-size look-alike checkpoint (a Llama of 8 layers of width 2048: 0.55e9 parameters, 1.02 GiB in bf16, in
256 MiB shards) is written with the repo's own writer; each (allocator setting, mode, path) then loads it in a
fresh process, and that process's peak resident memory (VmHWM, reset after the imports) above its resident memory
before the load is the load's peak. The GPU's counterpart (device memory of the 7B) is in tests/test_vla_gpu.py and
bench/bench_gpu.py.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from trainer.checkpoint import write_json
from vla_actor import load_policy, make_tiny_checkpoint
from vla_actor.quant import QUANT_MODES, is_quantized, quantize_layer, quantized_layer_names

GIB = 2**30
PATHS = ("quantize_while_loading", "load_then_quantize")


@dataclass
class QuantLoadConfig:
    """What to load; the defaults are the documented run of BENCHMARKS.md."""

    llm_dim: int = 2048
    """Hidden size of the look-alike's Llama (MLP 11/4 of it)."""
    llm_layers: int = 8
    """Decoder layers of the look-alike's Llama."""
    llm_heads: int = 16
    """Attention heads of the look-alike's Llama."""
    shard_mib: int = 256
    """Shard size limit of the written checkpoint: the loader maps one shard at a time, and the pages of it that
    were read count as resident until it is closed (clean file pages the kernel may drop, unlike the model's)."""
    modes: tuple[str, ...] = ("int8", "nf4")
    """--base-quant modes measured (bf16 with no quantization is measured too)."""
    output: Path = Path("bench/results/quant_load_cpu.json")
    """Where the result JSON goes."""


def memory_status_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last `reset_peak`) of this process, from Linux's
    /proc/self/status. Not getrusage's ru_maxrss: a spawned process's carries its parent's resident size at the
    fork over the exec."""
    match = re.search(rf"^{field}:\s+(\d+) kB$", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    return int(match.group(1)) * 1024 / GIB


def reset_peak() -> None:
    """Linux: the peak resident size (VmHWM) starts again from the current one."""
    Path("/proc/self/clear_refs").write_text("5")


def tensor_gib(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers, a torchao weight counted by its inner tensors."""
    def nbytes(tensor: torch.Tensor) -> int:
        if is_quantized(tensor):
            names, _ = tensor.__tensor_flatten__()
            return sum(nbytes(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    return sum(nbytes(t) for t in (*model.parameters(), *model.buffers())) / GIB


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter: allocations from this size on are mapped on their own and unmapped when freed."""
ALLOCATORS = {"glibc_default": None, "mmap_threshold_1mib": 2**20}
"""glibc's default raises its mmap threshold up to 32 MiB as large blocks are freed, so freed bf16 weights stay in
the heap as holes that the smaller quantized tensors fill only in part; a fixed 1 MiB threshold returns each freed
tensor, which leaves the loader's own footprint."""


def load(checkpoint: Path, mode: str, path: str, mmap_threshold: int | None, output: Path) -> None:
    """In a fresh process: load `checkpoint` in bf16 with `mode` along `path`; the measurements go to `output`."""
    torch.set_num_threads(1)
    if mmap_threshold is not None:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    reset_peak()
    before = memory_status_gib("VmRSS")
    started = time.perf_counter()
    if path == "quantize_while_loading":
        policy = load_policy(checkpoint, dtype=torch.bfloat16, base_quant=mode)
    else:  # the whole base in bf16 first, then each layer replaced by its quantization
        policy = load_policy(checkpoint, dtype=torch.bfloat16)
        if mode != "none":
            for name in quantized_layer_names(policy.model, include_vision=False):
                policy.model.set_submodule(name, quantize_layer(policy.model.get_submodule(name), mode))
    seconds = time.perf_counter() - started
    write_json(output, {"peak_gib": memory_status_gib("VmHWM") - before, "model_gib": tensor_gib(policy.model),
                        "resident_after_gib": memory_status_gib("VmRSS") - before, "seconds": seconds})


def measure(checkpoint: Path, mode: str, path: str, allocator: str) -> dict:
    output = checkpoint.parent / f"{mode}_{path}_{allocator}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=load, args=(checkpoint, mode, path, ALLOCATORS[allocator], output))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"bench_quant_load.py: loading with {mode} along {path} failed (exit code "
                         f"{process.exitcode}; its error is printed above)")
    result = json.loads(output.read_text())
    print(f"{allocator} {mode} {path}: {json.dumps(result)}", flush=True)
    return result


def main(config: QuantLoadConfig) -> dict:
    unknown = set(config.modes) - set(QUANT_MODES[1:])
    if unknown:
        raise SystemExit(f"bench_quant_load.py: --modes takes {', '.join(QUANT_MODES[1:])}, got {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = make_tiny_checkpoint(Path(workdir) / "midsize", llm_dim=config.llm_dim,
                                          llm_layers=config.llm_layers, llm_heads=config.llm_heads,
                                          dtype=torch.bfloat16, max_shard_bytes=config.shard_mib * 2**20)
        checkpoint_gib = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / GIB
        allocators = {allocator: {"bf16": measure(checkpoint, "none", PATHS[0], allocator),
                                  "modes": {mode: {path: measure(checkpoint, mode, path, allocator) for path in PATHS}
                                            for mode in config.modes}}
                      for allocator in ALLOCATORS}
    results = {"machine": "CPU, 1 thread per load", "torch": torch.__version__, "llm_dim": config.llm_dim,
               "llm_layers": config.llm_layers, "shard_mib": config.shard_mib, "checkpoint_gib": checkpoint_gib,
               "allocators": allocators}
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(config.output, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(tyro.cli(QuantLoadConfig))
