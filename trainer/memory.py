"""GPU memory and time of a GRPO + LoRA run, predicted from its flags and the checkpoint's shapes before anything
loads: `train --dry-run` prints the prediction, and `train` refuses a configuration predicted not to fit the card.

Memory is counted by part. Resident all run: the frozen weights in the compute dtype (with --base-quant, the
quantized layers in their torchao storage, to the byte), the LoRA weights and their two AdamW moments in float32.
Rollout: per sample of a query's batch (one per env; with --overlap-rollouts one per env of the larger half) the KV
cache of its prompt (OpenVLA; OFT decodes in one forward) plus the activations of the no-grad forward, proportional to
tokens x MLP width.
Update: the LoRA gradients, and per sample of the micro-batch the checkpointed input of every decoder layer plus
the one layer recomputed in the backward pass (without gradient checkpointing: every layer's activations, at their
own fitted factor, or with the fused kernels the tensors they keep, counted). The activation factors and the fixed
workspace terms are fitted to the 7B curves of `bench/results/gpu_7b.json` and `gpu_7b_no_checkpointing.json`; the
real trainer's peaks (`gpu_7b_e2e*.json`) are predicted within 10 % (tests/test_memory.py). A quantized layer
multiplies by a dequantized copy of its weight, made for the call and freed after it; DEQUANTIZED_COPIES of the
largest such copy are counted as alive at a peak, an assumption the int8, nf4 and fp8 rollout and iteration peaks check
(`gpu_7b_quant.json`, `gpu_7b_quant_fp8.json`, `gpu_7b_quant_8bit.json`: within 6 %). Compiled blocks
(--compile-layers) hold more activations than eager ones; their extra per token and MLP channel is fitted to the one
compiled run (`gpu_7b_compiled.json`), whose batch 32 did not fit 24 GiB, as the fit predicts.

Time scales the per-query and per-sample seconds measured by the real trainer on an H100 (bench_e2e) by the
card's dense bf16 rate, and adds the simulators' time measured there: an estimate, not a measurement, and none for a
quantized base, whose dequantizing layers were not timed, or an update without gradient checkpointing, which the
real trainer has timed at one micro-batch only (4; the microbenchmark's H100 and the arithmetic of a slower card
disagree in direction at 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from libero_env.processing import ACTION_DIM
from trainer.config import TrainConfig
from trainer.envs import suite_shape
from trainer.policy_builder import asks_fused_kernels, lora_settings
from trainer.rollout import env_halves
from vla_actor.action_tokens import OFT_CHUNK
from vla_actor.checkpoint import CONFIG_FILE, read_json
from vla_actor.fused_kernels import fused_kernels_available
from vla_actor.model import ModelSpec, build_model
from vla_actor.policy import OFT_CONFIG_HINTS, LoraSettings, lora_target_modules, resolve_dtype
from vla_actor.quant import quantized_layer_names, quantized_weight_bytes

GIB = 2**30
PATCHES_PER_IMAGE = 256
"""Vision tokens per 224x224 image (16 x 16 patches of 14 pixels, REF 3.2)."""
PROMPT_TOKENS = 32
"""BOS, the prompt template around a LIBERO instruction and the space token: ~25-35 tokens (REF 3.1)."""
KV_SLOT_MULTIPLE = 16
"""The decode's static KV cache rounds its slots up to a multiple of this (vla_actor/fast_decode.py)."""
ROLLOUT_ACTIVATIONS = 7.4
"""Bytes of no-grad activations alive per token and MLP channel, in units of the compute dtype (fitted)."""
UPDATE_ACTIVATIONS = 11.1
"""The same for the decoder layer the backward pass recomputes (fitted)."""
UNCHECKPOINTED_ACTIVATIONS = 9.2
"""The same for each decoder layer of an update without gradient checkpointing, which keeps every layer's
activations for the backward pass (fitted to gpu_7b_no_checkpointing.json's micro-batches 2 and 4, transformers'
layers)."""
FUSED_UNCHECKPOINTED_ACTIVATIONS = 5.0
"""The same with the fused kernels (--fused-kernels, liger-kernel installed), counted: per token a layer keeps eight
hidden-size tensors (the two RMSNorms' inputs and outputs, queries, keys, values and the attention's output) and
the SwiGLU kernel's gate and up, while its down projection's input is made again in the backward pass
(vla_actor/fused_kernels.py): (8 x 4,096 + 2 x 11,008) / 11,008 = 4.98 MLP channels; the real trainer's peak at
micro-batch 4 (gpu_7b_e2e_openvla_graphed_update.json, 18.95 GiB) implies 4.4."""
COMPILED_ROLLOUT_ACTIVATIONS = 27.9
"""What compiled blocks hold beyond ROLLOUT_ACTIVATIONS, in the same units (fitted: +2.6 GiB at batch 16)."""
COMPILED_UPDATE_ACTIVATIONS = 11.3
"""What a compiled recomputed layer holds beyond UPDATE_ACTIVATIONS (fitted: +1.1 GiB at micro-batch 16)."""
ROLLOUT_WORKSPACE_GIB = 0.3
"""Fixed rollout overhead beyond the weights (CUDA graph pool, library workspaces; fitted)."""
UPDATE_WORKSPACE_GIB = 0.9
"""Fixed update overhead beyond weights and LoRA state (library workspaces, autocast copies; fitted)."""
DENSE_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125,
                     "RTX 6000 Ada": 364, "A6000": 155, "A5000": 111, "A4000": 77, "4090": 165, "4080": 98,
                     "4070": 58, "4060 Ti": 44, "3090": 71, "3080": 60, "T4": 65}
"""Vendor datasheet rates (dense, fp32 accumulation) by a substring of the device name; T4 is fp16."""
MEASURED_ON = "H100"
SECONDS_PER_QUERY = {"openvla": 0.0142, "oft": 0.0193}
"""Rollout model seconds per policy query at batch 16 on the H100 (bench_e2e at the full horizon, fused kernels with
RoPE and LoRA's scale-and-add, kept graphs: 50.0 s / 3,520 in gpu_7b_e2e_openvla220.json, 8.5 s / 440 in
gpu_7b_e2e_oft_rope_lora.json)."""
SECONDS_PER_SAMPLE = {"openvla": 0.0303, "oft": 0.0844}
"""Update seconds per trained policy step, its gradient pass (the same runs: OFT 37.1 s / 440 in one mini-batch,
whose pi_old that pass gives; OpenVLA 141.2 s / 3,520 less the recomputed pi_old of 12 of its 13 mini-batches)."""
PI_OLD_SHARE = 0.353
"""A step's recomputed pi_old (one forward without gradients) over its gradient pass: bench_gpu on the H100, bf16,
micro-batch 16, 27.1 ms per sample without it and 36.7 with pi_old recomputed for every step
(gpu_7b_fp8_dynamic.json)."""
SIMULATOR_ACTIONS_PER_S_PER_ENV = 345 / 16
"""Env actions per second per worker process in the steady state (bench_e2e OFT, 16 workers on 16 cores)."""
DEQUANTIZED_COPIES = 2
"""Dequantized weights of the largest quantized layer counted alive at a peak (the forward's and, in the update, the
backward's through the same layer)."""
FIRST_RESET_SECONDS = 0.4
"""The blocking first reset of a rollout: 16 kept simulators running the 10 wait steps, their scenes built during
the last update (VectorEnv.build_scenes; gpu_7b_e2e_openvla_scene_builds.json, H100 machine: 0.4 s, and 4.0 s where
the workers built them at the reset). Later resets run in the background while the other envs step (refill), so a
rollout blocks on one, however many episodes each env plays."""


@dataclass(frozen=True)
class ModelShape:
    """What the prediction needs of a checkpoint, from its config.json (the network built on the meta device)."""

    frozen_parameters: int
    lora_parameters: int
    layers: int
    hidden: int
    kv_hidden: int
    mlp: int
    oft: bool
    images: int
    proprio: bool
    dtype_bytes: int
    quantized_parameters: int = 0
    """Weights of the layers stored quantized (--base-quant), included in frozen_parameters."""
    quantized_bytes: int = 0
    """Their storage, scales included."""
    largest_quantized: int = 0
    """Weights of the largest quantized layer: the size of a dequantized copy."""

    @property
    def prompt_tokens(self) -> int:
        return PROMPT_TOKENS + PATCHES_PER_IMAGE * self.images + int(self.proprio)

    @property
    def action_tokens(self) -> int:
        return ACTION_DIM * (OFT_CHUNK if self.oft else 1)


@dataclass(frozen=True)
class Prediction:
    """Predicted GiB of the two peaks of an iteration and seconds of one iteration on a given card."""

    resident_gib: float
    rollout_gib: float
    update_gib: float
    iteration_seconds: float | None
    card: str

    @property
    def peak_gib(self) -> float:
        return max(self.rollout_gib, self.update_gib)

    def summary(self) -> str:
        time = (f"~{self.iteration_seconds / 60:.0f} min per iteration on {self.card} (an estimate scaled from "
                f"{MEASURED_ON} measurements)" if self.iteration_seconds is not None else
                f"no time estimate for this configuration on {self.card} (measured with bf16 bases, gradient "
                f"checkpointing and known cards only)")
        return (f"predicted GPU memory {self.peak_gib:.1f} GiB (weights and LoRA state {self.resident_gib:.1f}, "
                f"rollout peak {self.rollout_gib:.1f}, update peak {self.update_gib:.1f}); {time}")


def model_shape(checkpoint: str | Path, lora: LoraSettings, dtype_bytes: int, base_quant: str = "none",
                base_quant_vision: bool = False) -> ModelShape:
    """The shapes of a checkpoint's network (built on the meta device from its config.json, so no weight is read)
    with `lora`'s adapters, computed in a dtype of `dtype_bytes` bytes, its base stored as `base_quant` says."""
    config = read_json(Path(checkpoint) / CONFIG_FILE)
    oft = any(key in config for key in OFT_CONFIG_HINTS)
    proprio = oft and bool(config.get("use_proprio", False))
    spec = ModelSpec.from_config(config, config.get("proprio_dim", 8) if proprio else None)
    model = build_model(spec, "meta", torch.float32)
    llama = spec.llama_config()
    targets = set(lora_target_modules(model, lora))
    lora_parameters = sum(lora.rank * (module.in_features + module.out_features)
                          for name, module in model.named_modules() if name in targets)
    quantized = ([model.get_submodule(name).weight for name in quantized_layer_names(model, base_quant_vision)]
                 if base_quant != "none" else [])
    heads = llama.num_attention_heads
    return ModelShape(
        frozen_parameters=sum(p.numel() for p in model.parameters()), lora_parameters=lora_parameters,
        layers=llama.num_hidden_layers, hidden=llama.hidden_size,
        kv_hidden=llama.hidden_size * (llama.num_key_value_heads or heads) // heads, mlp=llama.intermediate_size,
        oft=oft, images=config.get("num_images_in_input", 1) if oft else 1, proprio=proprio,
        dtype_bytes=dtype_bytes, quantized_parameters=sum(weight.numel() for weight in quantized),
        quantized_bytes=sum(quantized_weight_bytes(weight, base_quant, dtype_bytes) for weight in quantized),
        largest_quantized=max((weight.numel() for weight in quantized), default=0))


def checkpoint_shape(config: TrainConfig) -> ModelShape | None:
    """`model_shape` of the run's checkpoint in the dtype it computes in on CUDA, with its --base-quant; None for a
    hub id that is not downloaded yet."""
    checkpoint = Path(config.model.checkpoint).expanduser()
    if not (checkpoint / CONFIG_FILE).is_file():
        return None
    dtype = resolve_dtype(config.model.dtype, checkpoint, torch.device("cuda"))
    return model_shape(checkpoint, lora_settings(config.lora), torch.tensor([], dtype=dtype).element_size(),
                       config.model.base_quant, config.model.base_quant_vision)


def rollout_bytes_per_sample(shape: ModelShape, compiled: bool = False) -> float:
    tokens = shape.prompt_tokens + (shape.action_tokens + 1 if shape.oft else 0)
    factor = ROLLOUT_ACTIVATIONS + (COMPILED_ROLLOUT_ACTIVATIONS if compiled else 0.0)
    activations = factor * tokens * shape.mlp * shape.dtype_bytes
    if shape.oft:
        return activations
    slots = math.ceil((shape.prompt_tokens + shape.action_tokens - 1) / KV_SLOT_MULTIPLE) * KV_SLOT_MULTIPLE
    return activations + shape.layers * 2 * shape.kv_hidden * slots * shape.dtype_bytes


def update_bytes_per_sample(shape: ModelShape, gradient_checkpointing: bool, compiled: bool = False,
                            fused: bool = False) -> float:
    tokens = shape.prompt_tokens + shape.action_tokens + int(shape.oft)
    compiled_extra = COMPILED_UPDATE_ACTIVATIONS if compiled else 0.0
    if not gradient_checkpointing:  # every layer keeps its activations for the backward pass
        kept = FUSED_UNCHECKPOINTED_ACTIVATIONS if fused else UNCHECKPOINTED_ACTIVATIONS
        return shape.layers * (kept + compiled_extra) * tokens * shape.mlp * shape.dtype_bytes
    return (shape.layers * tokens * shape.hidden * shape.dtype_bytes
            + (UPDATE_ACTIVATIONS + compiled_extra) * tokens * shape.mlp * shape.dtype_bytes)


def card_tflops(card: str) -> float | None:
    return next((rate for name, rate in DENSE_BF16_TFLOPS.items() if name in card), None)


def predict(config: TrainConfig, shape: ModelShape, card: str, fused: bool | None = None) -> Prediction:
    """The memory and time of `config`'s iterations for a model of `shape` on the card named `card`; `fused`: whether
    the Llama layers run the fused kernels (None: where build_policy would swap them in on this machine)."""
    # a query's batch; overlapped halves query one half, the larger, at a time
    queried = len(env_halves(config.env.num_envs, config.env.overlaps(shape.oft, cuda=True))[0])
    if fused is None:
        fused = (asks_fused_kernels(config.model, torch.device("cuda"), config.finetune == "full")
                 and fused_kernels_available())
    resident, rollout, update = peaks(shape, queried, config.optim.micro_batch_size,
                                      config.model.gradient_checkpointing, config.model.compile_layers, fused)
    return Prediction(resident / GIB, rollout / GIB, update / GIB, iteration_seconds(config, shape, card), card)


def peaks(shape: ModelShape, rollout_batch: int, micro_batch: int, gradient_checkpointing: bool,
          compiled: bool = False, fused: bool = False) -> tuple[float, ...]:
    """Bytes resident all run, at the rollout peak (queries of `rollout_batch`) and at the update peak (`compiled`:
    --compile-layers; `fused`: the fused kernels)."""
    frozen = (shape.frozen_parameters - shape.quantized_parameters) * shape.dtype_bytes + shape.quantized_bytes
    resident = frozen + shape.lora_parameters * 12  # fp32 LoRA weights + 2 moments
    dequantized = DEQUANTIZED_COPIES * shape.largest_quantized * shape.dtype_bytes
    rollout = (resident + ROLLOUT_WORKSPACE_GIB * GIB + dequantized
               + rollout_batch * rollout_bytes_per_sample(shape, compiled))
    update = (resident + shape.lora_parameters * 4 + UPDATE_WORKSPACE_GIB * GIB + dequantized
              + micro_batch * update_bytes_per_sample(shape, gradient_checkpointing, compiled, fused))
    return resident, rollout, update


def iteration_seconds(config: TrainConfig, shape: ModelShape, card: str) -> float | None:
    """Seconds of one iteration where every episode runs to the horizon (failures do), None for an unknown card,
    a policy not in bf16, a quantized base or an update without gradient checkpointing (the measurements are of the
    unquantized bf16 7B, checkpointed; unchecked and graphed, the real trainer's update took 0.74x as long at
    micro-batch 4 on an H100, gpu_7b_e2e_openvla_graphed_update.json, and the microbenchmark 1.07x at 2, where the
    host launches more than the GPU computes, while a slower card's arithmetic would take 0.75x at either:
    gpu_7b_update_graphs_walks_once.json). The GPU and the simulators take turns."""
    rate = card_tflops(card)
    if rate is None or shape.dtype_bytes != 2 or shape.quantized_parameters or not config.model.gradient_checkpointing:
        return None
    horizon = config.env.max_steps or suite_shape(config.env.task_suite).max_steps
    episodes = config.grpo.groups_per_iteration * config.grpo.group_size
    queries = episodes * math.ceil(horizon / (OFT_CHUNK if shape.oft else 1))
    kind = "oft" if shape.oft else "openvla"
    scale = DENSE_BF16_TFLOPS[MEASURED_ON] / rate
    minibatches = max(1, queries // config.optim.mini_batch_size)
    recomputes = config.grpo.recomputes_old_log_probs(True, shape.oft, "none")
    # the first mini-batch's gradient pass gives its own pi_old, unless it drops out
    dropout = config.finetune == "lora" and config.lora.lora_dropout > 0
    share = (1.0 if dropout else (minibatches - 1) / minibatches) if recomputes else 0.0
    pi_old = queries * SECONDS_PER_SAMPLE[kind] * PI_OLD_SHARE * share * scale
    gpu = queries * (SECONDS_PER_QUERY[kind] + SECONDS_PER_SAMPLE[kind] * config.optim.ppo_epochs) * scale
    simulators = episodes * horizon / (SIMULATOR_ACTIONS_PER_S_PER_ENV * config.env.num_envs)
    return gpu + pi_old + simulators + FIRST_RESET_SECONDS


def check_fits(config: TrainConfig, shape: ModelShape | None, card: str,
               available_gib: float | None) -> Prediction | None:
    """The prediction for a LoRA run computing in bf16 (what the model is calibrated on), or None where it does not
    apply; raises a ValueError naming the flag to change when the peak is over `available_gib` (None: no GPU to
    check against)."""
    if shape is None or config.finetune != "lora" or shape.dtype_bytes != 2:
        return None
    prediction = predict(config, shape, card)
    if available_gib is None or prediction.peak_gib <= available_gib:
        return prediction
    need = (f"this configuration is predicted to need {prediction.peak_gib:.1f} GiB of GPU memory and {card} gives "
            f"this process {available_gib:.1f} GiB")
    smallest = max(peaks(shape, 1, 1, gradient_checkpointing=True, compiled=config.model.compile_layers)) / GIB
    if smallest > available_gib:
        fix = ("store the frozen base in 4 bits (--base-quant nf4)" if config.model.base_quant == "none" else
               "use a card with more memory")
        raise ValueError(f"{need}, and even 1 env and a micro-batch of 1 would need {smallest:.1f} GiB: {fix}")
    flag = (f"--num-envs (now {config.env.num_envs})" if prediction.rollout_gib >= prediction.update_gib
            else f"--micro-batch-size (now {config.optim.micro_batch_size})")
    also = ("" if config.model.gradient_checkpointing else " or turn --gradient-checkpointing on") + (
        " or turn --compile-layers off" if config.model.compile_layers else "")
    raise ValueError(f"{need}: lower {flag}{also}")


def detected_card(device: str) -> tuple[str, float | None]:
    """(name, GiB this process may allocate) of the GPU `--device` resolves to; ("no GPU", None) without one."""
    if device == "cpu" or not torch.cuda.is_available():
        return "no GPU", None
    index = torch.device(device).index if device not in ("auto", "cuda") else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    return torch.cuda.get_device_name(index), total * torch.cuda.get_per_process_memory_fraction(index) / GIB
