"""7B-shape rollout and update benchmark under a 24 GiB cap, against the seed-style per-sample baseline.

On a GPU: the full OpenVLA-7B shape (all 982 tensors, random bf16 weights created on the card, no file) with
LoRA r16 on every linear layer of the LLM, capped with torch.cuda.set_per_process_memory_fraction. With
`--model tiny` it runs every code path on the CPU with a look-alike checkpoint (the CI smoke test).

    python -m bench.bench_gpu --output bench/results/gpu_7b.json
    python -m bench.bench_gpu --base-quant int8 nf4 fp8   # bf16 vs quantized bases -> gpu_7b_quant.json
    python -m bench.bench_gpu --compile-layers            # then the same policy compiled -> "compiled" in the JSON

With `--base-quant` it measures instead the frozen base stored quantized (vla_actor.quant) against bf16 in the
same run, on the same inputs, each mode in a fresh process: per mode the full-iteration peak and rates under
`--quant-mem-cap-gib` (16), the log-prob difference to bf16, and the largest rollout batch under `--mem-cap-gib`
(24).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np

# Set before the first CUDA allocation: rollout (KV cache) and update (activations) alternate, and without
# expandable segments the freed blocks fragment the 24 GiB cap.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402
import tyro
from safetensors.torch import load_file, save_file

import grpo
from trainer.checkpoint import write_json
from vla_actor import LoraSettings, load_policy, make_tiny_checkpoint
from vla_actor.openvla_7b import random_7b_policy
from vla_actor.policy import VLAPolicy
from vla_actor.quant import check_base_quant

INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
)
GIB = 2**30
# OFT inputs measured: name -> (images per observation, proprio token, description)
OFT_SETUPS = {
    "2img_proprio": (2, True, "agentview + wrist images + proprio token (the OpenVLA-OFT LIBERO recipe)"),
    "1img": (1, False, "agentview image only, no proprio (SimpleVLA-RL's LIBERO setting)"),
}


@dataclass
class BenchConfig:
    """What to measure; the defaults are the documented run of BENCHMARKS.md."""

    model: Literal["7b", "tiny"] = "7b"
    """"7b": random-weight OpenVLA-7B shape on CUDA; "tiny": look-alike checkpoint on the CPU (smoke test)."""
    mem_cap_gib: float = 24.0
    """Per-process GPU memory cap emulating the 24 GB card."""
    rollout_batches: tuple[int, ...] = (8, 16, 32, 48, 64)
    """Batch sizes tried for batched sampling; the largest that fits and is fastest is reported."""
    oft_batches: tuple[int, ...] = (8, 16, 32)
    """Batch sizes tried for the OFT chunk mode (one forward per 8 actions)."""
    oft_setups: tuple[Literal["2img_proprio", "1img"], ...] = ("2img_proprio", "1img")
    """OFT inputs measured (see OFT_SETUPS); the fastest is reported as oft_actions_per_s."""
    micro_batches: tuple[int, ...] = (4, 8, 16)
    """Micro-batch sizes tried for the update with gradient checkpointing."""
    no_checkpoint_micro_batches: tuple[int, ...] = ()
    """Micro-batch sizes also tried for the update without gradient checkpointing (every layer keeps its
    activations, so the backward pass runs no second forward; results under update_curve_no_checkpointing). With
    --fused-kernels or --compile-layers they are measured under the lever instead, with the trainer's recomputed
    pi_old, beside the checkpointed --micro-batches (update_curve_with_pi_old), the Llama stack replayed from the
    kept training graphs where the trainer would (VLAPolicy.graph_update; not compiled blocks,
    update_curve_no_checkpointing_with_pi_old) and eagerly (update_curve_no_checkpointing_eager_with_pi_old)."""
    mini_batch: int = 64
    """Samples (env steps) per optimizer step in our update."""
    seed_samples: int = 16
    """Samples timed for the per-sample baseline update (one optimizer step each)."""
    repeats: int = 5
    """Timed calls per rollout measurement (after one warm-up call)."""
    iteration_steps: int = 4
    """Env steps of the rollout batch in the full-iteration memory run."""
    temperature: float = 1.6
    """Sampling temperature (SimpleVLA-RL's LIBERO setting)."""
    lora_rank: int = 16
    """LoRA rank on every linear layer of the LLM (alpha = rank)."""
    output: Path = Path("bench/results/gpu_7b.json")
    """Where the result JSON goes."""
    seed: int = 0
    """Seed for weights, images and sampling."""
    skip_oft: bool = False
    """Skip the OFT chunk-mode measurement."""
    iteration_batch: int = 16
    """Rollout batch of the full-iteration memory run (optimizer state is resident then)."""
    base_quant: tuple[Literal["int8", "nf4", "fp8", "fp8-dynamic"], ...] = ()
    """Quantized-base modes to compare with bf16 (measured first, in the same run); empty: the standard bench."""
    base_quant_vision: bool = False
    """With --base-quant: also quantize the ViTs' linear layers."""
    quant_mem_cap_gib: float = 16.0
    """Memory cap of the quantized-base iteration, rollout and update measurements (the 16 GB card)."""
    quant_rollout_batches: tuple[int, ...] = (16, 32, 64, 96, 128)
    """Rollout batches tried under --mem-cap-gib per quantized-base mode; the largest that fits is reported."""
    quant_output: Path = Path("bench/results/gpu_7b_quant.json")
    """Where the --base-quant comparison JSON goes."""
    compile_layers: bool = False
    """After the eager measurements, compile the same policy (VLAPolicy.compile_layers) and measure it again: the
    rollout curve, the update at the best micro-batch, the compile warm-up and the log-prob difference to eager
    (results under "compiled"); OFT: the actions/s at each setup's best batch (compiled_actions_per_s)."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """torch.compile backend of --compile-layers; aot_eager (no generated kernels) keeps the CPU smoke test quick."""
    fused_kernels: bool = False
    """After the eager measurements, swap in the fused kernels (VLAPolicy.fuse_kernels) and measure
    again as --compile-layers does (results under "fused"; CUDA only, not together with --compile-layers). With
    --base-quant: every mode, bf16 included, runs with the fused kernels throughout."""


def device_of(config: BenchConfig) -> torch.device:
    if config.model == "tiny":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py --model 7b needs a CUDA GPU; use --model tiny for the CPU smoke run")
    return torch.device("cuda", torch.cuda.current_device())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def build_policy(config: BenchConfig, variant: str, workdir: Path, num_images: int = 1,
                 use_proprio: bool = False, base_quant: str = "none") -> VLAPolicy:
    """The policy under test with LoRA applied (on the base quantized by `base_quant` as it is built); num_images /
    use_proprio are OFT's inputs."""
    device = device_of(config)
    if config.model == "tiny":
        path = make_tiny_checkpoint(workdir / f"{variant}_{num_images}_{use_proprio}", variant=variant,
                                    seed=config.seed, num_images=num_images, use_proprio=use_proprio)
        policy = load_policy(path, unnorm_key="libero_spatial", device=device, dtype=torch.float32,
                             base_quant=base_quant, base_quant_vision=config.base_quant_vision)
    else:
        torch.manual_seed(config.seed)
        policy = random_7b_policy(device, torch.bfloat16, variant=variant, num_images=num_images,
                                  use_proprio=use_proprio, base_quant=base_quant,
                                  base_quant_vision=config.base_quant_vision)
    policy.apply_lora(LoraSettings(rank=config.lora_rank, alpha=config.lora_rank))
    return policy


@dataclass
class Batch:
    """Observations plus sampled tokens: the rows of one update."""

    images: np.ndarray
    wrist: np.ndarray | None
    proprio: np.ndarray | None
    instructions: list[str]
    token_ids: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None

    def rows(self, index: slice) -> dict:
        return dict(images=self.images[index], instructions=self.instructions[index],
                    wrist=None if self.wrist is None else self.wrist[index],
                    proprio=None if self.proprio is None else self.proprio[index])


def concatenate(batches: list[Batch]) -> Batch:
    """Rows of several sampled batches as one (OpenVLA mode: one image, no proprio)."""
    return Batch(images=np.concatenate([b.images for b in batches]), wrist=None, proprio=None,
                 instructions=[text for b in batches for text in b.instructions],
                 token_ids=torch.cat([b.token_ids for b in batches]),
                 old_log_probs=torch.cat([b.old_log_probs for b in batches]))


def observations(policy: VLAPolicy, size: int, rng: np.random.Generator) -> Batch:
    images = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8) if policy.num_images == 2 else None
    proprio = rng.normal(size=(size, 8)).astype(np.float32) if policy.uses_proprio else None
    return Batch(images, wrist, proprio, [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(size)])


def rollout(policy: VLAPolicy, batch: Batch, temperature: float) -> Batch:
    out = policy.sample(**batch.rows(slice(None)), temperature=temperature)
    batch.token_ids, batch.old_log_probs = out.token_ids, out.log_probs
    return batch


def actions_per_second(config: BenchConfig, policy: VLAPolicy, batch_size: int, rng: np.random.Generator) -> float:
    batch = observations(policy, batch_size, rng)
    seconds = timed(policy.device, lambda: rollout(policy, batch, config.temperature), config.repeats)
    actions_per_query = policy.tokens_per_query // policy.action_dim
    return batch_size * actions_per_query / seconds


def update(policy: VLAPolicy, optimizer: torch.optim.Optimizer, batch: Batch, micro_batch: int,
           temperature: float) -> dict[str, float]:
    """One optimizer step over all rows of `batch`, accumulated over micro-batches (the trainer's update)."""
    rows = len(batch.instructions)
    mask = torch.ones(rows, policy.tokens_per_query, dtype=torch.bool)
    weights = grpo.token_weights(mask, torch.arange(rows))
    advantages = torch.from_numpy(np.where(np.arange(rows) % 2 == 0, 1.0, -1.0).astype(np.float32))
    device = policy.device
    shape = forward_shape(policy, micro_batch)
    optimizer.zero_grad(set_to_none=True)
    with policy.training_mode():
        for start in range(0, rows, micro_batch):
            index = slice(start, start + micro_batch)
            log_probs, _ = policy.log_probs(**batch.rows(index), token_ids=batch.token_ids[index],
                                            temperature=temperature, **shape)
            inputs = [part.to(device, non_blocking=True)  # as the trainer copies them (VLAPolicy._on_device)
                      for part in (batch.old_log_probs[index], advantages[index], weights[index], mask[index])]
            loss, _ = grpo.policy_loss(log_probs, *inputs)
            loss.backward()
    # the optimizer's list, as the trainer keeps its own: trainable_parameters() walks every module
    grad_norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return {"grad_norm": float(grad_norm)}


def forward_shape(policy: VLAPolicy, micro_batch: int) -> dict[str, int]:
    """`log_probs`' padding of the update's forwards, as the trainer's: `micro_batch` rows, prompts padded to the
    longest of INSTRUCTIONS (the trainer: of its suite's tasks), so every one has one shape."""
    return {"pad_to": micro_batch, "prompt_length": policy.longest_prompt(INSTRUCTIONS)}


def recomputed_pi_old(policy: VLAPolicy, batch: Batch, micro_batch: int, temperature: float) -> torch.Tensor:
    """pi_old as the trainer recomputes it (--old-log-probs recompute) for every mini-batch but an iteration's
    first, whose gradient pass gives its own: a no-grad forward over the rows in the update's micro-batches."""
    parts, shape = [], forward_shape(policy, micro_batch)
    with torch.no_grad():
        for start in range(0, len(batch.instructions), micro_batch):
            index = slice(start, start + micro_batch)
            log_probs, _ = policy.log_probs(**batch.rows(index), token_ids=batch.token_ids[index],
                                            temperature=temperature, **shape)
            parts.append(log_probs.float())
    return torch.cat(parts).cpu()  # one copy back: each would wait for the GPU to finish


def samples_per_second(policy: VLAPolicy, optimizer: torch.optim.Optimizer, batch: Batch, step_rows: int,
                       micro_batch: int, temperature: float, pi_old: bool = False) -> float:
    """Samples/s of updates that take an optimizer step every `step_rows` rows (after one warm-up step); `pi_old`:
    each step's rows first get the trainer's recomputed pi_old, timed with it."""
    device = policy.device

    def run(rows: slice) -> None:
        for start in range(rows.start, rows.stop, step_rows):
            part = slice(start, start + step_rows)
            step = Batch(**batch.rows(part), token_ids=batch.token_ids[part], old_log_probs=batch.old_log_probs[part])
            if pi_old:
                step = replace(step, old_log_probs=recomputed_pi_old(policy, step, micro_batch, temperature))
            update(policy, optimizer, step, micro_batch, temperature)

    total = len(batch.instructions)
    run(slice(0, step_rows))
    synchronize(device)
    start = time.perf_counter()
    run(slice(0, total))
    synchronize(device)
    return total / (time.perf_counter() - start)


def is_oom(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def try_measure(device: torch.device, fn: Callable[[], float | dict]) -> float | dict | None:
    """fn() or None when it does not fit under the cap."""
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_oom(error):
            raise
        reset_peak(device)
        return None


def sampled(policy: VLAPolicy, rows: int, batch_size: int, rng: np.random.Generator, temperature: float) -> Batch:
    """`rows` sampled observations, queried `batch_size` at a time."""
    return concatenate([rollout(policy, observations(policy, batch_size, rng), temperature)
                        for _ in range(-(-rows // batch_size))])


def rollout_curve(config: BenchConfig, policy: VLAPolicy, sizes: tuple[int, ...], rng: np.random.Generator,
                  label: str) -> dict:
    """Batch size -> actions/s and peak GiB (None where the batch does not fit under the cap). Each size starts with
    no kept CUDA graphs, so its peak holds its own graphs only (a dropped graph's pool is handed back lazily, and a
    lowered cap does not free it)."""
    curve = {}
    for size in sizes:
        policy.release_graphs()
        reset_peak(policy.device)
        rate = try_measure(policy.device, lambda: actions_per_second(config, policy, size, rng))
        curve[str(size)] = None if rate is None else {"actions_per_s": rate, "peak_gib": peak_gib(policy.device)}
        print(f"{label} batch {size}: {curve[str(size)]}", flush=True)
    return curve


def best_of(curve: dict, key: str, what: str) -> int:
    fitting = {int(size): point[key] for size, point in curve.items() if point is not None}
    if not fitting:
        raise SystemExit(f"no {what} fits under the memory cap")
    return max(fitting, key=fitting.get)


def bench_openvla(config: BenchConfig, workdir: Path, rng: np.random.Generator) -> dict:
    policy = build_policy(config, "openvla", workdir)
    device = policy.device
    results: dict = {"weights_gib": torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)

    # Seed style, eager: 1. one observation per call; 4. micro-batch 1 with an optimizer step per sample.
    policy.cuda_graphs = False
    results["rollout_actions_per_s_seed"] = actions_per_second(config, policy, 1, rng)
    policy.cuda_graphs = True
    seed_data = sampled(policy, config.seed_samples, 8, rng, config.temperature)
    reset_peak(device)
    results["update_samples_per_s_seed"] = samples_per_second(policy, optimizer, seed_data, 1, 1, config.temperature)
    results["update_peak_gib_seed"] = peak_gib(device)
    print({k: v for k, v in results.items()}, flush=True)

    # 2. Ours: batched sampling, the curve over batch sizes.
    curve = rollout_curve(config, policy, config.rollout_batches, rng, "rollout")
    best_batch = best_of(curve, "actions_per_s", "rollout batch")
    results.update(rollout_curve=curve, rollout_batch=best_batch,
                   rollout_actions_per_s=curve[str(best_batch)]["actions_per_s"],
                   graph_captures=policy.graph_captures)
    # The same batch with the vision towers and decode steps run eagerly: what the CUDA graphs gain.
    policy.cuda_graphs = False
    policy.release_graphs()
    reset_peak(device)
    results["rollout_actions_per_s_without_cuda_graphs"] = try_measure(
        device, lambda: actions_per_second(config, policy, best_batch, rng))
    policy.cuda_graphs = True
    print(f"rollout batch {best_batch}, without CUDA graphs: {results['rollout_actions_per_s_without_cuda_graphs']}",
          flush=True)

    # 7. Rollout (no grad, KV cache) vs update (teacher-forced, checkpointed) log-probs, same dtype.
    policy.gradient_checkpointing(True)
    probe = rollout(policy, observations(policy, 16, rng), config.temperature)
    new_log_probs, _ = policy.log_probs(**probe.rows(slice(None)), token_ids=probe.token_ids,
                                        temperature=config.temperature)
    mismatch = (new_log_probs.detach().float().cpu() - probe.old_log_probs).abs()
    results.update(logprob_mismatch=float(mismatch.mean()), logprob_mismatch_max=float(mismatch.max()))
    del new_log_probs

    # 5. Ours: accumulation over micro-batches with gradient checkpointing, one step per mini-batch.
    update_curve = micro_batch_curve(config, policy, optimizer, min(best_batch, 16), rng)
    best_micro = best_of(update_curve, "samples_per_s", "update micro-batch")
    results.update(update_curve=update_curve, update_micro_batch=best_micro,
                   update_samples_per_s=update_curve[str(best_micro)]["samples_per_s"],
                   update_mini_batch=config.mini_batch)
    # The same update with the vision towers run eagerly: what replaying the rollout's kept vision graph gains.
    policy.cuda_graphs = False
    policy.release_graphs()
    results["update_samples_per_s_eager_vision"] = try_measure(device, lambda: samples_per_second(
        policy, optimizer, sampled(policy, config.mini_batch, min(best_batch, 16), rng, config.temperature),
        config.mini_batch, best_micro, config.temperature))
    policy.cuda_graphs = True
    print(f"update micro-batch {best_micro}, eager vision: {results['update_samples_per_s_eager_vision']}",
          flush=True)
    if config.no_checkpoint_micro_batches and not (config.compile_layers or config.fused_kernels):
        policy.gradient_checkpointing(False)
        results["update_curve_no_checkpointing"] = micro_batch_curve(
            config, policy, optimizer, min(best_batch, 16), rng, config.no_checkpoint_micro_batches)
        policy.gradient_checkpointing(True)

    # 6. A full iteration with the optimizer state resident: rollout for a few env steps, then the update.
    results.update(iteration_peak(config, policy, optimizer, best_micro, rng))
    if config.compile_layers:
        results["compiled"] = lever_rates(config, policy, optimizer, probe, curve, best_micro, rng,
                                          lambda: policy.compile_layers(config.compile_backend), "compile")
    if config.fused_kernels:
        results["fused"] = lever_rates(config, policy, optimizer, probe, curve, best_micro, rng,
                                       policy.fuse_kernels, "fused")
    del policy, optimizer, seed_data, probe
    reset_peak(device)
    return results


def lever_rates(config: BenchConfig, policy: VLAPolicy, optimizer: torch.optim.Optimizer, probe: Batch,
                eager_curve: dict, micro_batch: int, rng: np.random.Generator, apply: Callable[[], None],
                name: str) -> dict:
    """A lever that changes the policy's modules in place (`apply`: VLAPolicy.compile_layers, fuse_kernels) against
    the eager numbers of this run: the rollout curve over the batches that fit eagerly and the update at the eager
    best micro-batch, the first calls' warm-up (compilation) as `<name>_warmup_s`."""
    with torch.no_grad():
        eager_log_probs, _ = policy.log_probs(**probe.rows(slice(None)), token_ids=probe.token_ids,
                                              temperature=config.temperature)
    apply()
    device = policy.device
    synchronize(device)
    start = time.perf_counter()  # the first calls compile: rollout (prefill, decode step), pi_old and the update
    played = rollout(policy, observations(policy, len(probe.instructions), rng), config.temperature)
    data = sampled(policy, config.mini_batch, micro_batch, rng, config.temperature)
    with torch.no_grad():
        lever_log_probs, _ = policy.log_probs(**probe.rows(slice(None)), token_ids=probe.token_ids,
                                              temperature=config.temperature)
        teacher_forced, _ = policy.log_probs(**played.rows(slice(None)), token_ids=played.token_ids,
                                             temperature=config.temperature)
    with_gradients, _ = policy.log_probs(**probe.rows(slice(None)), token_ids=probe.token_ids,
                                         temperature=config.temperature)
    ratio_gap = float((with_gradients.detach() - lever_log_probs).abs().max())  # eager: 0 (test_vla_gpu.py)
    del with_gradients
    update(policy, optimizer, data, micro_batch, config.temperature)
    synchronize(device)
    results: dict = {f"{name}_warmup_s": time.perf_counter() - start}
    difference = (lever_log_probs - eager_log_probs).abs().float()
    mismatch = (teacher_forced.float().cpu() - played.old_log_probs).abs()
    results.update(logprob_diff_vs_eager={"mean": float(difference.mean()), "max": float(difference.max())},
                   logprob_mismatch=float(mismatch.mean()), logprob_mismatch_max=float(mismatch.max()),
                   pi_old_vs_update_max=ratio_gap)
    fitting = tuple(int(size) for size, point in eager_curve.items() if point is not None)
    curve = rollout_curve(config, policy, fitting, rng, f"{name} rollout")
    best = fastest(curve, "actions_per_s")
    reset_peak(device)
    rate = try_measure(device, lambda: samples_per_second(policy, optimizer, data, config.mini_batch, micro_batch,
                                                          config.temperature))
    results.update(rollout_curve=curve, rollout_batch=best,
                   rollout_actions_per_s=None if best is None else curve[str(best)]["actions_per_s"],
                   update_micro_batch=micro_batch, update_samples_per_s=rate,
                   update_peak_gib=None if rate is None else peak_gib(device))
    if config.no_checkpoint_micro_batches:  # the trainer's update (pi_old recomputed) with and without checkpoints
        results["update_curve_with_pi_old"] = micro_batch_curve(config, policy, optimizer, 16, rng, pi_old=True)
        policy.gradient_checkpointing(False)
        results["update_curve_no_checkpointing_with_pi_old"] = micro_batch_curve(
            config, policy, optimizer, 16, rng, config.no_checkpoint_micro_batches, pi_old=True)
        graphed, policy.graph_update = policy.graph_update, False
        results["update_curve_no_checkpointing_eager_with_pi_old"] = micro_batch_curve(
            config, policy, optimizer, 16, rng, config.no_checkpoint_micro_batches, pi_old=True)
        policy.graph_update = graphed
        policy.gradient_checkpointing(True)
    print(f"{name}: {json.dumps({k: v for k, v in results.items() if k != 'rollout_curve'})}", flush=True)
    return results


def micro_batch_curve(config: BenchConfig, policy: VLAPolicy, optimizer: torch.optim.Optimizer, rollout_batch: int,
                      rng: np.random.Generator, micro_batches: tuple[int, ...] | None = None,
                      pi_old: bool = False) -> dict:
    """Micro-batch size (config.micro_batches unless given) -> update samples/s and peak GiB (one step per
    mini-batch, the policy's gradient checkpointing as set, with the recomputed pi_old where `pi_old`; None where it
    does not fit under the cap)."""
    device = policy.device
    data = sampled(policy, config.mini_batch, rollout_batch, rng, config.temperature)
    curve = {}
    for micro in micro_batches or config.micro_batches:
        reset_peak(device)
        rate = try_measure(device, lambda: samples_per_second(policy, optimizer, data, config.mini_batch, micro,
                                                              config.temperature, pi_old))
        curve[str(micro)] = None if rate is None else {"samples_per_s": rate, "peak_gib": peak_gib(device)}
        print(f"update micro-batch {micro}: {curve[str(micro)]}", flush=True)
    return curve


def iteration_peak(config: BenchConfig, policy: VLAPolicy, optimizer: torch.optim.Optimizer, micro_batch: int,
                   rng: np.random.Generator) -> dict:
    """Peak memory of a full iteration with the optimizer state resident: rollout for a few env steps, then the
    update."""
    device = policy.device
    reset_peak(device)
    iteration = sampled(policy, config.iteration_batch * config.iteration_steps, config.iteration_batch, rng,
                        config.temperature)
    for start in range(0, len(iteration.instructions), config.mini_batch):
        part = slice(start, start + config.mini_batch)
        update(policy, optimizer, Batch(**iteration.rows(part), token_ids=iteration.token_ids[part],
                                        old_log_probs=iteration.old_log_probs[part]), micro_batch, config.temperature)
    synchronize(device)
    return dict(iteration_batch=config.iteration_batch, peak_gib_iteration=peak_gib(device),
                peak_reserved_gib_iteration=(torch.cuda.max_memory_reserved(device) / GIB
                                             if device.type == "cuda" else 0.0))


def bench_oft(config: BenchConfig, workdir: Path, rng: np.random.Generator) -> dict:
    """3. OFT chunk mode: one bidirectional forward gives 8 actions per observation, for each input setup."""
    setups = {}
    for name in config.oft_setups:
        num_images, use_proprio, description = OFT_SETUPS[name]
        policy = build_policy(config, "oft", workdir, num_images, use_proprio)
        device = policy.device
        curve = rollout_curve(config, policy, config.oft_batches, rng, f"oft {name}")
        best = best_of(curve, "actions_per_s", f"OFT {name} batch")
        setups[name] = {"description": description, "curve": curve, "batch": best,
                        "actions_per_s": curve[str(best)]["actions_per_s"]}
        levers = {"compiled": config.compile_layers and (lambda: policy.compile_layers(config.compile_backend)),
                  "fused": config.fused_kernels and policy.fuse_kernels}
        for lever, apply in levers.items():  # the same policy changed in place, at the eager best batch
            if apply:
                apply()
                setups[name][f"{lever}_actions_per_s"] = try_measure(
                    device, lambda: actions_per_second(config, policy, best, rng))
                print(f"oft {name} {lever}, batch {best}: {setups[name][f'{lever}_actions_per_s']}", flush=True)
        del policy
        reset_peak(device)
    fastest = max(setups, key=lambda name: setups[name]["actions_per_s"])
    return {"oft_setups": setups, "oft_setup": fastest, "oft_batch": setups[fastest]["batch"],
            "oft_actions_per_s": setups[fastest]["actions_per_s"]}


def set_memory_cap(device: torch.device, gib: float) -> None:
    """Cap this process's CUDA allocations at `gib` (emulating a smaller card); nothing on the CPU."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)


def bench_base_quant(config: BenchConfig, workdir: Path) -> dict:
    """bf16 and each --base-quant mode (LoRA applied, OpenVLA mode), each measured by `measure_base_quant_mode` in a
    fresh process of its own, so nothing one mode leaves on the GPU (or in the allocator's cache) counts in the next
    one's memory."""
    # CUDA needs a fresh interpreter (and gets a fresh CUDA context); on the CPU (the smoke run) a fork is as fresh
    # for memory and skips re-importing the stack
    context = multiprocessing.get_context("spawn" if device_of(config).type == "cuda" else "fork")
    modes: dict = {}
    for mode in ("none", *config.base_quant):
        process = context.Process(target=measure_base_quant_mode,
                                args=(config, mode, workdir, torch.get_num_threads()))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"bench_gpu.py: the --base-quant {mode} measurement failed (exit code "
                             f"{process.exitcode}; its error is printed above)")
        modes["bf16" if mode == "none" else mode] = json.loads((workdir / f"{mode}.json").read_text())
    return {"mem_cap_gib": config.quant_mem_cap_gib, "rollout_mem_cap_gib": config.mem_cap_gib,
            "base_quant_vision": config.base_quant_vision, "modes": modes}


def measure_base_quant_mode(config: BenchConfig, mode: str, workdir: Path, num_threads: int) -> None:
    """One mode of `bench_base_quant`, written to workdir/<mode>.json. Every mode draws the same observations (same
    seed); bf16 (measured first) samples the probe's tokens into workdir, and each mode's log-probs of those tokens
    give its difference to bf16 (a fresh adapter is zero, so it is the base's difference). The largest rollout batch
    is found under --mem-cap-gib, then the rollout and update rates and the iteration peak under
    --quant-mem-cap-gib (None where nothing fits); bf16, whose weights alone nearly fill 16 GiB, under --mem-cap-gib,
    the card it is made for."""
    torch.set_num_threads(num_threads)
    device = device_of(config)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.default_rng(config.seed)
    set_memory_cap(device, config.mem_cap_gib)
    policy = build_policy(config, "openvla", workdir, base_quant=mode)
    if config.fused_kernels:
        policy.fuse_kernels()
    results: dict = {"weights_gib": torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0,
                     "build_peak_gib": peak_gib(device), "fused_kernels": config.fused_kernels}
    probe = observations(policy, 16, rng)
    probe_path = workdir / "probe_tokens.safetensors"
    if mode == "none":
        rollout(policy, probe, config.temperature)
        save_file({"token_ids": probe.token_ids.cpu(), "log_probs": probe.old_log_probs.cpu()}, probe_path)
    else:
        sampled_probe = load_file(probe_path)
        probe.token_ids, probe.old_log_probs = sampled_probe["token_ids"], sampled_probe["log_probs"]
    with torch.no_grad():
        log_probs, _ = policy.log_probs(**probe.rows(slice(None)), token_ids=probe.token_ids,
                                        temperature=config.temperature)
    difference = (log_probs.float().cpu() - probe.old_log_probs).abs()
    results["logprob_diff_vs_bf16"] = {"mean": float(difference.mean()), "max": float(difference.max())}
    del log_probs

    wide = rollout_curve(config, policy, config.quant_rollout_batches, rng,
                         f"{mode} rollout under {config.mem_cap_gib:g} GiB")
    largest = max((int(size) for size, point in wide.items() if point is not None), default=None)
    results.update(rollout_curve_mem_cap=wide, largest_rollout_batch=largest,
                   largest_rollout_batch_actions_per_s=None if largest is None
                   else wide[str(largest)]["actions_per_s"])

    cap = config.mem_cap_gib if mode == "none" else config.quant_mem_cap_gib
    results["iteration_mem_cap_gib"] = cap
    set_memory_cap(device, cap)
    policy.gradient_checkpointing(True)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    curve = rollout_curve(config, policy, config.rollout_batches, rng, f"{mode} rollout under {cap:g} GiB")
    rollout_batch = fastest(curve, "actions_per_s")
    results.update(rollout_curve=curve, rollout_batch=rollout_batch, rollout_actions_per_s=None
                   if rollout_batch is None else curve[str(rollout_batch)]["actions_per_s"])
    update_curve = None if rollout_batch is None else try_measure(
        device, lambda: micro_batch_curve(config, policy, optimizer, min(rollout_batch, 16), rng))
    micro = None if update_curve is None else fastest(update_curve, "samples_per_s")
    results.update(update_curve=update_curve, update_micro_batch=micro,
                   update_samples_per_s=None if micro is None else update_curve[str(micro)]["samples_per_s"])
    if micro is not None:  # the trainer's update: pi_old recomputed, with and without gradient checkpointing
        results["update_curve_with_pi_old"] = try_measure(device, lambda: micro_batch_curve(
            config, policy, optimizer, min(rollout_batch, 16), rng, (micro,), pi_old=True))
        if config.no_checkpoint_micro_batches:
            policy.gradient_checkpointing(False)
            results["update_curve_no_checkpointing_with_pi_old"] = micro_batch_curve(
                config, policy, optimizer, min(rollout_batch, 16), rng, config.no_checkpoint_micro_batches, True)
            policy.gradient_checkpointing(True)
    iteration = None if micro is None else try_measure(
        device, lambda: iteration_peak(config, policy, optimizer, micro, rng))
    results.update(iteration or {"peak_gib_iteration": None})
    print(f"{mode}: {json.dumps({k: v for k, v in results.items() if 'curve' not in k})}", flush=True)
    write_json(workdir / f"{mode}.json", results)


def fastest(curve: dict, key: str) -> int | None:
    """The size with the highest `key` among those that fit; None when none does."""
    fitting = {int(size): point[key] for size, point in curve.items() if point is not None}
    return max(fitting, key=fitting.get) if fitting else None


def main(config: BenchConfig) -> dict:
    device = device_of(config)
    if config.fused_kernels and (config.compile_layers or device.type != "cuda"):
        raise SystemExit("bench_gpu.py: --fused-kernels runs on CUDA, and not together with --compile-layers")
    for mode in config.base_quant:
        try:
            check_base_quant(mode, device)
        except ValueError as error:
            raise SystemExit(f"bench_gpu.py: {error}") from None
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "model": config.model, "mem_cap_gib": config.mem_cap_gib, "lora_rank": config.lora_rank,
                     "torch": torch.__version__, "temperature": config.temperature}
    set_memory_cap(device, config.mem_cap_gib)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as workdir:
        if config.base_quant:
            results.update(bench_base_quant(config, Path(workdir)))
            output = config.quant_output
        else:
            results.update(bench_openvla(config, Path(workdir), rng))
            if not config.skip_oft:
                results.update(bench_oft(config, Path(workdir), rng))
            results["rollout_speedup"] = results["rollout_actions_per_s"] / results["rollout_actions_per_s_seed"]
            results["update_speedup"] = results["update_samples_per_s"] / results["update_samples_per_s_seed"]
            output = config.output
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
