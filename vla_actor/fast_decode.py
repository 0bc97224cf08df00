"""KV-cache decoders for the 7 autoregressive OpenVLA action tokens: `prefill(embeddings)` once, then
`step(embeddings)` per new token, each returning the Llama decoder's last hidden states.

`DynamicDecoder` is the reference: a transformers DynamicCache and a 2D padding mask that grows by one column per
step. One decode step of the 7B model with PEFT LoRA on every linear layer is ~2,000 small kernel launches, so on a
slow host it is bound by the launches, not by the GPU. `GraphDecoder` (CUDA only) runs the same steps on a
transformers StaticCache with a prepared 4D mask, so every step has the same shapes and buffer addresses: the first
step runs eagerly (warm-up), is then captured in a CUDA graph, and the remaining steps replay it. The capture lives
for one `sample` call, so batch size and prompt length may change between calls and adapter updates are always seen.
Each phase is a named range in torch.profiler traces (bench/profile_gpu.py): `GraphDecoder.prefill`,
`GraphDecoder.capture` (the eager warm-up step, the capture and the graph's instantiation), `GraphDecoder.replay`,
`DynamicDecoder.prefill`, `DynamicDecoder.step`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import record_function
from transformers import DynamicCache, PretrainedConfig, StaticCache
from transformers.cache_utils import Cache

# (embeddings [B, Q, D], attention mask, position ids [B, Q], KV cache) -> last hidden states [B, Q, D]
LlamaForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache], torch.Tensor]
# Cache slots are rounded up to this many, so mask rows stay aligned for the fused attention kernels.
SLOT_MULTIPLE = 16


class DynamicDecoder:
    """Eager decoding on a DynamicCache (one kernel launch per op); the reference for `GraphDecoder`."""

    def __init__(self, forward: LlamaForward, config: PretrainedConfig, valid: torch.Tensor, prompt_end: torch.Tensor):
        """valid: bool [B, M], False on right padding; prompt_end: long [B], each sample's first free position."""
        self._forward = forward
        self._cache = DynamicCache(config=config)
        self._mask = valid.long()
        self._positions = prompt_end[:, None]

    def __enter__(self) -> DynamicDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def prefill(self, embeddings: torch.Tensor) -> torch.Tensor:
        batch, length = self._mask.shape
        positions = torch.arange(length, device=embeddings.device).expand(batch, length)
        with record_function("DynamicDecoder.prefill"):
            hidden = self._forward(embeddings, self._mask, positions, self._cache)
        if self._cache.get_seq_length() != length:
            raise RuntimeError(f"the KV cache holds {self._cache.get_seq_length()} positions after a prefill of "
                               f"{length}: this transformers version ignored the cache argument")
        return hidden

    def step(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, 1, D] of each sample's next token, placed at its own next position."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        with record_function("DynamicDecoder.step"):
            hidden = self._forward(embeddings, self._mask, self._positions, self._cache)
        self._positions = self._positions + 1
        return hidden


class GraphDecoder:
    """Same results as `DynamicDecoder`, with steps 2.. replayed from a CUDA graph. Use it as a context manager:
    leaving the block waits for the last replay before the graph and its memory are released."""

    def __init__(self, forward: LlamaForward, config: PretrainedConfig, valid: torch.Tensor, prompt_end: torch.Tensor,
                 new_tokens: int, stream: torch.cuda.Stream):
        """valid: bool [B, M], False on right padding; prompt_end: long [B]; new_tokens: how many steps follow;
        stream: a side stream for warm-up and capture, best reused across calls (cuBLAS keeps a workspace per
        stream)."""
        if valid.device.type != "cuda":
            raise ValueError(f"GraphDecoder needs a CUDA device, got {valid.device}; use DynamicDecoder")
        batch, self._length = valid.shape
        self._stream = stream
        slots = -(-(self._length + new_tokens) // SLOT_MULTIPLE) * SLOT_MULTIPLE
        self._forward = forward
        self._config = config
        self._cache = StaticCache(config=config, max_cache_len=slots)
        # Which cache slots each sample attends to: its valid prompt, then one more slot per step. Static buffers:
        # the captured step reads them, and they are updated in place between replays.
        self._visible = torch.zeros(batch, slots, dtype=torch.bool, device=valid.device)
        self._visible[:, : self._length] = valid
        self._positions = prompt_end[:, None].clone()
        self._embeddings: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._steps = 0

    def __enter__(self) -> GraphDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        torch.cuda.current_stream(self._visible.device).synchronize()
        self._graph = None

    def prefill(self, embeddings: torch.Tensor) -> torch.Tensor:
        batch, slots = self._visible.shape
        # Allocate the cache before the prefill: lazily, each layer's first update copies its slot counter to the
        # GPU, a blocking copy per layer that held the host in step with the GPU (batch 8: 18 -> 25 actions/s).
        config = self._config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._cache.early_initialization(batch, config.num_key_value_heads, head_dim, embeddings.dtype,
                                         embeddings.device)
        causal = torch.ones(self._length, slots, dtype=torch.bool, device=embeddings.device).tril()
        mask = (causal & self._visible[:, None, :])[:, None]
        positions = torch.arange(self._length, device=embeddings.device).expand(batch, self._length)
        with record_function("GraphDecoder.prefill"):
            return self._forward(embeddings, mask, positions, self._cache)

    def step(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, 1, D]; the returned hidden states are overwritten by the next step."""
        self._visible[:, self._length + self._steps] = True
        self._steps += 1
        if self._graph is not None:
            self._positions.add_(1)
            self._embeddings.copy_(embeddings)
            with record_function("GraphDecoder.replay"):
                self._graph.replay()
            return self._hidden
        self._embeddings = embeddings.clone()
        mask = self._visible[:, None, None, :]
        current, side = torch.cuda.current_stream(embeddings.device), self._stream
        # Warm up on the capture stream (cuBLAS workspaces, attention plans), then record the same step.
        side.wait_stream(current)
        with torch.cuda.stream(side), record_function("GraphDecoder.capture"):
            hidden = self._forward(self._embeddings, mask, self._positions, self._cache)
            self._graph = torch.cuda.CUDAGraph()
            self._graph.capture_begin()
            self._hidden = self._forward(self._embeddings, mask, self._positions, self._cache)
            self._graph.capture_end()
        current.wait_stream(side)
        hidden.record_stream(current)  # allocated on the side stream, read on this one
        return hidden
