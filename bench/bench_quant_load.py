"""Peak memory of loading a quantized base (--base-quant), on the CPU: quantizing each layer as it is read
(`load_policy(base_quant=...)`) against loading the whole base in bf16 and quantizing it afterwards.

    python -m bench.bench_quant_load     # -> bench/results/quant_load_cpu.json

A mid-size look-alike checkpoint (a Llama of 8 layers of width 2048, 0.54e9 parameters, 1.09 GB in bf16, one
shard as the released files have ~5 GB shards) is written with the repo's own writer; each (mode, path) then loads
it in a fresh process, and that process's peak resident memory (VmHWM, reset after the imports) above its
resident memory before the load is the load's peak. The GPU's counterpart (device memory of the 7B) is in tests/test_vla_gpu.py and
bench/bench_gpu.py.
"""

from __future__ import annotations

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
from vla_actor.checkpoint import DEFAULT_SHARD_BYTES
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


def load(checkpoint: Path, mode: str, path: str, output: Path) -> None:
    """In a fresh process: load `checkpoint` in bf16 with `mode` along `path`; the measurements go to `output`."""
    torch.set_num_threads(1)
    reset_peak()
    before = memory_status_gib("VmRSS")
    started = time.perf_counter()
    if path == "quantize_while_loading":
        policy = load_policy(checkpoint, dtype=torch.bfloat16, base_quant=mode)
    else:  # the whole base in bf16 first, then each layer replaced by its quantization
        policy = load_policy(checkpoint, dtype=torch.bfloat16)
        if mode != "none":
            for name in quantized_layer_names(policy.model, include_vision=False):
                quantize_layer(policy.model.get_submodule(name), mode)
    seconds = time.perf_counter() - started
    write_json(output, {"peak_gib": memory_status_gib("VmHWM") - before, "model_gib": tensor_gib(policy.model),
                        "resident_after_gib": memory_status_gib("VmRSS") - before, "seconds": seconds})


def measure(checkpoint: Path, mode: str, path: str) -> dict:
    output = checkpoint.parent / f"{mode}_{path}.json"
    process = multiprocessing.get_context("spawn").Process(target=load, args=(checkpoint, mode, path, output))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"bench_quant_load.py: loading with {mode} along {path} failed (exit code "
                         f"{process.exitcode}; its error is printed above)")
    result = json.loads(output.read_text())
    print(f"{mode} {path}: {json.dumps(result)}", flush=True)
    return result


def main(config: QuantLoadConfig) -> dict:
    unknown = set(config.modes) - set(QUANT_MODES[1:])
    if unknown:
        raise SystemExit(f"bench_quant_load.py: --modes takes {', '.join(QUANT_MODES[1:])}, got {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint = make_tiny_checkpoint(Path(workdir) / "midsize", llm_dim=config.llm_dim,
                                          llm_layers=config.llm_layers, llm_heads=config.llm_heads,
                                          dtype=torch.bfloat16, max_shard_bytes=DEFAULT_SHARD_BYTES)
        checkpoint_gib = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / GIB
        bf16 = measure(checkpoint, "none", "quantize_while_loading")
        modes = {mode: {path: measure(checkpoint, mode, path) for path in PATHS} for mode in config.modes}
    results = {"machine": "CPU, 1 thread per load", "torch": torch.__version__, "llm_dim": config.llm_dim,
               "llm_layers": config.llm_layers, "checkpoint_gib": checkpoint_gib, "bf16": bf16, "modes": modes}
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(config.output, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(tyro.cli(QuantLoadConfig))
