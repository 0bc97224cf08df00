"""A quantized frozen base for LoRA training (QLoRA): the base's linear weights are stored in 8 or 4 bits by torchao
at load time, the LoRA adapters on top stay in the compute dtype. Rollout, update and the adapter-disabled KL
reference all run the same quantized weights, so the PPO ratio stays exact.

Modes: int8 (torchao Int8WeightOnlyConfig, per-row scales; CPU and CUDA), nf4 (torchao NF4Tensor, QLoRA's 4-bit
NormalFloat with blocks of 64 and double-quantized scales; CPU and CUDA), fp8 (torchao Float8WeightOnlyConfig,
e4m3 with per-row scales; CUDA GPUs of compute capability 8.9 or newer)."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "nf4", "fp8")
NF4_BLOCK = 64
"""Weights per NF4 block, each with its own absmax scale (QLoRA)."""
NF4_SCALER_BLOCK = 256
"""Block scales per double-quantization block (QLoRA); smaller on layers whose scale count it does not divide."""
FP8_MIN_CAPABILITY = (8, 9)
"""Ada / Hopper and newer have FP8 tensor cores."""

_LLM_LAYER = re.compile(r"^language_model\.model\.layers\.\d+\.")
_VIT_BLOCK = re.compile(r"^vision_backbone\.(featurizer|fused_featurizer)\.blocks\.\d+\.")


def check_base_quant(mode: str, device: torch.device) -> None:
    """One clear error when `mode` cannot run on `device` (or its library is missing), before any model loads."""
    if mode not in QUANT_MODES:
        raise ValueError(f"--base-quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "none":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"--base-quant {mode} needs the torchao package, which is not installed: pip install torchao "
                         f"(or use --base-quant none)")
    if mode == "fp8":
        if device.type != "cuda":
            raise ValueError(f"--base-quant fp8 needs a CUDA GPU with FP8 (compute capability 8.9+, e.g. L4, 4090, "
                             f"H100); the device is {device}: use --base-quant int8 or nf4")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"--base-quant fp8 needs compute capability 8.9+ (FP8 tensor cores); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use "
                             f"--base-quant int8 or nf4")


def quantized_layer_names(model: nn.Module, include_vision: bool) -> list[str]:
    """The nn.Linear layers a quantized base stores in low precision: every linear of the Llama decoder and, with
    `include_vision`, of the two ViTs' blocks. Embeddings, the LM head, the projector and norms stay as loaded."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (_LLM_LAYER.match(name) or (include_vision and _VIT_BLOCK.match(name)))]


def check_quantizable(model: nn.Module, mode: str, include_vision: bool) -> None:
    """One clear error, from the shapes alone (the model may still be on the meta device), when a layer the base
    would quantize cannot be stored in `mode`."""
    if mode == "nf4":
        for name in quantized_layer_names(model, include_vision):
            nf4_scaler_block(model.get_submodule(name).weight)


def quantize_layer(layer: nn.Linear, mode: str) -> None:
    """Replace the layer's weight (loaded in the compute dtype, on its device) by its `mode` quantization, in place;
    the caller drops its last reference to the original, so one layer at a time exists unquantized."""
    if mode == "nf4":
        from torchao.quantization import to_nf4
        layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), NF4_BLOCK, nf4_scaler_block(layer.weight)),
                                    requires_grad=False)
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    quantize_(layer, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())
    layer.weight.requires_grad_(False)


def nf4_scaler_block(weight: torch.Tensor) -> int:
    """NF4's double-quantization block: QLoRA's 256 where it divides the layer's count of block scales (every 7B
    layer), else the largest power of two that does (small look-alike layers)."""
    if weight.numel() % NF4_BLOCK:
        shape = ", ".join(map(str, weight.shape))
        raise ValueError(f"nf4 needs layers with a multiple of {NF4_BLOCK} weights; a [{shape}] layer has "
                         f"{weight.numel()}: use --base-quant int8 (or leave the ViTs unquantized)")
    return math.gcd(NF4_SCALER_BLOCK, weight.numel() // NF4_BLOCK)


def quantized_weight_bytes(weight: torch.Tensor, mode: str, dtype_bytes: int) -> int:
    """Bytes a Linear's [out, in] weight (any device, meta included) takes stored in `mode`, scales included, as
    torchao lays it out; `dtype_bytes`: the compute dtype, which NF4 keeps its second-level scales in."""
    out_features, count = weight.shape[0], weight.numel()
    if mode == "int8":
        return count + out_features * 5  # int8 data, a float32 scale and an int8 zero point per row
    if mode == "fp8":
        return count + out_features * 4  # e4m3 data, a float32 scale per row
    if mode == "nf4":
        blocks = count // NF4_BLOCK
        scaler_blocks = blocks // nf4_scaler_block(weight)
        # 4-bit codes, an int8 scale per block, a scale per block of scales, their mean and the 16-entry code table
        return count // 2 + blocks + (scaler_blocks + 1 + 16) * dtype_bytes
    raise ValueError(f"no quantized storage for mode {mode!r}; expected one of {', '.join(QUANT_MODES[1:])}")


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao weight (int8 / fp8 / nf4) rather than a plain (or otherwise wrapped, e.g. FSDP's) tensor."""
    return type(tensor).__module__.startswith("torchao.")


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor a quantized weight stands for, in its compute dtype (what its layer multiplies by); a plain
    tensor is returned as is."""
    if not is_quantized(tensor):
        return tensor
    if hasattr(tensor, "get_original_weight"):  # NF4Tensor
        return tensor.get_original_weight()
    return tensor.dequantize()


@contextmanager
def without_peft_requantize_warning() -> Iterator[None]:
    """PEFT warns, when it wraps a torchao weight, that its own merge() could not requantize it; nothing here uses
    PEFT's merge (the merged export dequantizes, `merged_checkpoint_tensors`), so the warning would only mislead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*instantiated without `get_apply_tensor_subclass`")
        yield
