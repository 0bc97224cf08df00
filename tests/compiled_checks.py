"""Compiled blocks (VLAPolicy.compile_layers) against the same policy eager: one check for the CPU and GPU tests."""

import numpy as np
import torch
from torch._dynamo.utils import counters

from vla_actor import VLAPolicy

INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "open the drawer", "put the bowl on the stove", "push the plate to the front of the stove",
                "turn on the stove"]


def play_and_train(policy: VLAPolicy, batch: int, instructions: list[str]) -> dict[str, object]:
    """A seeded rollout query, its teacher-forced log-probs without gradients (pi_old) and with them (backward into
    the adapters), and the adapter-disabled log-probs (the KL reference) of the same tokens."""
    frames = np.random.default_rng(batch).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    played = policy.sample(frames, instructions, temperature=1.6,
                           generator=torch.Generator(policy.device).manual_seed(0))
    with torch.no_grad():  # pi_old as --old-log-probs recompute takes it
        old_log_probs, _ = policy.log_probs(frames, instructions, played.token_ids, temperature=1.6)
    log_probs, entropy = policy.log_probs(frames, instructions, played.token_ids, temperature=1.6)
    (-(log_probs.mean() + 0.01 * entropy.mean())).backward()
    gradients = [parameter.grad.cpu() for parameter in policy.trainable_parameters()]
    policy.model.zero_grad(set_to_none=True)
    with policy.adapter_disabled(), torch.no_grad():
        base, _ = policy.log_probs(frames, instructions, played.token_ids, temperature=1.6)
    return {"tokens": played.token_ids, "sampled": played.log_probs, "pi_old": old_log_probs.cpu(),
            "teacher_forced": log_probs.detach().cpu(), "gradients": gradients, "base": base.cpu()}


def assert_compiled_equals_eager(policy: VLAPolicy, backend: str, atol: float) -> None:
    """`policy` (a trained adapter, gradient checkpointing on) eager, then compiled in place: the same sampled
    tokens, and log-probs (sampled, pi_old, with gradients), LoRA gradients and base log-probs within `atol`, and
    pi_old within `atol` of the log-probs with gradients (eager: equal). A second round with another batch size
    and other prompt lengths compiles nothing new (dynamic shapes)."""
    instructions = INSTRUCTIONS[:4]
    eager = play_and_train(policy, 4, instructions)
    policy.compile_layers(backend)
    compiled = play_and_train(policy, 4, instructions)
    assert torch.equal(compiled["tokens"], eager["tokens"])
    for key in ("sampled", "pi_old", "teacher_forced", "base"):
        assert torch.allclose(compiled[key], eager[key], atol=atol), key
    assert torch.allclose(compiled["pi_old"], compiled["teacher_forced"], atol=atol)  # the first PPO ratio
    for got, expected in zip(compiled["gradients"], eager["gradients"], strict=True):
        assert torch.allclose(got, expected, atol=atol, rtol=1e-4)
    assert not torch.equal(compiled["base"], compiled["teacher_forced"])  # the adapters were really bypassed
    graphs = counters["stats"]["unique_graphs"]
    play_and_train(policy, 3, INSTRUCTIONS[2:])
    assert counters["stats"]["unique_graphs"] == graphs
