"""CUDA-graph capture shared by the decode steps (`fast_decode.GraphDecoder`) and the vision towers
(`KeptGraph`): a captured call replays its kernels with one launch, which is what a 7B query needs, as its ViTs and
decode steps are thousands of small kernels each (bench/results/profile_7b.json).

A replay runs the captured kernels on the captured tensors: in-place weight updates (the optimizer's) are seen,
new modules or a disabled adapter are not, and autocast must not cache its casts across the capture (the cached
copies are freed when the autocast block ends). The owner releases a kept graph whenever its modules change.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.profiler import record_function


def warm_up_and_capture(run: Callable[[], torch.Tensor],
                        stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `run()` once eagerly on the side `stream` (cuBLAS workspaces, attention plans), then `capture` it there.
    Returns the eager run's output (this call's result, readable on the current stream), the graph and the graph's
    output buffer. Reuse the stream across captures: cuBLAS keeps a workspace per stream."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        output = run()
        graph, graph_output = capture(run)
    current.wait_stream(stream)
    output.record_stream(current)  # allocated on the side stream, read on this one
    return output, graph, graph_output


def capture(run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record `run()` (on the current stream, after a warm-up by the caller) into a graph with a memory pool of its
    own.

    Pools are not shared between captures: PyTorch 2.11's caching allocators assert (use_count > 0) when a pool is
    captured into again after all its graphs are gone (on an H100 that failed every second capture into one kept
    torch.cuda.MemPool, and dropping the pool afterwards aborted the process). A dropped graph's pool is handed back
    when the allocator next needs memory outside a capture; during a capture it cannot be, so if the capture runs
    out of memory under the limit, the cache is emptied outside the capture and the capture tried once more. Any
    error inside the capture reaches the caller as itself, with the stream out of capture mode."""
    try:
        return _capture_once(run)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
    return _capture_once(run)


def _capture_once(run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin()
    try:
        output = run()
    except BaseException:
        _abandon(graph)
        raise
    graph.capture_end()
    return graph, output


def _abandon(graph: torch.cuda.CUDAGraph) -> None:
    """Take the stream out of capture mode after an error inside the capture. Ending a capture that the error
    invalidated raises too; that second error only says the capture is unusable, which is why it is dropped."""
    with contextlib.suppress(RuntimeError):
        graph.capture_end()


class KeptGraph:
    """`function(x)` replayed from a CUDA graph, kept for the last input shape and dtype: a call of that shape copies
    `x` into the captured input and replays; another shape captures anew (after one eager warm-up call on a side
    stream). The returned tensor is the graph's output buffer, overwritten by the next call: use it before then."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], device: torch.device, name: str):
        if device.type != "cuda":
            raise ValueError(f"KeptGraph needs a CUDA device, got {device}")
        self._function = function
        self._name = name  # of its ranges in torch.profiler traces: <name>.capture, <name>.replay
        self._stream = torch.cuda.Stream(device)
        self._key: tuple | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0
        """How many captures so far (one per new input shape)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key == self._key:
            self._input.copy_(x)
            with record_function(f"{self._name}.replay"):
                self._graph.replay()
            return self._output
        self.release()
        self._input = x.clone()
        with record_function(f"{self._name}.capture"):
            output, self._graph, self._output = warm_up_and_capture(lambda: self._function(self._input),
                                                                    self._stream)
        self._key = key
        self.captures += 1
        return output

    def release(self) -> None:
        """Free the graph and its buffers (after the last replay has finished)."""
        if self._graph is not None:
            torch.cuda.current_stream(self._input.device).synchronize()
        self._key = self._input = self._output = self._graph = None
