"""Data parallelism with torch.distributed under torchrun: one process per GPU (or CPU process with gloo).

Every rank plays its own groups with its own envs (a group is never split, so advantages stay exact), computes
its part of each mini-batch loss with weights normalised over the global mini-batch, and the LoRA gradients
are summed across ranks. In a single process every function here returns at once, so that path pays nothing.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import grpo


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and videos."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_rank() -> int:
    """This process's rank as torchrun announces it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Joins the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo on CPU), or
    returns a single-process context when they are absent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        resolved = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def broadcast_parameters(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Copies rank 0's values into `params` on every rank (the same initial adapter everywhere)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for p in params:
            buffer = p.detach().to(_comm_device(ctx))
            dist.broadcast(buffer, src=0)
            p.copy_(buffer)


def sum_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Sums the gradients of `params` over ranks in one flat all-reduce (missing gradients count as zero)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(_comm_device(ctx), torch.float32) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(device=p.device, dtype=p.dtype)
        offset += g.numel()


def all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, int]:
    """The concatenation over ranks of a tensor whose first dimension differs per rank, and the row where this
    rank's part starts."""
    if not ctx.enabled:
        return tensor, 0
    device = _comm_device(ctx)
    sizes = torch.zeros(ctx.world_size, dtype=torch.long, device=device)
    sizes[ctx.rank] = tensor.shape[0]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=torch.int64, device=device)
    padded[:tensor.shape[0]] = tensor.to(device, torch.int64)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:int(n)] for part, n in zip(parts, sizes)]).to(tensor.device, tensor.dtype)
    return gathered, int(sizes[:ctx.rank].sum())


def token_weights(traj_ids: torch.Tensor, tokens_per_step: int, mode: grpo.Aggregation, ctx: DistContext,
                  constant: float | None = None) -> torch.Tensor:
    """grpo.token_weights [M, tokens_per_step] over the global mini-batch (the union of every rank's rows), for
    this rank's M rows (`traj_ids`), so that the per-rank losses add up to the loss of one process holding all
    the groups. Stored steps have no padding: every token is valid."""
    mask = torch.ones((len(traj_ids), tokens_per_step), dtype=torch.bool)
    if not ctx.enabled:
        return grpo.token_weights(mask, traj_ids, mode, constant)
    all_masks, start = all_gather_rows(mask, ctx)
    all_ids, _ = all_gather_rows(traj_ids + (ctx.rank << 32), ctx)  # trajectories never span ranks
    return grpo.token_weights(all_masks, all_ids, mode, constant)[start:start + mask.shape[0]]


def reduce_values(values: dict[str, float], ctx: DistContext, op: str = "sum") -> dict[str, float]:
    """Element-wise sum, min or max over ranks of a dict of numbers with the same keys on every rank."""
    if not ctx.enabled or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return dict(zip(keys, tensor.tolist()))


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small per-rank state such as RNG)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
