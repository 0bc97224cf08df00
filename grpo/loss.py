"""Token-level PPO-clip loss with clip-higher, loss-aggregation weights, and KL estimators.

Rows are env steps; each row holds the T action tokens of one policy query (7 for OpenVLA, 56 for an OFT
chunk) and belongs to one trajectory (`traj_ids`). `mask` [M, T] is True on real action tokens and False on
padding. The aggregation over a mini-batch is fixed by `token_weights`, computed once for the whole
mini-batch: the loss of a micro-batch is sum(weights * per-token loss) over its rows, so the micro-batch losses
add up to the mini-batch loss exactly and gradient accumulation changes nothing.
"""

from typing import Literal, get_args

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "constant"]
AGGREGATION_MODES: tuple[str, ...] = get_args(Aggregation)


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool [M, T] tensor, got dtype {mask.dtype} shape {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask has no valid token: every row is padding, there is nothing to train on")


def token_weights(
    mask: torch.Tensor, traj_ids: torch.Tensor, mode: Aggregation = "token-mean", constant: float | None = None
) -> torch.Tensor:
    """Aggregation weights [M, T] for one mini-batch (REF 9.2.4); zero on padding.

    - "token-mean" (DAPO, the default): 1 / (valid tokens in the mini-batch); long episodes weigh more.
    - "seq-mean-token-mean" (original GRPO): every trajectory present in the mini-batch weighs the same; its
      tokens share 1 / (trajectories present) equally, counted over its valid tokens in this mini-batch.
    - "constant" (Dr. GRPO): 1 / constant, default M * T (the mini-batch's token slots, padding included), so
      the normaliser does not depend on episode lengths. Dr. GRPO's constant is fixed ahead of the batch (the
      trainer passes its configured mini-batch's token slots), so a smaller mini-batch weighs less.
    """
    _check_mask(mask)
    if traj_ids.dim() != 1 or traj_ids.shape[0] != mask.shape[0] or traj_ids.dtype.is_floating_point:
        raise ValueError(
            f"traj_ids must be an integer [M] tensor with one id per row of mask [M, T], got dtype "
            f"{traj_ids.dtype} shape {tuple(traj_ids.shape)} for mask shape {tuple(mask.shape)}"
        )
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}")
    if constant is not None and mode != "constant":
        raise ValueError(f"constant={constant} is only used by mode='constant', not mode={mode!r}")
    valid = mask.to(torch.float32)
    if mode == "token-mean":
        return valid / valid.sum()
    if mode == "constant":
        normaliser = float(mask.numel()) if constant is None else float(constant)
        if not normaliser > 0:
            raise ValueError(f"constant must be > 0, got {constant}")
        return valid / normaliser
    _, index = torch.unique(traj_ids, return_inverse=True)
    tokens_per_traj = torch.zeros(int(index.max()) + 1, device=mask.device).index_add(0, index, valid.sum(dim=1))
    trajectories = (tokens_per_traj > 0).sum()
    return valid / (trajectories * tokens_per_traj[index].clamp(min=1))[:, None]


def _every_token(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`mask`, or all True (no padding) when it is None."""
    return torch.ones_like(values, dtype=torch.bool) if mask is None else mask


def aggregate(values: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum(weights * values) over valid tokens (mask None: every token is valid): the loss-side reduction for
    extra per-token terms (entropy bonus, KL to the base model), consistent with `policy_loss` and exact under
    accumulation."""
    mask = _every_token(values, mask)
    if values.shape != mask.shape or weights.shape != mask.shape:
        raise ValueError(
            f"values, weights and mask must share one [M, T] shape, got {tuple(values.shape)}, "
            f"{tuple(weights.shape)}, {tuple(mask.shape)}"
        )
    return torch.where(mask, values * weights, 0.0).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over valid tokens (0 when there are none; mask None: every token); for logging."""
    mask = _every_token(values, mask)
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}")
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log pi - log pi_ref: unbiased for KL(pi || pi_ref) on samples from pi, high variance,
    can be negative (REF 9.4)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, non-negative, low variance (REF 9.4)."""
    log_rho = ref_logp - logp
    return torch.exp(log_rho) - log_rho - 1


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    log_ratio_clamp: float = 5.0,
    advantage_clamp: float | None = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate with clip-higher on per-token ratios (REF 9.2.1, 9.3).

    r = exp(clamp(logp - old_logp, +-log_ratio_clamp)); loss = sum(weights * -min(r A, clip(r, 1 - clip_low,
    1 + clip_high) A)) over valid tokens. The clamp on r is the same for both signs of A; the min leaves the
    gradient on where r is outside the range on the side that makes things worse.

    logp (with grad), old_logp, weights, mask: [M, T] (mask None: no padding); advantages: [M] (one per row, the
    same on its T tokens) or [M, T]. `advantage_clamp` limits |A| (None: no limit).

    Returns the scalar loss and detached statistics over valid tokens: clip_frac_low (A < 0 and
    r < 1 - clip_low), clip_frac_high (A > 0 and r > 1 + clip_high), clip_frac (their sum), ratio_mean/min/max
    (the clamped ratio that enters the loss), approx_kl_k1 and approx_kl_k3 of KL(old || new) from the
    unclamped log-ratio (the rollout samples come from the old policy).
    """
    mask = _every_token(logp, mask)
    _check_mask(mask)
    if logp.shape != mask.shape or old_logp.shape != mask.shape or weights.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp, weights and mask must share one [M, T] shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(weights.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape == mask.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != mask.shape:
        raise ValueError(
            f"advantages must be [M] or [M, T] = {tuple(mask.shape)}, got shape {tuple(advantages.shape)}"
        )
    if not 0 < clip_low < 1 or not clip_high > 0:
        raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got clip_low={clip_low} clip_high={clip_high}")
    if not log_ratio_clamp > 0 or (advantage_clamp is not None and not advantage_clamp > 0):
        raise ValueError(
            f"log_ratio_clamp and advantage_clamp must be > 0 (advantage_clamp may be None), got "
            f"{log_ratio_clamp} and {advantage_clamp}"
        )

    advantages = advantages.detach()
    if advantage_clamp is not None:
        advantages = advantages.clamp(-advantage_clamp, advantage_clamp)
    # Padding may hold garbage (even NaN); zero it before exp so nothing non-finite reaches the graph.
    log_ratio = torch.where(mask, logp - old_logp.detach(), 0.0)
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.where(mask, weights * torch.maximum(unclipped, clipped), 0.0).sum()

    with torch.no_grad():
        low = (advantages < 0) & (ratio < 1 - clip_low)
        high = (advantages > 0) & (ratio > 1 + clip_high)
        valid_ratio = ratio[mask]
        stats = {
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "clip_frac": masked_mean((low | high).float(), mask),
            "ratio_mean": valid_ratio.mean(),
            "ratio_min": valid_ratio.min(),
            "ratio_max": valid_ratio.max(),
            "approx_kl_k1": masked_mean(kl_k1(old_logp, logp), mask),
            "approx_kl_k3": masked_mean(kl_k3(old_logp, logp), mask),
        }
    return loss, stats
