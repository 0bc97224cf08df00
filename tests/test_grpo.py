"""grpo/: every number here is computed by hand in the comment next to it."""

import math

import pytest
import torch

from grpo import (
    AGGREGATION_MODES,
    aggregate,
    count_groups,
    group_advantages,
    informative_groups,
    kl_k1,
    kl_k3,
    masked_mean,
    policy_loss,
    select_groups,
    token_weights,
)

torch.set_num_threads(1)


def test_group_advantages_two_of_four():
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> A = +-0.5 / 0.57735 = +-0.8660
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(adv, torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4)


def test_group_advantages_one_success_in_eight():
    # REF 9.1.4: p = 1/8, s = sqrt(8/7 * p (1 - p)) = 0.35355; success 0.875 / s = 2.4749, failure -0.125 / s
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, torch.full((8,), 3))
    assert adv[2].item() == pytest.approx(2.4749, abs=1e-4)
    assert torch.allclose(adv[rewards == 0], torch.full((7,), -0.35355), atol=1e-4)


def test_groups_are_independent_and_labels_arbitrary():
    # group 7: [1, 0] -> mean 0.5, std sqrt(0.5) -> +-0.7071; group -2: [1, 1, 1] all equal -> 0;
    # group 40 singleton -> 0
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([7, -2, 7, -2, -2, 40])
    adv = group_advantages(rewards, groups)
    assert torch.allclose(adv, torch.tensor([0.7071, 0.0, -0.7071, 0.0, 0.0, 0.0]), atol=1e-4)


def test_all_equal_groups_get_exactly_zero():
    # The float32 mean of eight 0.7s is 0.7 - 6e-8; without care that residual over a tiny std gives A = 0.056.
    adv = group_advantages(torch.full((8,), 0.7), torch.zeros(8, dtype=torch.long))
    assert (adv == 0).all()


def test_dr_grpo_has_no_std_and_scaling_invariance_with_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(group_advantages(rewards, groups, scale_by_std=False), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # REF 9.1.6: a reward of c * success gives the same A when dividing by the std (up to eps).
    assert torch.allclose(group_advantages(5 * rewards, groups), group_advantages(rewards, groups), atol=1e-5)
    # Boolean successes are accepted as rewards.
    assert torch.allclose(group_advantages(rewards.bool(), groups), group_advantages(rewards, groups))


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.ones(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        group_advantages(torch.ones(0), torch.zeros(0, dtype=torch.long))


def test_informative_groups_and_dynamic_sampling():
    # groups: 0 all success, 1 mixed, 2 all fail, 3 mixed, 4 singleton
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    keep = informative_groups(rewards, groups)
    assert keep.tolist() == [False, False, True, True, False, False, True, True, False]
    assert count_groups(keep, groups) == 2
    # Refill: a second round appends groups 5 (mixed) and 6 (mixed); a cap of 3 takes 1, 3, then 5.
    rewards = torch.cat([rewards, torch.tensor([0.0, 1.0, 1.0, 0.0])])
    groups = torch.cat([groups, torch.tensor([5, 5, 6, 6])])
    keep = informative_groups(rewards, groups)
    chosen = select_groups(keep, groups, max_groups=3)
    assert torch.unique(groups[chosen]).tolist() == [1, 3, 5]
    assert chosen.sum().item() == 6
    assert select_groups(keep, groups, max_groups=10).tolist() == keep.tolist()
    with pytest.raises(ValueError, match="max_groups"):
        select_groups(keep, groups, max_groups=0)
    with pytest.raises(ValueError, match="keep must be a bool"):
        count_groups(keep.long(), groups)


MASK = torch.tensor([[True, True], [True, False], [True, True]])
TRAJ = torch.tensor([4, 4, 9])


def test_token_weights_by_hand():
    # 5 valid tokens of 6 slots; trajectory 4 owns 3 valid tokens, trajectory 9 owns 2.
    assert torch.allclose(token_weights(MASK, TRAJ, "token-mean"), MASK / 5)
    seq = token_weights(MASK, TRAJ, "seq-mean-token-mean")
    # 2 trajectories: each gets 1/2, shared by its tokens -> 1/6 each for trajectory 4, 1/4 each for trajectory 9
    assert torch.allclose(seq, torch.tensor([[1 / 6, 1 / 6], [1 / 6, 0.0], [1 / 4, 1 / 4]]))
    assert torch.allclose(token_weights(MASK, TRAJ, "constant"), MASK / 6)
    assert torch.allclose(token_weights(MASK, TRAJ, "constant", constant=10.0), MASK / 10)
    for mode in AGGREGATION_MODES:
        assert (token_weights(MASK, TRAJ, mode)[~MASK] == 0).all()


def test_token_weights_bad_inputs():
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'.*token-mean"):
        token_weights(MASK, TRAJ, "mean")
    with pytest.raises(ValueError, match="traj_ids"):
        token_weights(MASK, TRAJ[:2], "token-mean")
    with pytest.raises(ValueError, match="bool"):
        token_weights(MASK.float(), TRAJ, "token-mean")
    with pytest.raises(ValueError, match="no valid token"):
        token_weights(torch.zeros(2, 7, dtype=torch.bool), TRAJ[:2], "token-mean")
    with pytest.raises(ValueError, match="only used by mode='constant'"):
        token_weights(MASK, TRAJ, "token-mean", constant=3.0)
    with pytest.raises(ValueError, match="constant must be > 0"):
        token_weights(MASK, TRAJ, "constant", constant=0.0)


def _one_token_loss(ratio: float, advantage: float) -> tuple[float, float, dict]:
    """Loss and d loss / d logp for one token with weight 1 and the given ratio and advantage."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), mask)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_grad, low, high",
    [
        (1.5, 1.0, -1.28, 0.0, 0, 1),  # A>0, r above 1+0.28: clipped to -1.28, no gradient
        (0.5, -1.0, 0.8, 0.0, 1, 0),  # A<0, r below 1-0.2: clipped to 0.8, no gradient
        (1.5, -1.0, 1.5, 1.5, 0, 0),  # A<0, r high (the harmful side): max(1.5, 1.28) = 1.5, d/dlogp = -A r = 1.5
        (0.5, 1.0, -0.5, -0.5, 0, 0),  # A>0, r low (the harmful side): -min(0.5, 0.8) = -0.5, d/dlogp = -A r
        (1.1, 2.0, -2.2, -2.2, 0, 0),  # inside [0.8, 1.28]: -r A
        (1.25, 1.0, -1.25, -1.25, 0, 0),  # clip-higher: 1.25 > 1.2 but < 1.28 still learns
    ],
)
def test_policy_loss_clip_higher_by_hand(ratio, advantage, expected_loss, expected_grad, low, high):
    loss, grad, stats = _one_token_loss(ratio, advantage)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert grad == pytest.approx(expected_grad, abs=1e-6)
    assert stats["clip_frac_low"].item() == low
    assert stats["clip_frac_high"].item() == high
    assert stats["clip_frac"].item() == low + high


def test_policy_loss_clamps_log_ratio_and_advantage():
    # log-ratio 10 is clamped to 5: r = e^5 = 148.41; with A = -1 the loss is 148.41 and the clamp stops the gradient.
    loss, grad, stats = _one_token_loss(math.exp(10.0), -1.0)
    assert loss == pytest.approx(math.exp(5.0), rel=1e-5)
    assert grad == 0.0
    assert stats["ratio_max"].item() == pytest.approx(math.exp(5.0), rel=1e-5)
    # A = 25 is clamped to the default 10: r = 1 -> loss -10; without the clamp -25.
    mask = torch.ones(1, 1, dtype=torch.bool)
    args = (torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([25.0]), torch.ones(1, 1), mask)
    assert policy_loss(*args)[0].item() == pytest.approx(-10.0)
    assert policy_loss(*args, advantage_clamp=None)[0].item() == pytest.approx(-25.0)


def test_policy_loss_stats_over_valid_tokens_only():
    # Row 0 (A=+1): ratios 1.5 (clipped high) and 1.0; row 1 (A=-1): ratio 0.5 (clipped low) and a padded token.
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 7.0]]))
    mask = torch.tensor([[True, True], [True, False]])
    weights = token_weights(mask, torch.tensor([0, 1]), "token-mean")
    loss, stats = policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), weights, mask)
    # (-1.28 - 1.0 + 0.8) / 3
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 0.8) / 3, abs=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    # KL(old || new) on the old policy's samples: k1 = mean(old - new) = -(ln 1.5 + 0 + ln 0.5) / 3
    assert stats["approx_kl_k1"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3, abs=1e-6)
    # k3 = mean(r - ln r - 1) = ((0.5 - ln 1.5) + 0 + (-0.5 - ln 0.5)) / 3
    expected_k3 = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3
    assert stats["approx_kl_k3"].item() == pytest.approx(expected_k3, abs=1e-6)
    assert all(not value.requires_grad for value in stats.values())


def test_policy_loss_first_minibatch_is_on_policy():
    # logp == old_logp: ratio 1 everywhere, nothing clipped, both KL estimates 0, loss = -sum(w A).
    logp = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    mask = torch.ones(4, 7, dtype=torch.bool)
    weights = token_weights(mask, torch.arange(4), "token-mean")
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    loss, stats = policy_loss(logp, logp.clone(), advantages, weights, mask)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + 2.0 + 0.5) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["approx_kl_k1"].item() == 0.0 and stats["approx_kl_k3"].item() == 0.0


def test_padding_never_reaches_loss_or_gradient():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), -3.0]], requires_grad=True)
    old_logp = torch.tensor([[-1.2, -1.9, float("nan")], [-0.4, -1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    weights = token_weights(mask, torch.tensor([0, 1]), "token-mean")
    loss, stats = policy_loss(logp, old_logp, advantages, weights, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert (logp.grad[~mask] == 0).all()
    # Equal to the loss of the valid tokens alone: ratios e^0.2, e^-0.1 (A=+1) and e^-0.1 (A=-1), all inside the range.
    expected = (-math.exp(0.2) - math.exp(-0.1) + math.exp(-0.1)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batches_add_up_to_the_mini_batch(mode):
    generator = torch.Generator().manual_seed(1)
    rows, tokens = 10, 7
    mask = torch.rand(rows, tokens, generator=generator) > 0.2
    mask[:, 0] = True
    traj_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    advantages = torch.randn(rows, generator=generator)
    old_logp = -torch.rand(rows, tokens, generator=generator) * 5
    base_logp = old_logp + 0.4 * torch.randn(rows, tokens, generator=generator)  # some ratios clip
    weights = token_weights(mask, traj_ids, mode)

    full_logp = base_logp.clone().requires_grad_(True)
    full_loss, _ = policy_loss(full_logp, old_logp, advantages, weights, mask)
    full_loss.backward()

    micro_logp = base_logp.clone().requires_grad_(True)
    total = torch.zeros(())
    for rows_of_micro in torch.arange(rows).split(3):
        loss, _ = policy_loss(micro_logp[rows_of_micro], old_logp[rows_of_micro], advantages[rows_of_micro],
                              weights[rows_of_micro], mask[rows_of_micro])
        loss.backward()
        total += loss.detach()
    assert total.item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert torch.allclose(micro_logp.grad, full_logp.grad, atol=1e-7)


def test_token_mean_equals_mean_over_valid_tokens():
    # With token-mean weights and unclipped ratios the loss is the plain mean of -r A over valid tokens.
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    loss, _ = policy_loss(logp, logp, advantages, token_weights(mask, torch.tensor([0, 1]), "token-mean"), mask)
    assert loss.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)


def test_kl_estimators_by_hand():
    logp, ref_logp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref_logp).item() == pytest.approx(math.log(2.0))  # ln 0.5 - ln 0.25
    assert kl_k3(logp, ref_logp).item() == pytest.approx(0.5 + math.log(2.0) - 1)  # rho = 0.5: 0.5 - ln 0.5 - 1
    assert kl_k3(ref_logp, logp).item() == pytest.approx(2.0 - math.log(2.0) - 1)  # rho = 2
    assert kl_k3(logp, logp).item() == 0.0
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregate_and_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    weights = token_weights(mask, torch.tensor([0, 1]), "seq-mean-token-mean")
    # trajectory 0: (1 + 2) / 2 = 1.5, trajectory 1: 3 -> (1.5 + 3) / 2
    assert aggregate(values, weights, mask).item() == pytest.approx(2.25)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(values, mask[:1])


def test_policy_loss_bad_inputs():
    mask = torch.ones(2, 7, dtype=torch.bool)
    logp, weights = torch.zeros(2, 7), torch.full((2, 7), 1 / 14)
    with pytest.raises(ValueError, match=r"share one \[M, T\] shape"):
        policy_loss(logp, torch.zeros(2, 56), torch.zeros(2), weights, mask)
    with pytest.raises(ValueError, match=r"advantages must be \[M\] or \[M, T\]"):
        policy_loss(logp, logp, torch.zeros(3), weights, mask)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, logp, torch.zeros(2), weights, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        policy_loss(logp, logp, torch.zeros(2), weights, mask, log_ratio_clamp=0.0)
    with pytest.raises(ValueError, match="no valid token"):
        policy_loss(logp, logp, torch.zeros(2), weights, torch.zeros(2, 7, dtype=torch.bool))


def test_no_mask_means_every_token_is_valid():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    weights = torch.full((2, 2), 0.25)
    # ratio 1 everywhere: loss = sum(0.25 * -A) = 0.25 * (-1 - 1 - 2 - 2) = -1.5
    loss, stats = policy_loss(logp, logp, torch.tensor([1.0, 2.0]), weights)
    assert loss.item() == pytest.approx(-1.5) and stats["ratio_mean"].item() == 1.0
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert aggregate(values, weights).item() == pytest.approx(2.5)  # 0.25 * 10
    assert masked_mean(values).item() == pytest.approx(2.5)  # 10 / 4
