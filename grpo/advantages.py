"""Outcome-reward GRPO: group-relative advantages and dynamic sampling.

A group is the G rollouts that started from the same initial condition (same task and init-state index,
REF 9.1.1). `group_ids` may be any integer labels; only equality matters. Rewards are one number per episode
(binary success on LIBERO).
"""

import torch


def _check_rewards_and_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_ids.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D tensors of the same length (one entry per episode), "
            f"got shapes {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: pass at least one episode")
    if not torch.isfinite(rewards.float()).all():
        raise ValueError("rewards contain NaN or inf")


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index 0..n_groups-1 for every episode, and the number of groups."""
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max()) + 1


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + eps) with the unbiased (N-1) std of the episode's group (REF 9.1.3).

    `scale_by_std=False` gives the Dr. GRPO advantage R_i - mean_g (REF 9.1.7). A group with a single episode
    gets advantage 0: its reward has nothing to be compared with. (SVR instead uses mean 0 and std 1 there,
    which turns a lone success into A = 1; we do not.) Groups whose rewards are all equal also get 0.

    rewards: float/bool/int [N], group_ids: int [N] -> float32 [N].
    """
    _check_rewards_and_groups(rewards, group_ids)
    rewards = rewards.to(torch.float32)
    index, n_groups = _group_index(group_ids)
    zeros = torch.zeros(n_groups, device=rewards.device)
    count = zeros.index_add(0, index, torch.ones_like(rewards))
    mean = zeros.index_add(0, index, rewards) / count
    # Exactly 0 for all-equal groups, even where rounding leaves mean != R (e.g. three rewards of 0.1).
    centred = torch.where(informative_groups(rewards, group_ids), rewards - mean[index], 0.0)
    if not scale_by_std:
        return centred
    squared = zeros.index_add(0, index, centred**2)
    # Singletons: centred is 0, so any finite std keeps A = 0; the clamp only avoids 0/0 in the variance.
    std = torch.sqrt(squared / (count - 1).clamp(min=1))
    return centred / (std[index] + eps)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """bool [N]: False for every episode of a group whose rewards are all equal (incl. singleton groups).

    Such groups have A = 0 for every episode and give no gradient (REF 9.1.6); dynamic sampling drops them.
    """
    _check_rewards_and_groups(rewards, group_ids)
    rewards = rewards.to(torch.float32)
    index, n_groups = _group_index(group_ids)
    high = torch.full((n_groups,), -torch.inf, device=rewards.device).scatter_reduce(0, index, rewards, reduce="amax")
    low = torch.full((n_groups,), torch.inf, device=rewards.device).scatter_reduce(0, index, rewards, reduce="amin")
    return (high > low)[index]


def count_groups(keep: torch.Tensor, group_ids: torch.Tensor) -> int:
    """Number of distinct groups with at least one kept episode."""
    _check_keep(keep, group_ids)
    return int(torch.unique(group_ids[keep]).numel())


def select_groups(keep: torch.Tensor, group_ids: torch.Tensor, max_groups: int) -> torch.Tensor:
    """bool [N]: the first `max_groups` kept groups, in order of first appearance; the dynamic-sampling refill.

    The trainer concatenates the rollouts of successive sampling rounds (group ids unique across rounds),
    calls `informative_groups` on the whole, and stops sampling once `count_groups` reaches its target. This
    picks the groups that go into the update, so earlier rounds win and the batch never exceeds the cap.
    """
    _check_keep(keep, group_ids)
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    kept_ids = group_ids[keep]
    first_seen = list(dict.fromkeys(kept_ids.tolist()))[:max_groups]
    chosen = torch.tensor(first_seen, dtype=group_ids.dtype, device=group_ids.device)
    return keep & torch.isin(group_ids, chosen)


def _check_keep(keep: torch.Tensor, group_ids: torch.Tensor) -> None:
    if keep.dtype != torch.bool or keep.dim() != 1 or keep.shape != group_ids.shape:
        raise ValueError(
            f"keep must be a bool [N] tensor matching group_ids [N], got dtype {keep.dtype} shape "
            f"{tuple(keep.shape)} and group_ids shape {tuple(group_ids.shape)}"
        )
