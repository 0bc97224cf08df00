"""Where the time of a rollout query and of an update micro-batch goes: torch.profiler over bench_gpu's 7B shape.

On a GPU: the random-weight OpenVLA-7B shape with LoRA r16 under the 24 GiB cap (bench_gpu's builders), profiled
over a few rollout queries (`VLAPolicy.sample`) at batch 8, 16 and 32, a few no-grad pi_old forwards (`log_probs`
without gradients, as `--old-log-probs recompute` runs them) and a few update micro-batches (`log_probs` with
gradients, gradient checkpointing unless --no-gradient-checkpointing, backward, optimizer step). With
`--variants eager compiled` the same policy is then compiled (`VLAPolicy.compile_layers`) and profiled again in the
same run; `--variants eager fused` does the same with the fused kernels (`VLAPolicy.fuse_kernels`, the default of
`train` on CUDA); `--base-quant` profiles a quantized base. `--model tiny` runs every code path on the CPU (the CI
smoke test; there is no GPU timeline then).

    python -m bench.profile_gpu --variants eager compiled --output bench/results/profile_7b.json
    python -m bench.profile_gpu --variants fused --no-gradient-checkpointing --micro-batch 4 \
        --output bench/results/profile_7b_update_graphs.json
    python -m bench.profile_gpu --model tiny --rollout-batches 2 --micro-batch 2 --output /tmp/profile.json

Per variant and phase the JSON has: the unprofiled median wall time per call; from the profiled calls the GPU-busy
time (union of kernel, memcpy and memset intervals) against the wall time, so a host-bound gap shows as
`gpu_idle_share`; kernel launches, CUDA-graph launches and host synchronizations per call; the host and GPU time of
the phases the policy names (`OpenVLAModel.vision`, `VisionGraph.capture` / `.replay`, `GraphDecoder.prefill` /
`.capture` / `.replay`, ...); the top kernels by GPU time and the top operators by host time. `<output>.txt` holds
the same as profiler tables.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import tyro
from torch.profiler import ProfilerActivity, profile, record_function

from bench.bench_gpu import (BenchConfig, Batch, build_policy, device_of, forward_shape, observations, rollout,
                             sampled, set_memory_cap, synchronize, timed, update)
from trainer.checkpoint import write_json
from vla_actor.policy import VLAPolicy

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
# Runtime calls after which the host waits for the GPU: explicit synchronizations and the blocking copies that
# PyTorch follows with a stream synchronization (tensor.to(device) from pageable memory, .cpu(), .item()).
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
CALL_LABEL = "profile_gpu.call"


@dataclass
class ProfileConfig:
    """What to profile; the rest (memory cap, LoRA rank, temperature, seed) is bench_gpu's documented run."""

    model: Literal["7b", "tiny"] = "7b"
    """"7b": random-weight OpenVLA-7B shape on CUDA; "tiny": look-alike checkpoint on the CPU (smoke test)."""
    variants: tuple[Literal["eager", "fused", "compiled"], ...] = ("eager",)
    """Profiled in this order on the same policy; "fused" applies VLAPolicy.fuse_kernels (CUDA, liger-kernel),
    "compiled" VLAPolicy.compile_layers (so either comes after "eager"; not both, as `train` never runs both)."""
    rollout_batches: tuple[int, ...] = (8, 16, 32)
    """Observations per rollout query, one phase each: what stays fixed as the batch grows is the cost per call."""
    micro_batch: int = 16
    """Samples per update micro-batch (and per pi_old forward)."""
    cuda_graphs: bool = True
    """Vision towers and decode steps replayed from CUDA graphs (VLAPolicy.cuda_graphs, the default);
    --no-cuda-graphs: eager."""
    gradient_checkpointing: bool = True
    """The update micro-batch with gradient checkpointing (the default of `train`); --no-gradient-checkpointing
    profiles it without, where its Llama forward and backward replay from the kept training graph on CUDA
    (VLAPolicy.graph_update) unless --no-graph-update."""
    graph_update: bool = True
    """Without gradient checkpointing, the update's Llama stack replayed from CUDA graphs (`train --graph-update`);
    --no-graph-update: eager."""
    calls: int = 3
    """Profiled calls per phase (after the warm-up calls)."""
    warmup_calls: int = 2
    """Unprofiled calls per phase first (compilation, CUDA-graph and allocator warm-up)."""
    output: Path = Path("bench/results/profile_7b.json")
    """The JSON summary; the profiler tables go to the same name with .txt."""
    timed_calls: int = 5
    """Unprofiled, synchronized calls whose median wall time is reported (the profiler adds host overhead)."""
    top: int = 25
    """Rows of the top-kernel and top-operator lists."""
    trace_dir: Path | None = None
    """Keep each phase's Chrome trace (chrome://tracing, Perfetto) here; None: summarized, then deleted."""
    base_quant: Literal["none", "int8", "nf4", "fp8", "fp8-dynamic"] = "none"
    """The frozen base stored as `train --base-quant` stores it (vla_actor.quant)."""


def phase_calls(config: ProfileConfig, bench: BenchConfig, policy: VLAPolicy,
                rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    """Phase name -> one call: a rollout query, a no-grad pi_old forward, an update micro-batch with its step."""
    temperature = bench.temperature
    rows = sampled(policy, config.micro_batch, config.micro_batch, rng, temperature)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)

    shape = forward_shape(policy, config.micro_batch)

    def pi_old() -> None:
        with torch.no_grad():
            policy.log_probs(**rows.rows(slice(None)), token_ids=rows.token_ids, temperature=temperature, **shape)

    def rollout_query(size: int) -> Callable[[], object]:
        queries = observations(policy, size, rng)
        return lambda: rollout(policy, Batch(**queries.rows(slice(None))), temperature)

    return {
        **{f"rollout_batch{size}": rollout_query(size) for size in config.rollout_batches},
        "pi_old_forward": pi_old,
        "update_micro_batch": lambda: update(policy, optimizer, rows, config.micro_batch, temperature),
    }


def trace_summary(trace: dict, calls: int, top: int) -> dict:
    """Per-call GPU-busy time, launches, synchronizations, named phases and top kernels from a Chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    work = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK)
    busy_us, end = 0.0, float("-inf")
    for start, stop in work:  # union of the intervals: concurrent streams are counted once
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    runtime = Counter(e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver"))
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "kernel":
            kernels[event["name"]].append(event["dur"])
    labels: dict[str, dict[str, float]] = defaultdict(lambda: {"cpu_ms_per_call": 0.0, "gpu_ms_per_call": 0.0})
    for event in events:
        side = {"user_annotation": "cpu_ms_per_call", "gpu_user_annotation": "gpu_ms_per_call"}.get(event.get("cat"))
        if side is not None and event["name"] != CALL_LABEL:
            labels[event["name"]][side] += event["dur"] / 1e3 / calls
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in HOST_SYNCS]
    return {
        "gpu_busy_s_per_call": busy_us / 1e6 / calls,
        "gpu_kernel_s_per_call": sum(sum(durations) for durations in kernels.values()) / 1e6 / calls,
        "kernels_per_call": sum(len(durations) for durations in kernels.values()) / calls,
        "kernel_launches_per_call": sum(runtime[name] for name in KERNEL_LAUNCHES) / calls,
        "graph_launches_per_call": sum(runtime[name] for name in GRAPH_LAUNCHES) / calls,
        "host_syncs_per_call": {name: runtime[name] / calls for name in HOST_SYNCS if runtime[name]},
        "host_syncs_by_caller": {caller: count / calls for caller, count in sync_callers(events, syncs).items()},
        "named_phases": dict(labels),
        "top_kernels_by_gpu_time": [{"name": name[:160], "count_per_call": len(durations) / calls,
                                     "ms_per_call": sum(durations) / 1e3 / calls} for name, durations in ranked],
    }


def sync_callers(events: list[dict], syncs: list[dict]) -> Counter:
    """Each host synchronization named by its innermost named phase and operator (same thread), e.g.
    "GraphDecoder.prefill > aten::_local_scalar_dense": which code made the host wait."""
    ranges = [e for e in events if e.get("cat") in ("user_annotation", "cpu_op") and e["name"] != CALL_LABEL]
    callers = Counter()
    for sync in syncs:
        enclosing = {"user_annotation": None, "cpu_op": None}
        for event in ranges:
            if event["tid"] == sync["tid"] and event["ts"] <= sync["ts"] <= event["ts"] + event["dur"]:
                inner = enclosing[event["cat"]]
                if inner is None or event["ts"] >= inner["ts"]:
                    enclosing[event["cat"]] = event
        callers[" > ".join(e["name"] if e else "-" for e in enclosing.values())] += 1
    return callers


def top_operators(prof: profile, calls: int, top: int) -> list[dict]:
    """Operators by self host time (per call), from the profiler's own aggregation."""
    averages = sorted(prof.key_averages(), key=lambda entry: -entry.self_cpu_time_total)[:top]
    return [{"name": entry.key, "count_per_call": entry.count / calls,
             "self_cpu_ms_per_call": entry.self_cpu_time_total / 1e3 / calls,
             "cpu_ms_per_call": entry.cpu_time_total / 1e3 / calls} for entry in averages]


def profile_phase(config: ProfileConfig, device: torch.device, call: Callable[[], object], name: str,
                  trace_path: Path) -> tuple[dict, str]:
    """Warm-up, the unprofiled median, then `calls` profiled calls: the summary and the profiler tables."""
    for _ in range(config.warmup_calls):
        call()
    wall = timed(device, call, config.timed_calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled_seconds = 0.0
    with profile(activities=activities) as prof:
        for _ in range(config.calls):
            synchronize(device)
            start = time.perf_counter()
            with record_function(CALL_LABEL):
                call()
            synchronize(device)
            profiled_seconds += time.perf_counter() - start
    prof.export_chrome_trace(str(trace_path))
    summary = {"wall_s_per_call": wall, "profiled_wall_s_per_call": profiled_seconds / config.calls,
               **trace_summary(json.loads(trace_path.read_text()), config.calls, config.top)}
    if device.type == "cuda" and summary["kernels_per_call"] == 0:
        raise SystemExit(f"profile_gpu.py: the {name} trace holds no GPU kernels (CUPTI recorded nothing); rerun "
                         f"with --no-cuda-graphs to rule out the CUDA graphs (--trace-dir keeps the traces)")
    summary["gpu_idle_share"] = (1.0 - summary["gpu_busy_s_per_call"] / summary["profiled_wall_s_per_call"]
                                 if device.type == "cuda" else None)
    summary["top_operators_by_host_time"] = top_operators(prof, config.calls, config.top)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = f"== {name}\n{prof.key_averages().table(sort_by=sort_by, row_limit=config.top)}\n"
    print(f"{name}: {json.dumps({k: v for k, v in summary.items() if not k.startswith('top_')})}", flush=True)
    return summary, table


def main(config: ProfileConfig) -> dict:
    if config.variants not in (("eager",), ("fused",), ("compiled",), ("eager", "fused"), ("eager", "compiled")):
        raise SystemExit("profile_gpu.py: --variants is eager, fused, compiled, eager fused or eager compiled (fusing "
                         "and compiling are one-way, and train never runs both)")
    bench = BenchConfig(model=config.model)
    device = device_of(bench)
    torch.manual_seed(bench.seed)
    rng = np.random.default_rng(bench.seed)
    set_memory_cap(device, bench.mem_cap_gib)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "model": config.model, "torch": torch.__version__, "mem_cap_gib": bench.mem_cap_gib,
                     "rollout_batches": list(config.rollout_batches), "micro_batch": config.micro_batch,
                     "calls": config.calls, "cuda_graphs": config.cuda_graphs, "base_quant": config.base_quant,
                     "gradient_checkpointing": config.gradient_checkpointing,
                     "variants": {}}
    tables = []
    with tempfile.TemporaryDirectory() as workdir:
        policy = build_policy(bench, "openvla", Path(workdir), base_quant=config.base_quant)
        policy.gradient_checkpointing(config.gradient_checkpointing)
        policy.cuda_graphs = config.cuda_graphs
        policy.graph_update = policy.graph_update and config.graph_update  # False already for a quantized base
        results["graph_update"] = policy.graph_update
        trace_dir = config.trace_dir or Path(workdir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        for variant in config.variants:
            if variant == "compiled":
                policy.compile_layers()
            elif variant == "fused":
                policy.fuse_kernels()
            phases = {}
            for phase, call in phase_calls(config, bench, policy, rng).items():
                name = f"{variant}/{phase}"
                phases[phase], table = profile_phase(config, device, call, name,
                                                     trace_dir / f"{variant}_{phase}.json")
                tables.append(table)
            results["variants"][variant] = phases
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(config.output, results)
    config.output.with_suffix(".txt").write_text("".join(tables))
    return results


if __name__ == "__main__":
    main(tyro.cli(ProfileConfig))
