"""Which (task, init state, scene) groups each iteration trains on."""

from typing import Any

import numpy as np

from libero_env import EpisodeSpec

SCENE_DRAWS = 2**31
"""Scenes a group's fixture placement is drawn from (EpisodeSpec.scene)."""


class GroupSampler:
    """Cycles through every (task_id, init_index) pair of the training split, reshuffled on each pass, so all
    pairs are visited equally often; each group gets a fresh scene (the fixtures' random placement), shared by its
    G episodes, so a group's rollouts differ only by the policy's samples. Its state is part of a checkpoint, so a
    resumed run draws the same groups."""

    def __init__(self, task_ids: list[int], init_indices: list[int], seed: int) -> None:
        if not task_ids or not init_indices:
            raise ValueError(f"need at least one task and one init state, got tasks {task_ids} and init states "
                             f"{init_indices}")
        self.task_ids = list(task_ids)
        self.pairs = [(t, i) for t in task_ids for i in init_indices]
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.position = 0

    def next(self, n: int) -> list[EpisodeSpec]:
        """The episodes of the next n groups, one per group."""
        groups = []
        while len(groups) < n:
            if self.position == len(self.order):
                self.order = self.rng.permutation(len(self.pairs)).tolist()
                self.position = 0
            task_id, init_index = self.pairs[self.order[self.position]]
            groups.append(EpisodeSpec(task_id, init_index, scene=int(self.rng.integers(SCENE_DRAWS))))
            self.position += 1
        return groups

    def peek(self, n: int) -> list[EpisodeSpec]:
        """What next(n) will return, leaving the sampler where it is."""
        state = self.state_dict()
        groups = self.next(n)
        self.load_state_dict(state)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = list(state["order"])
        self.position = int(state["position"])
