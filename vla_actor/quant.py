"""A quantized frozen base for LoRA training (QLoRA): the base's linear weights are stored in 8 or 4 bits by torchao
at load time, the LoRA adapters on top stay in the compute dtype. Rollout, update and the adapter-disabled KL
reference all run the same quantized weights, so the PPO ratio stays exact.

Modes: int8 (torchao Int8WeightOnlyConfig, per-row scales; CPU and CUDA), nf4 (torchao NF4Tensor, QLoRA's 4-bit
NormalFloat with blocks of 64 and double-quantized scales; CPU and CUDA), fp8 (torchao Float8WeightOnlyConfig,
e4m3 with per-row scales; CUDA GPUs of compute capability 8.9 or newer). These three multiply by a dequantized copy
of each weight: they save memory, not time.

fp8-dynamic stores the same e4m3 weights (torchao's Float8Tensor) and multiplies on FP8 tensor cores: each input row
(one token) is quantized to e4m3 with its own scale when the layer runs (per-token dynamic scaling, as torchao's
Float8DynamicActivationFloat8WeightConfig and vLLM's FP8 W8A8 do) and `torch._scaled_mm` takes both. torchao's
version of that product has no backward (`_scaled_mm` has no derivative), and LoRA needs the gradient to each base
layer's input; `Float8Linear` gives it, in the compute dtype against the dequantized weight (no weight gradient: the
base is frozen). CUDA GPUs of compute capability 8.9+; on the CPU the same product in float32 (tests)."""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "nf4", "fp8", "fp8-dynamic")
NF4_BLOCK = 64
"""Weights per NF4 block, each with its own absmax scale (QLoRA)."""
NF4_SCALER_BLOCK = 256
"""Block scales per double-quantization block (QLoRA); smaller on layers whose scale count it does not divide."""
FP8_MIN_CAPABILITY = (8, 9)
"""Ada / Hopper and newer have FP8 tensor cores."""
FP8_DYNAMIC = "fp8-dynamic"
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
"""448: a row's absmax maps to it."""
AMAX_FLOOR = 1e-12
"""Smallest absmax a row is scaled by (torchao's float8 epsilon), so an all-zero row gives zeros, not 0 / 0."""
SCALED_MM_MULTIPLE = 16
"""torch._scaled_mm needs both dimensions of the weight to be multiples of 16."""

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
    if mode == FP8_DYNAMIC:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else FP8_MIN_CAPABILITY
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"--base-quant fp8-dynamic needs compute capability 8.9+ (FP8 tensor cores); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use "
                             f"--base-quant int8 or nf4 (or none)")
        return
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
    if mode == FP8_DYNAMIC:
        for name in quantized_layer_names(model, include_vision):
            shape = model.get_submodule(name).weight.shape
            if shape[0] % SCALED_MM_MULTIPLE or shape[1] % SCALED_MM_MULTIPLE:
                raise ValueError(f"fp8-dynamic multiplies layers whose dimensions are multiples of "
                                 f"{SCALED_MM_MULTIPLE}; {name} is [{shape[0]}, {shape[1]}]: use --base-quant fp8 or "
                                 f"int8 (or leave the ViTs unquantized)")


def quantize_layer(layer: nn.Linear, mode: str) -> nn.Linear:
    """The layer with its weight (loaded in the compute dtype, on its device) in its `mode` quantization: `layer`
    itself, its weight replaced (int8, nf4, fp8), or a `Float8Linear` to put in its place (fp8-dynamic); the caller
    drops its last reference to the original weight, so one layer at a time exists unquantized."""
    if mode == FP8_DYNAMIC:
        return Float8Linear.from_linear(layer)
    if mode == "nf4":
        from torchao.quantization import to_nf4
        layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), NF4_BLOCK, nf4_scaler_block(layer.weight)),
                                    requires_grad=False)
        return layer
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    quantize_(layer, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())
    layer.weight.requires_grad_(False)
    return layer


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of each row of `rows` [N, K] scaled by its own absmax (to E4M3_MAX), and the float32 scales [N, 1]
    that multiply them back."""
    scales = rows.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (rows.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [N, K] times their rows' float32 scales [N, 1], rounded once to `dtype`."""
    return (codes.float() * scales).to(dtype)


@functools.cache
def compiled(function: Callable) -> Callable:
    """`function` compiled for CUDA tensors, once per process: inductor fuses `quantize_rows` into one kernel (a row
    reduction and the element-wise rest; eagerly its ops read and write the rows in float32 five times) and
    `dequantize_rows` into one; dynamic shapes, so one compilation serves every row count and layer width."""
    return torch.compile(function, dynamic=True)


class Float8Product(torch.autograd.Function):
    """rows [N, K] times a frozen e4m3 weight [M, K] (per-row float32 scales [M, 1]), in FP8: the rows quantized
    per row (`quantize_rows`), `torch._scaled_mm` with both scales, bf16 out (what its row-wise scaling gives), cast
    to the rows' dtype. Backward: the rows' gradient only, grad [N, M] times the weight dequantized to the gradient's
    dtype (the product a bf16 layer's backward runs); the weight and bias are frozen."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.codes, ctx.scales = codes, scales  # frozen parameters, not activations: nothing to save or recompute
        if rows.is_cuda:
            row_codes, row_scales = compiled(quantize_rows)(rows)
            product = torch._scaled_mm(row_codes, codes.t(), scale_a=row_scales, scale_b=scales.t(),
                                       out_dtype=torch.bfloat16, use_fast_accum=True)
        else:  # what the tensor cores compute, in float32 (torch 2.11's CPU _scaled_mm takes no row-wise scales)
            row_codes, row_scales = quantize_rows(rows)
            product = (dequantize_rows(row_codes, row_scales, torch.float32)
                       @ dequantize_rows(codes, scales, torch.float32).t()).to(torch.bfloat16)
        product = product.to(rows.dtype)
        return product if bias is None else product + bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        dequantize = compiled(dequantize_rows) if grad.is_cuda else dequantize_rows
        return grad @ dequantize(ctx.codes, ctx.scales, grad.dtype), None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear of an fp8-dynamic base: its weight is torchao's Float8Tensor (e4m3 codes with per-row
    scales, which reports the compute dtype, so PEFT keeps its adapters in it and `dequantize` reads it for a merged
    export), its product `Float8Product`. Still an nn.Linear, so PEFT wraps it with LoRA as any other."""

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Float8Linear:
        from torchao.quantization import Float8Tensor, PerRow
        quantized = cls(layer.in_features, layer.out_features, bias=False, device="meta", dtype=layer.weight.dtype)
        quantized.weight = nn.Parameter(Float8Tensor.from_hp(layer.weight.detach(), granularity=PerRow()),
                                        requires_grad=False)
        quantized.bias = layer.bias
        # whatever still holds the original layer (an iteration over the model's modules while it loads) holds the
        # quantized weight, not the compute-dtype one
        layer.weight = quantized.weight
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the (view) reshapes stay outside the Function: callers may add into its output in place (`lora_linear`)
        rows = x.reshape(-1, x.shape[-1])
        product = Float8Product.apply(rows, self.weight.qdata, self.weight.scale, self.bias)
        return product.view(*x.shape[:-1], self.out_features)


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
    if mode in ("fp8", FP8_DYNAMIC):
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
