"""pi_old computed during the rollout: the update's teacher-forced forward over the steps already played, one
micro-batch at a time, while the simulators execute the actions just sent and the GPU would otherwise wait.

Exactness rests on the shape: every teacher-forced forward of an iteration, here and in the update, runs at the
update's micro-batch size with prompts padded to the tasks' longest (VLAPolicy.log_probs `pad_to`,
`prompt_length`), and at one shape a step's log-probs do not depend on which steps share its batch, so pi_old
computed here equals, bit for bit, what the update's own forward gives before its first optimizer step (the trainer
checks it on the first mini-batch: train/pi_old_rescore_gap_max).
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.rollout import PolicyInputs


@dataclass
class _Step:
    index: int
    group: int
    agentview: np.ndarray
    wrist: np.ndarray | None
    proprio: np.ndarray | None
    instruction: str
    token_ids: torch.Tensor


@dataclass
class _Group:
    held: list[_Step] = field(default_factory=list)
    """Steps kept back until the group is known to be kept (dynamic sampling)."""
    successes: int = 0
    failures: int = 0
    lost: bool = False


class PiOldScorer:
    """Scores the steps of one `play_episodes` call (start ... finish). Only steps of groups the update will use are
    scored: every group without dynamic sampling, and with it a group once it has both a success and a failure
    (then its advantages are non-zero whatever its other episodes do); a group with a lost episode stops being
    scored. Steps left unscored (the last partial micro-batch, groups decided at the end) the update computes."""

    def __init__(self, policy, inputs: PolicyInputs, temperature: float, micro_batch: int, prompt_length: int,
                 dynamic_sampling: bool):
        self.policy, self.inputs, self.temperature = policy, inputs, temperature
        self.micro_batch, self.prompt_length, self.dynamic_sampling = micro_batch, prompt_length, dynamic_sampling
        self.seconds = 0.0
        """Wall time of the forwards of the current call."""
        self._episode_groups = np.zeros(0, dtype=np.int64)
        self._groups: dict[int, _Group] = {}
        self._ready: list[_Step] = []
        self._scored: dict[int, torch.Tensor] = {}

    def start(self, group_ids: np.ndarray) -> None:
        """A new call, whose episode e belongs to group group_ids[e]."""
        self._episode_groups = np.asarray(group_ids)
        self._groups = {int(g): _Group() for g in np.unique(self._episode_groups)}
        self._ready, self._scored, self.seconds = [], {}, 0.0

    def add(self, first_index: int, episodes: np.ndarray, agentview: np.ndarray, wrist: np.ndarray | None,
            proprio: np.ndarray | None, instructions: list[str], token_ids: torch.Tensor) -> None:
        """Steps first_index, first_index + 1, ... of the call, one per row, played in `episodes`."""
        for row, episode in enumerate(episodes):
            group = int(self._episode_groups[episode])
            step = _Step(first_index + row, group, agentview[row], None if wrist is None else wrist[row],
                         None if proprio is None else proprio[row], instructions[row], token_ids[row])
            if self._kept(self._groups[group]):
                self._ready.append(step)
            elif not self._groups[group].lost:
                self._groups[group].held.append(step)

    def episode_ended(self, episode: int, success: bool, lost: bool) -> None:
        group_id = int(self._episode_groups[episode])
        group = self._groups[group_id]
        if lost:
            group.lost, group.held = True, []
            self._ready = [step for step in self._ready if step.group != group_id]
            return
        group.successes += bool(success)
        group.failures += not success
        if self._kept(group) and group.held:
            self._ready.extend(group.held)
            group.held = []

    def score_ready(self) -> None:
        """One micro-batch's forward, if a whole micro-batch of steps is ready (about one rollout round's worth: a
        forward of 16 steps of the 7B takes ~150 ms on an H100, a round's simulator wait ~70 ms)."""
        if len(self._ready) < self.micro_batch:
            return
        steps, self._ready = self._ready[:self.micro_batch], self._ready[self.micro_batch:]
        started = time.perf_counter()
        with torch.no_grad():
            log_probs, _ = self.policy.log_probs(
                np.stack([s.agentview for s in steps]), [s.instruction for s in steps],
                torch.stack([s.token_ids for s in steps]),
                np.stack([s.wrist for s in steps]) if self.inputs.wrist else None,
                np.stack([s.proprio for s in steps]) if self.inputs.proprio else None,
                self.temperature, pad_to=self.micro_batch, prompt_length=self.prompt_length)
        for step, row in zip(steps, log_probs.float().cpu()):
            self._scored[step.index] = row
        self.seconds += time.perf_counter() - started

    def finish(self, num_steps: int, tokens: int) -> torch.Tensor:
        """float32 [num_steps, tokens]: the scored steps' pi_old, NaN for the others. Lets go of the steps (whose
        images would otherwise keep the rounds' arrays alive through the update)."""
        old = torch.full((num_steps, tokens), float("nan"))
        for index, row in self._scored.items():
            old[index] = row
        self._groups, self._ready, self._scored = {}, [], {}
        return old

    def _kept(self, group: _Group) -> bool:
        return not group.lost and (not self.dynamic_sampling or (group.successes > 0 and group.failures > 0))
