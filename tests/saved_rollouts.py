"""Rollouts saved by one process and read by the ranks of a torchrun job, so that both play the same episodes."""

from pathlib import Path

import torch

from trainer.rollout import Rollouts

PER_EPISODE = ("step_episode", "group_ids", "task_ids", "success", "lengths", "lost")


def save_rollouts(batch: Rollouts, path: Path) -> None:
    """An OpenVLA batch (agentview only) as a weights_only-loadable file."""
    torch.save({"agentview": torch.from_numpy(batch.agentview), "instructions": batch.instructions,
                "token_ids": batch.token_ids, "log_probs": batch.log_probs,
                **{k: torch.from_numpy(getattr(batch, k)) for k in PER_EPISODE}}, path)


def load_rollouts(path: Path) -> Rollouts:
    saved = torch.load(path, weights_only=True)
    return Rollouts(agentview=saved["agentview"].numpy(), wrist=None, proprio=None,
                    instructions=saved["instructions"], token_ids=saved["token_ids"], log_probs=saved["log_probs"],
                    **{k: saved[k].numpy() for k in PER_EPISODE})
