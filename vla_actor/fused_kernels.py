"""Liger-kernel's fused RMSNorm and SiLU-times-up (SwiGLU) in the Llama layers, on CUDA (pip install liger-kernel).

transformers' LlamaRMSNorm runs about seven element-wise kernels per call (cast to float32, square, mean, add
epsilon, reciprocal square root, multiply, cast back, scale) and LlamaMLP two between its products (SiLU, multiply);
with gradient checkpointing each runs three times per update step (forward, recomputation, backward). Liger
replaces each with one Triton kernel, forward and backward, computing in float32 as transformers does (RMSNorm's
"llama" casting mode: normalised in float32, cast, then scaled; SiLU in float32, cast, times up). The modules keep
the originals' parameters and child modules under the same names, so state dicts, LoRA adapters (PEFT wraps the
projections inside the MLP) and checkpoints are unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaModel, LlamaRMSNorm

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


class FusedSwiGLU(nn.Module):
    """LlamaMLP with SiLU(gate) * up in one Liger kernel; the same gate/up/down projection modules."""

    def __init__(self, mlp: LlamaMLP):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._function = liger_ops().LigerSiLUMulFunction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._function.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_llama_kernels(llama: LlamaModel) -> None:
    """Swap every RMSNorm and MLP of `llama` (the decoder stack) for the fused modules, in place."""
    config = llama.config
    if config.hidden_act != "silu" or getattr(config, "mlp_bias", False):
        raise ValueError(f"fused kernels expect Llama's SiLU MLP without biases; got hidden_act={config.hidden_act!r}, "
                         f"mlp_bias={getattr(config, 'mlp_bias', False)}")
    for layer in llama.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if isinstance(norm, LlamaRMSNorm):
                setattr(layer, name, FusedRMSNorm(norm))
        if isinstance(layer.mlp, LlamaMLP):
            layer.mlp = FusedSwiGLU(layer.mlp)
    if isinstance(llama.norm, LlamaRMSNorm):
        llama.norm = FusedRMSNorm(llama.norm)
