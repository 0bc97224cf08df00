"""CUDA-graph capture shared by the decode steps (`fast_decode.GraphDecoder`), the vision towers (`KeptGraph`) and
the update's Llama stack (`KeptTrainingGraph`): a captured call replays its kernels with one launch, which is what
the 7B needs, as its ViTs, decode steps and layers are thousands of small kernels each
(bench/results/profile_7b.json).

A replay runs the captured kernels on the captured tensors: in-place weight updates (the optimizer's) are seen,
new modules or a disabled adapter are not, and autocast must not cache its casts across the capture (the cached
copies are freed when the autocast block ends). The owner releases a kept graph whenever its modules change.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Sequence

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
    return graph, _captured(graph, run)


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


class KeptTrainingGraph:
    """`function(parameters, *inputs)`, which runs `module` with `parameters` (name -> tensor) in place of its own
    (torch.func.functional_call), and its backward replayed from two CUDA graphs kept for the last input shapes and
    dtypes, with gradients for the module's trainable parameters only (the inputs take none). Eagerly, the 7B's
    Llama stack launches some ten thousand kernels per forward and backward of an update micro-batch, and at
    micro-batches up to 4 the host took longer to launch them than the GPU to run them
    (bench/results/gpu_7b_no_checkpointing_fused.json; replayed: gpu_7b_update_graphs.json).

    A call copies the inputs in, replays the forward and returns its output buffer (overwritten by the next call),
    with gradients enabled differentiable w.r.t. the module's parameters (without, the forward alone: the same
    bits): its backward copies the incoming gradient in, replays the backward graph and hands autograd copies of the
    parameters' gradients (autograd may keep a returned tensor as a parameter's .grad, which the next replay would
    overwrite: pytorch/pytorch#181723). Run each call's backward before the next call.
    A new shape is captured after one eager forward and backward on a side stream (cuBLAS workspaces); the cache is
    emptied between them, as the graphs' pool cannot take memory the warm-up left cached. Warm-up and capture run
    on views of the parameters made on the capture's stream, and the backward graph ends at them: it never reaches
    the parameters' own gradient accumulators, whose stream is the one they were made on (the default stream, while
    an earlier step's autograd graph is alive) and would make the capture wait on it, which CUDA refuses. No gradient
    checkpointing inside `function`: it saves and restores the RNG state, which a capture does not allow."""

    def __init__(self, module: torch.nn.Module, function: Callable[..., torch.Tensor], device: torch.device,
                 name: str):
        if device.type != "cuda":
            raise ValueError(f"KeptTrainingGraph needs a CUDA device, got {device}")
        self._function = function
        self._named = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self._parameters = tuple(self._named.values())
        self._name = name
        self._stream = torch.cuda.Stream(device)
        self._key: tuple | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._output: torch.Tensor | None = None
        self._grad_output: torch.Tensor | None = None
        self._grads: tuple[torch.Tensor | None, ...] = ()
        self._forward: torch.cuda.CUDAGraph | None = None
        self._backward: torch.cuda.CUDAGraph | None = None
        self.captures = 0
        """How many captures so far (one per new input shape)."""

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key != self._key:
            self.release()
            with record_function(f"{self._name}.capture"), torch.enable_grad():
                self._capture(inputs)
            self._key = key
            self.captures += 1
        for kept, x in zip(self._inputs, inputs):
            kept.copy_(x)
        if not torch.is_grad_enabled():
            return self.replay_forward()
        return _ReplayedTraining.apply(self, *self._parameters)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        self._inputs = tuple(x.clone() for x in inputs)
        current = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            views = {name: p.view_as(p) for name, p in self._named.items()}
            warm_up = self._function(views, *self._inputs)
            torch.autograd.grad(warm_up, tuple(views.values()), torch.zeros_like(warm_up), allow_unused=True)
            self._grad_output = torch.empty_like(warm_up)
            del warm_up
        self._stream.synchronize()
        torch.cuda.empty_cache()
        with torch.cuda.stream(self._stream):
            self._forward = torch.cuda.CUDAGraph()
            output = _captured(self._forward, lambda: self._function(views, *self._inputs))
            self._backward = torch.cuda.CUDAGraph()
            self._grads = _captured(self._backward, partial(torch.autograd.grad, output, tuple(views.values()),
                                                            self._grad_output, allow_unused=True),
                                    pool=self._forward.pool())
            self._output = output.detach()
        current.wait_stream(self._stream)

    def replay_forward(self) -> torch.Tensor:
        with record_function(f"{self._name}.forward"):
            self._forward.replay()
        return self._output.detach()

    def replay_backward(self, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        self._grad_output.copy_(grad_output)
        with record_function(f"{self._name}.backward"):
            self._backward.replay()
        return tuple(None if grad is None else grad.clone() for grad in self._grads)

    def release(self) -> None:
        """Free the graphs and their buffers (after the last replay has finished)."""
        if self._forward is not None:
            torch.cuda.current_stream(self._stream.device).synchronize()
        self._key = self._output = self._grad_output = self._forward = self._backward = None
        self._inputs = self._grads = ()


def _captured(graph: torch.cuda.CUDAGraph, run: Callable[[], object], pool: tuple | None = None) -> object:
    """`run()` recorded into `graph` (on the current stream; in `pool` when given), its result returned."""
    graph.capture_begin(pool=pool)
    try:
        result = run()
    except BaseException:
        _abandon(graph)
        raise
    graph.capture_end()
    return result


class _ReplayedTraining(torch.autograd.Function):
    """The autograd node of a KeptTrainingGraph call: inputs are the graph and its parameters."""

    @staticmethod
    def forward(ctx, kept: KeptTrainingGraph, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.kept = kept
        return kept.replay_forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.kept.replay_backward(grad_output))
