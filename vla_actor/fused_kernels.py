"""Fused kernels in the Llama layers, on CUDA (pip install liger-kernel): Liger's RMSNorm, RoPE and SiLU-times-up
(SwiGLU), and LoRA's scale-and-add folded into its second product.

transformers' LlamaRMSNorm runs about seven element-wise kernels per call (cast to float32, square, mean, add
epsilon, reciprocal square root, multiply, cast back, scale), its RoPE seven (two multiplies, a negation and a
concatenation per rotated half, an add, for queries and keys), LlamaMLP two between its products (SiLU, multiply),
and every PEFT LoRA projection two after its own (times the scale, plus the base output); with gradient
checkpointing each runs three times per update step (forward, recomputation, backward), and in a decode step they
are most of its ~2,000 kernels. Liger replaces each of the first three with one Triton kernel, forward and
backward, computing in float32 as transformers does (RMSNorm's "llama" casting mode: normalised in float32, cast,
then scaled; SiLU in float32, cast, times up); `lora_linear` lets cuBLAS add the scaled adapter product into the
base output inside its GEMM (`addmm_`, one rounding instead of three). The modules keep the originals' parameters
and child modules under the same names, so state dicts, LoRA adapters (PEFT wraps the projections inside the
attention and the MLP) and checkpoints are unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaMLP, LlamaModel, LlamaRMSNorm,
                                                      eager_attention_forward)

from vla_actor.quant import Float8Linear

INSTALL_HINT = "pip install liger-kernel (it needs triton, which CUDA builds of torch bring)"
"""How to get the fused kernels, for messages."""


def fused_kernels_available() -> bool:
    """Whether liger-kernel and triton can be imported (CUDA machines with the package installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))


def liger_ops() -> ModuleType:
    """liger_kernel.ops, imported on first use: it imports triton, which CPU-only machines lack."""
    if not fused_kernels_available():
        raise RuntimeError(f"fused kernels need liger-kernel: {INSTALL_HINT}")
    return importlib.import_module("liger_kernel.ops")


def _fusable_adapter(layer: nn.Module) -> str | None:
    """The adapter whose scale-and-add `lora_linear` can fold: the one active plain LoRA adapter (no variant, no
    bias) of a PEFT Linear over an unquantized nn.Linear or an fp8-dynamic one, not merged or disabled; None
    otherwise."""
    if not isinstance(layer, LoraLinear) or layer.disable_adapters or layer.merged:
        return None
    base = layer.base_layer
    plain = type(base) is nn.Linear and type(base.weight.data) is torch.Tensor  # not quantized or sharded
    if not (plain or type(base) is Float8Linear):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:  # DoRA and the other variants have their own forward
        return None
    return None if layer.lora_B[active[0]].bias is not None else active[0]  # lora_bias=True adds B's bias


class _AdapterProductOfRecomputedInput(torch.autograd.Function):
    """`rows @ weight.T`, the first product of a LoRA adapter, for rows that a function makes from tensors autograd
    keeps anyway (the SwiGLU kernel keeps gate and up for its own backward): those are kept instead of the rows,
    which the backward pass makes again for the adapter's weight gradient. In the 7B's MLP the rows are the down
    projection's input, 11,008 channels a token and layer, about a sixth of what an update without gradient
    checkpointing holds."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, recompute, *sources: torch.Tensor) -> torch.Tensor:
        ctx.recompute = recompute
        ctx.save_for_backward(weight, *sources)
        return rows @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, *sources = ctx.saved_tensors
        grad_rows = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ ctx.recompute(*sources).reshape(-1, weight.shape[1])
        return grad_rows, grad_weight, None, *(None for _ in sources)


def lora_linear(layer: nn.Module, x: torch.Tensor, recomputed_from: tuple | None = None) -> torch.Tensor:
    """`layer(x)`, with a plain LoRA adapter's `base + B(A(x)) * scale` computed as the base product and one
    `addmm_` that accumulates the scaled adapter product into it; any other layer or adapter state runs as itself.
    `recomputed_from` = (function, *tensors) with `function(*tensors)` equal to `x`, bit for bit: the adapter's
    first product keeps those tensors instead of `x` (the base product keeps only its weight), where its dropout is
    off and `x` needs no cast."""
    adapter = _fusable_adapter(layer)
    if adapter is None:
        return layer(x)
    base, lora_a = layer.base_layer, layer.lora_A[adapter]
    rows = x.reshape(-1, x.shape[-1])
    output = base(rows) if type(base) is Float8Linear else F.linear(rows, base.weight, base.bias)
    if layer.cast_input_dtype_enabled:  # as PEFT does; VLAPolicy turns it off where autocast casts instead
        rows = rows.to(lora_a.weight.dtype)
    dropout = layer.lora_dropout[adapter]
    if recomputed_from is not None and isinstance(dropout, nn.Identity) and rows.data_ptr() == x.data_ptr():
        recompute, *sources = recomputed_from
        down = _AdapterProductOfRecomputedInput.apply(rows, lora_a.weight.to(rows.dtype), recompute, *sources)
    else:
        down = lora_a(dropout(rows))
    down = down.to(output.dtype)
    # in-place ops take no autocast: the float32 adapter is cast here, as autocast casts it for lora_B's product
    output.addmm_(down, layer.lora_B[adapter].weight.to(output.dtype).t(), alpha=layer.scaling[adapter])
    return output.view(*x.shape[:-1], output.shape[-1])


class FusedRMSNorm(nn.Module):
    """LlamaRMSNorm through Liger's kernel; the same `weight` parameter and epsilon."""

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self._function = liger_ops().LigerRMSNormFunction

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # offset 0, the "llama" casting mode (see the module docstring); not in place: autograd may hold dY elsewhere
        return self._function.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


class FusedRopeAttention(nn.Module):
    """LlamaAttention with Liger's RoPE kernel (in place on the projections' outputs, which nothing else reads) and
    `lora_linear` projections; the same q/k/v/o modules, KV cache and attention implementation."""

    def __init__(self, attention: LlamaAttention):
        super().__init__()
        self.config, self.layer_idx, self.head_dim = attention.config, attention.layer_idx, attention.head_dim
        self.num_key_value_groups, self.scaling = attention.num_key_value_groups, attention.scaling
        self.attention_dropout, self.is_causal = attention.attention_dropout, attention.is_causal
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.o_proj = attention.o_proj
        self._rope = liger_ops().LigerRopeFunction

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values  # transformers 5.24 passes `cache`, 5.17 the other
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, -1, self.head_dim)
        query, key, value = (lora_linear(projection, hidden_states).view(heads).transpose(1, 2)
                             for projection in (self.q_proj, self.k_proj, self.v_proj))
        query, key = self._rope.apply(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return lora_linear(self.o_proj, output.reshape(*input_shape, -1).contiguous()), weights


class FusedSwiGLU(nn.Module):
    """LlamaMLP with SiLU(gate) * up in one Liger kernel and `lora_linear` projections; the same gate/up/down
    projection modules. With `recompute_down_input` (set_down_input_recomputation) the down adapter makes its input
    again in the backward pass instead of keeping it: less memory where every layer's activations are kept (no
    gradient checkpointing), one more element-wise kernel per layer and backward; forwards without gradients
    (rollouts, pi_old) run as before."""

    recompute_down_input = False

    def __init__(self, mlp: LlamaMLP):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        ops = liger_ops()
        self._function, self._swiglu_forward = ops.LigerSiLUMulFunction, ops.swiglu_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = lora_linear(self.gate_proj, x), lora_linear(self.up_proj, x)
        product = self._function.apply(gate, up)
        if not (self.recompute_down_input and torch.is_grad_enabled()):
            return lora_linear(self.down_proj, product)
        # the down adapter keeps gate and up (which the kernel keeps) and makes the product again with the same
        # kernel in its backward, which runs before the kernel's own (that one overwrites gate and up in place)
        return lora_linear(self.down_proj, product, recomputed_from=(self._product, gate, up))

    def _product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._swiglu_forward(gate, up)[2]


def set_down_input_recomputation(llama: LlamaModel, enabled: bool) -> None:
    """FusedSwiGLU.recompute_down_input of every fused MLP of `llama`."""
    for module in llama.modules():
        if isinstance(module, FusedSwiGLU):
            module.recompute_down_input = enabled


def fuse_llama_kernels(llama: LlamaModel) -> None:
    """Swap every RMSNorm, attention and MLP of `llama` (the decoder stack) for the fused modules, in place."""
    config = llama.config
    if config.hidden_act != "silu" or getattr(config, "mlp_bias", False):
        raise ValueError(f"fused kernels expect Llama's SiLU MLP without biases; got hidden_act={config.hidden_act!r}, "
                         f"mlp_bias={getattr(config, 'mlp_bias', False)}")
    for layer in llama.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if isinstance(norm, LlamaRMSNorm):
                setattr(layer, name, FusedRMSNorm(norm))
        if isinstance(layer.self_attn, LlamaAttention):
            layer.self_attn = FusedRopeAttention(layer.self_attn)
        if isinstance(layer.mlp, LlamaMLP):
            layer.mlp = FusedSwiGLU(layer.mlp)
    if isinstance(llama.norm, LlamaRMSNorm):
        llama.norm = FusedRMSNorm(llama.norm)
