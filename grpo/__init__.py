"""GRPO as pure tensor functions: advantages, dynamic sampling, loss weights, the clipped loss, KL estimators.

No nn.Module, no I/O, no config objects: tensors and plain numbers in, tensors out (in the spirit of verl's
core_algos.py). The trainer composes them; see DESIGN.md "grpo" and REF section 9.
"""

from grpo.advantages import (
    count_groups,
    group_advantages,
    informative_groups,
    select_groups,
)
from grpo.loss import (
    AGGREGATION_MODES,
    Aggregation,
    aggregate,
    kl_k1,
    kl_k3,
    masked_mean,
    policy_loss,
    token_weights,
)

__all__ = [
    "AGGREGATION_MODES",
    "Aggregation",
    "aggregate",
    "count_groups",
    "group_advantages",
    "informative_groups",
    "kl_k1",
    "kl_k3",
    "masked_mean",
    "policy_loss",
    "select_groups",
    "token_weights",
]
