"""KV-cache decoders for the 7 autoregressive OpenVLA action tokens: `prefill(embeddings)` once, then
`step(embeddings)` per new token, each returning the Llama decoder's last hidden states.

`DynamicDecoder` is the reference: a transformers DynamicCache and a 2D padding mask that grows by one column per
step. One decode step of the 7B model with PEFT LoRA on every linear layer is ~2,000 small kernel launches, so on a
slow host it is bound by the launches, not by the GPU. `GraphDecoder` (CUDA only) runs the same steps on a
transformers StaticCache with a prepared 4D mask, so every step has the same shapes and buffer addresses: the first
step of a new (batch size, prompt length) runs eagerly (warm-up) and is then captured in a CUDA graph; every other
step, in this call and in later calls of that shape, replays it.
Each phase is a named range in torch.profiler traces (bench/profile_gpu.py): `GraphDecoder.prefill`,
`GraphDecoder.capture` (the eager warm-up step, the capture and the graph's instantiation), `GraphDecoder.replay`,
`DynamicDecoder.prefill`, `DynamicDecoder.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import record_function
from transformers import DynamicCache, PretrainedConfig, StaticCache
from transformers.cache_utils import Cache

from vla_actor.cuda_graphs import warm_up_and_capture

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
    """Same results as `DynamicDecoder`, with the decode steps replayed from a CUDA graph. A policy keeps one and
    starts each call with `start(valid, prompt_end)` (a context manager). The captured step, its KV cache and its
    input buffers outlive the call: the next call of the same batch size and prompt length (the policy pads shorter
    prompts to the kept length, `kept_length`) resets them in place and replays from its first step, so only a new
    shape pays for a capture (44-66 ms of a 7B call, bench/results/profile_7b.json). A replay runs the captured
    kernels on the captured tensors: in-place weight updates (the optimizer's) are seen, new modules or a disabled
    adapter are not, so the owner calls `release()` whenever its modules change and before training forwards,
    which need the memory."""

    def __init__(self, forward: LlamaForward, config: PretrainedConfig, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"GraphDecoder needs a CUDA device, got {device}; use DynamicDecoder")
        self._forward = forward
        self._config = config
        self._stream = torch.cuda.Stream(device)
        self._shape: _CapturedShape | None = None
        self._length = 0
        self._steps = 0
        self.captures = 0
        """How many decode steps were captured so far (one per new shape)."""

    def start(self, valid: torch.Tensor, prompt_end: torch.Tensor, new_tokens: int) -> GraphDecoder:
        """Begin a call. valid: bool [B, M], False on right padding; prompt_end: long [B]; new_tokens: how many
        steps follow."""
        batch, self._length = valid.shape
        slots = -(-(self._length + new_tokens) // SLOT_MULTIPLE) * SLOT_MULTIPLE
        key = (batch, self._length, slots)
        if self._shape is None or self._shape.key != key:
            self.release()
            self._shape = _CapturedShape(key, StaticCache(config=self._config, max_cache_len=slots),
                                         torch.zeros(batch, slots, dtype=torch.bool, device=valid.device),
                                         torch.empty(batch, 1, dtype=torch.long, device=valid.device))
        else:
            self._shape.cache.reset()  # in place: the captured step holds the addresses of its tensors
        shape = self._shape
        shape.visible.zero_()
        shape.visible[:, : self._length] = valid
        shape.positions.copy_(prompt_end[:, None])
        self._steps = 0
        return self

    def __enter__(self) -> GraphDecoder:
        return self

    def __exit__(self, error_type, *exc_info) -> None:
        if error_type is not None:  # a call stopped part-way: capture again rather than trust its buffers
            self.release()

    def kept_length(self, batch: int) -> int:
        """The prompt length of the step kept for `batch` samples, 0 if none: a call whose prompts are padded to
        it replays that step."""
        return self._shape.key[1] if self._shape is not None and self._shape.key[0] == batch else 0

    def keep_only_batch(self, batch: int) -> None:
        """Free what is kept for another batch size now, before the caller allocates the next call's activations
        (a 7B KV cache of 64 samples is 9 GiB)."""
        if self._shape is not None and self._shape.key[0] != batch:
            self.release()

    def release(self) -> None:
        """Free the captured step and its KV cache (after the last replay has finished)."""
        if self._shape is not None:
            torch.cuda.current_stream(self._shape.visible.device).synchronize()
            self._shape = None

    def prefill(self, embeddings: torch.Tensor) -> torch.Tensor:
        shape = self._shape
        batch, slots = shape.visible.shape
        if not shape.cache_ready:
            # Allocate the cache before the prefill: lazily, each layer's first update copies its slot counter to
            # the GPU, a blocking copy per layer that held the host in step with the GPU (batch 8: 18 -> 25
            # actions/s).
            config = self._config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            shape.cache.early_initialization(batch, config.num_key_value_heads, head_dim, embeddings.dtype,
                                             embeddings.device)
            shape.cache_ready = True
        causal = torch.ones(self._length, slots, dtype=torch.bool, device=embeddings.device).tril()
        mask = (causal & shape.visible[:, None, :])[:, None]
        positions = torch.arange(self._length, device=embeddings.device).expand(batch, self._length)
        with record_function("GraphDecoder.prefill"):
            return self._forward(embeddings, mask, positions, shape.cache)

    def step(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, 1, D]; the returned hidden states are overwritten by the next step."""
        shape = self._shape
        shape.visible[:, self._length + self._steps] = True
        self._steps += 1
        if shape.graph is not None:
            if self._steps > 1:
                shape.positions.add_(1)
            shape.embeddings.copy_(embeddings)
            with record_function("GraphDecoder.replay"):
                shape.graph.replay()
            return shape.hidden
        shape.embeddings = embeddings.clone()
        mask = shape.visible[:, None, None, :]
        with record_function("GraphDecoder.capture"):
            hidden, shape.graph, shape.hidden = warm_up_and_capture(
                lambda: self._forward(shape.embeddings, mask, shape.positions, shape.cache), self._stream)
        self.captures += 1
        return hidden


@dataclass
class _CapturedShape:
    """What a captured decode step reads and writes, for one (batch, prompt length, cache slots)."""

    key: tuple[int, int, int]
    cache: StaticCache
    visible: torch.Tensor  # bool [B, slots]: the cache slots each sample attends to, one more per step
    positions: torch.Tensor  # long [B, 1]: each sample's position of the current step
    embeddings: torch.Tensor | None = None  # [B, 1, D]: the step's input, copied in before each replay
    hidden: torch.Tensor | None = None  # [B, 1, D]: the captured step's output
    graph: torch.cuda.CUDAGraph | None = None
    cache_ready: bool = False  # the cache's tensors are allocated (at the first prefill, in its dtype)
