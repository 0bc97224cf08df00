"""The trainer on the toy env with a tiny look-alike OpenVLA (CPU): group collection with dynamic sampling,
gradient accumulation, non-finite steps, checkpoints and an exact resume after SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import grpo
from libero_env import EpisodeSpec
from libero_env.toy import ToyVectorEnv
from OpenVLA_GRPO import GRPOTrainer, parse_command, rollout_metrics, shuffled_minibatches
from trainer import distributed
from trainer.checkpoint import (CHECKPOINTS, checkpoint_dirs, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from trainer.config import GrpoConfig
from trainer.evaluation import EVALS_DIR, evaluate
from trainer.metrics import UpdateStats, read_metrics
from trainer.rollout import (PolicyInputs, Rollouts, collect_groups, first_tasks, next_episode, play_episodes,
                             refill_groups)
from trainer.sampler import GroupSampler

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
VOLATILE = ("time", "perf/")  # wall-clock values differ between two identical runs


def toy_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--task-suite", "toy", "--num-envs", "4", "--group-size", "4",
            "--groups-per-iteration", "2", "--mini-batch-size", "16", "--micro-batch-size", "8", "--lora-rank", "4",
            "--lora-alpha", "4", "--lr", "3e-3", "--eval-every", "2", "--eval-episodes-per-task", "1",
            "--num-videos", "1", "--no-gradient-checkpointing", "--no-progress", "--output-dir", str(output_dir),
            *extra]


def toy_trainer(checkpoint: Path, output_dir: Path, *extra: str) -> GRPOTrainer:
    return GRPOTrainer(parse_command(["train", *toy_args(checkpoint, output_dir, *extra)]))


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def test_group_sampler_visits_every_pair_once_per_pass_and_resumes():
    sampler = GroupSampler([0, 2], [5, 6, 7], seed=[3, 0])
    first_pass = sampler.next(6)
    assert sorted((s.task_id, s.init_index) for s in first_pass) == [(0, 5), (0, 6), (0, 7), (2, 5), (2, 6), (2, 7)]
    assert len({s.scene for s in first_pass}) == 6 and all(s.scene >= 0 for s in first_pass)  # a new scene each
    state = json.loads(json.dumps(sampler.state_dict()))  # checkpoints keep it as JSON
    expected = sampler.next(8)
    restored = GroupSampler([0, 2], [5, 6, 7], seed=[99, 0])
    restored.load_state_dict(state)
    assert restored.next(8) == expected
    assert GroupSampler([0, 2], [5, 6, 7], seed=[3, 1]).next(6) != first_pass  # another rank, another order
    peeked = restored.peek(5)  # across the end of a pass
    assert restored.peek(5) == peeked and restored.next(5) == peeked


def test_next_episode_spreads_the_first_over_tasks_and_keeps_each_env_on_its_task():
    tasks = [0] * 3 + [1] * 3 + [2] * 2  # e.g. held-out episodes sorted by task
    pending = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}
    busy: list[int] = []
    for _ in range(3):  # three idle envs start
        busy.append(tasks[next_episode(pending, None, busy)])
    assert busy == [0, 1, 2]
    assert next_episode(pending, 1, busy) == 4  # env 1 finished: another episode of its task
    pending = {2: [], 5: [4, 5]}
    assert next_episode(pending, 2, [5]) == 4  # its task has none left: it switches


class ScriptedEnv:
    """Episode lengths set by the init index; success when the length is even. A reset with wait=False takes
    effect on the next step call, as LiberoVectorEnv's does. Counts step calls."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs, self.step_calls = num_envs, 0
        self.length, self.steps = np.zeros(num_envs, int), np.zeros(num_envs, int)
        self.starting = np.zeros(num_envs, bool)
        self.instructions = [""] * num_envs

    def reset(self, specs, envs, wait=True):
        for i, spec in zip(envs, specs):
            self.length[i], self.steps[i], self.instructions[i] = spec.init_index, 0, f"task {spec.task_id}"
            self.starting[i] = not wait
        return self.observation()

    def observation(self):
        return SimpleNamespace(agentview=np.zeros((self.num_envs, 224, 224, 3), np.uint8), wrist=None, proprio=None,
                               instructions=list(self.instructions))

    def send_step(self, actions, envs=None):
        pass

    def receive_step(self, envs=None):
        self.step_calls += 1
        running = ~self.starting
        self.steps[running] = np.minimum(self.steps[running] + 1, self.length[running])
        started, self.starting = self.starting, np.zeros(self.num_envs, bool)
        done = running & (self.steps == self.length)
        return SimpleNamespace(obs=self.observation(), done=done, success=done & (self.length % 2 == 0),
                               steps=self.steps.copy(), lost=np.zeros(self.num_envs, bool), started=started)


class ZeroPolicy:
    """Zero actions and tokens, whatever it is shown."""

    def sample(self, agentview, instructions, wrist, proprio, temperature, greedy):
        batch = len(agentview)
        return SimpleNamespace(actions=np.zeros((batch, 7), np.float32), token_ids=torch.zeros(batch, 7),
                               log_probs=torch.zeros(batch, 7))


def test_play_episodes_refills_an_env_as_soon_as_its_episode_ends():
    env = ScriptedEnv(num_envs=2)
    specs = [EpisodeSpec(0, 6), EpisodeSpec(0, 1), EpisodeSpec(0, 2), EpisodeSpec(0, 2), EpisodeSpec(0, 1)]
    result = play_episodes(env, ZeroPolicy(), specs, np.zeros(5, int), PolicyInputs(wrist=False, proprio=False),
                           temperature=1.0, greedy=False, keep_steps=True)
    # a reset here takes one step call. Env 0: 6 steps, a reset, the last 1-step episode. Env 1 meanwhile: 1 step,
    # reset, 2 steps, reset, 2 steps: 8 calls (lockstep batches of 2 would take 6 + 2 + 1)
    assert env.step_calls == 8
    assert result.lengths.tolist() == [6, 1, 2, 2, 1] and result.success.tolist() == [True, False, True, True, False]
    assert np.bincount(result.step_episode).tolist() == [6, 1, 2, 2, 1]


def test_play_episodes_starts_each_env_on_the_task_it_held_in_the_last_call():
    env, inputs = ScriptedEnv(num_envs=2), PolicyInputs(wrist=False, proprio=False)

    def play(specs, env_tasks):
        play_episodes(env, ZeroPolicy(), specs, np.zeros(len(specs), int), inputs, temperature=1.0, greedy=True,
                      keep_steps=False, env_tasks=env_tasks)
        return env.instructions  # each env's last episode

    held: list[int | None] = [None, None]
    # env 0 plays task 0 (1 step), then the task-1 episode left while env 1 plays its 3 steps of task 1
    assert play([EpisodeSpec(0, 1), EpisodeSpec(1, 3), EpisodeSpec(1, 1)], held) == ["task 1", "task 1"]
    assert held == [1, 1]
    # the next call: env 0 takes the task-1 episode it holds the scene of, env 1 (task 1 gone) switches to task 0
    assert play([EpisodeSpec(0, 2), EpisodeSpec(1, 2)], held) == ["task 1", "task 0"] and held == [1, 0]
    # without the carried tasks the first episodes spread over the tasks in order
    assert play([EpisodeSpec(0, 2), EpisodeSpec(1, 2)], None) == ["task 0", "task 1"]
    with pytest.raises(ValueError, match="env_tasks holds 3 envs' tasks for 2 envs"):
        play([EpisodeSpec(0, 2)], [None] * 3)


class FirstResetEnv(ScriptedEnv):
    """Records each env's task in the first reset call."""

    def __init__(self, num_envs: int) -> None:
        super().__init__(num_envs)
        self.first_reset: dict[int, int] | None = None

    def reset(self, specs, envs, wait=True):
        if self.first_reset is None:
            self.first_reset = {i: spec.task_id for i, spec in zip(envs, specs)}
        return super().reset(specs, envs, wait)


@pytest.mark.parametrize("seed", range(6))
def test_first_tasks_are_the_tasks_of_the_first_reset_of_play_episodes(seed):
    rng = np.random.default_rng(seed)
    num_envs = int(rng.integers(1, 6))
    specs = [EpisodeSpec(int(rng.integers(4)), int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 9)))]
    held = [None if rng.random() < 0.3 else int(rng.integers(4)) for _ in range(num_envs)]
    predicted = first_tasks(specs, held)
    env = FirstResetEnv(num_envs)
    play_episodes(env, ZeroPolicy(), specs, np.zeros(len(specs), int), PolicyInputs(wrist=False, proprio=False),
                  temperature=1.0, greedy=True, keep_steps=False, env_tasks=list(held))
    assert env.first_reset == {i: task for i, task in enumerate(predicted) if task is not None}
    assert sum(task is not None for task in predicted) == min(num_envs, len(specs))


def episode_steps(rollouts: Rollouts) -> list[tuple]:
    """Per episode: its outcome and its stored steps in order (token ids, images, instructions)."""
    return [(bool(rollouts.success[e]), int(rollouts.lengths[e]), bool(rollouts.lost[e]),
             rollouts.token_ids[torch.from_numpy(rollouts.step_episode == e)].tolist(),
             rollouts.agentview[rollouts.step_episode == e].tobytes(),
             [s for s, k in zip(rollouts.instructions, rollouts.step_episode == e) if k])
            for e in range(rollouts.num_episodes)]


class CallLog:
    """Wraps an env and a policy, logging their calls in order as ("sample", envs) / ("send" | "receive", envs)."""

    def __init__(self, env, policy) -> None:
        self.env, self.policy, self.num_envs, self.calls = env, policy, env.num_envs, []

    def reset(self, specs, envs=None, wait=True):
        return self.env.reset(specs, envs, wait)

    def send_step(self, actions, envs=None):
        self.calls.append(("send", envs))
        self.env.send_step(actions, envs)

    def receive_step(self, envs=None):
        self.calls.append(("receive", envs))
        return self.env.receive_step(envs)

    def frames(self, i):
        return self.env.frames(i)

    def sample(self, agentview, *args, **kwargs):
        self.calls.append(("sample", len(agentview)))
        return self.policy.sample(agentview, *args, **kwargs)


@pytest.fixture(scope="module")
def tiny_policy(checkpoint):
    from vla_actor import load_policy
    return load_policy(checkpoint, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("num_envs", [3, 4])
def test_overlapped_rollouts_play_the_same_greedy_episodes(tiny_policy, num_envs):
    specs = [EpisodeSpec(task, init, record_video=init == 1) for task in range(4) for init in range(2)]  # refills
    inputs = PolicyInputs(wrist=False, proprio=False)
    played = {}
    for overlap in (False, True):
        log = CallLog(ToyVectorEnv(num_envs, horizon=4), tiny_policy)
        played[overlap] = play_episodes(log, log, specs, np.arange(8), inputs, temperature=1.0, greedy=True,
                                        keep_steps=True, overlap=overlap)
        log.env.close()
    plain, overlapped = played[False], played[True]
    assert episode_steps(overlapped) == episode_steps(plain)
    assert plain.success.any() and not plain.success.all() and len(set(plain.lengths.tolist())) > 1
    assert overlapped.videos.keys() == plain.videos.keys() == {1, 3, 5, 7}
    assert all(np.array_equal(np.stack(overlapped.videos[e]), np.stack(plain.videos[e])) for e in plain.videos)
    # the halves take turns: half B's actions are sampled while half A's are in flight, and the reverse
    first, second = list(range((num_envs + 1) // 2)), list(range((num_envs + 1) // 2, num_envs))
    assert log.calls[:6] == [("sample", len(first)), ("send", first), ("sample", len(second)), ("send", second),
                             ("receive", first), ("sample", len(first))]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_envs", [4, 5])
def test_a_fixed_batch_queries_every_env_and_plays_the_same_greedy_episodes(tiny_policy, overlap, num_envs):
    """With a fixed batch every query has one size: all envs, or with overlap the larger half, the smaller half of
    5 envs (2) padded to 3 with a copy of its last row, whose action is dropped."""
    assert not tiny_policy.fixed_batch  # no CUDA graphs on the CPU: rollouts query the running envs only
    specs = [EpisodeSpec(task, init, record_video=init == 1) for task in range(4) for init in range(2)]  # refills
    inputs = PolicyInputs(wrist=False, proprio=False)
    played, batches = {}, {}
    for fixed_batch in (False, True):
        log = CallLog(ToyVectorEnv(num_envs, horizon=4), tiny_policy)
        played[fixed_batch] = play_episodes(log, log, specs, np.arange(8), inputs, temperature=1.0, greedy=True,
                                            keep_steps=True, overlap=overlap, fixed_batch=fixed_batch)
        batches[fixed_batch] = {size for call, size in log.calls if call == "sample"}
        log.env.close()
    assert episode_steps(played[True]) == episode_steps(played[False])
    assert played[True].videos.keys() == played[False].videos.keys() == {1, 3, 5, 7}
    full = (num_envs + 1) // 2 if overlap else num_envs
    assert batches[True] == {full} and min(batches[False]) < full  # resets and the tail shrank the plain batches


class LosingToyEnv(ToyVectorEnv):
    """Reports env `victim`'s episode lost (its worker died) at the `at`-th receive_step that moved it."""

    def __init__(self, num_envs: int, victim: int, at: int) -> None:
        super().__init__(num_envs, horizon=4)
        self.victim, self.countdown = victim, at

    def receive_step(self, envs=None):
        moving = (self.countdown > 0 and self.victim in (envs or range(self.num_envs))
                  and self.victim in self._in_flight and not self._done[self.victim])
        result = super().receive_step(envs)
        if moving:
            self.countdown -= 1
            if self.countdown == 0:
                self._done[self.victim] = result.done[self.victim] = result.lost[self.victim] = True
                result.success[self.victim] = False
        return result


def test_an_episode_lost_in_an_overlapped_round_is_reported_and_its_env_refilled(tiny_policy):
    specs = [EpisodeSpec(task, 0) for task in range(4)] + [EpisodeSpec(0, 1)]
    inputs = PolicyInputs(wrist=False, proprio=False)
    plain = play_episodes(ToyVectorEnv(3, horizon=4), tiny_policy, specs, np.arange(5), inputs, temperature=1.0,
                          greedy=True, keep_steps=True)
    env = LosingToyEnv(3, victim=2, at=1)  # env 2 is half B's only env; it loses the first episode it plays
    lossy = play_episodes(env, tiny_policy, specs, np.arange(5), inputs, temperature=1.0, greedy=True,
                          keep_steps=True, overlap=True)
    assert env.countdown == 0 and lossy.lost.sum() == 1
    victim = int(np.flatnonzero(lossy.lost)[0])
    assert lossy.lengths[victim] == 1 and not lossy.success[victim]
    same = episode_steps(plain)
    assert [e for i, e in enumerate(episode_steps(lossy)) if i != victim] == [e for i, e in enumerate(same)
                                                                             if i != victim]


class RecordingPolicy:
    """Zero actions; remembers how each batch was asked to be sampled."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []

    def sample(self, agentview, instructions, wrist, proprio, temperature, greedy):
        self.calls.append((temperature, greedy))
        return SimpleNamespace(actions=np.zeros((len(agentview), 7), dtype=np.float32))


@pytest.mark.parametrize("temperature, expected", [(None, (1.0, True)), (0.7, (0.7, False))])
def test_eval_is_greedy_unless_given_a_temperature(temperature, expected):
    policy = RecordingPolicy()
    results = evaluate(ToyVectorEnv(num_envs=2, num_init_states=10, horizon=2), policy,
                       [EpisodeSpec(0, i) for i in range(3)], PolicyInputs(wrist=False, proprio=False),
                       distributed.setup("cpu"), None, "eval", 0, temperature=temperature)
    assert sum(results.episodes.values()) == 3
    assert [outcome[:3] for outcome in results.outcomes] == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]
    assert sum(outcome[3] for outcome in results.outcomes) == results.successes[0]
    assert policy.calls and set(policy.calls) == {expected}


def test_rollouts_select_and_concat_keep_steps_with_their_episodes():
    def part(episodes: list[int], group_ids: list[int], tag: int) -> Rollouts:
        steps = len(episodes)
        return Rollouts(
            agentview=np.full((steps, 224, 224, 3), tag, np.uint8), wrist=None, proprio=None,
            instructions=[f"{tag}-{e}" for e in episodes], token_ids=torch.full((steps, 7), 31744 + tag),
            log_probs=torch.arange(steps, dtype=torch.float32)[:, None].expand(steps, 7) + 10 * tag,
            step_episode=np.array(episodes), group_ids=np.array(group_ids), task_ids=np.zeros(len(group_ids), int),
            success=np.array([True, False][: len(group_ids)]), lengths=np.array([2, 1][: len(group_ids)]),
            lost=np.zeros(len(group_ids), bool))

    batch = Rollouts.concat([part([0, 0, 1], [0, 0], tag=1), part([0, 1, 1], [1, 1], tag=2)])
    assert batch.step_episode.tolist() == [0, 0, 1, 2, 3, 3]
    assert batch.instructions == ["1-0", "1-0", "1-1", "2-0", "2-1", "2-1"]
    kept = batch.select(np.array([False, True, True, False]))
    assert kept.step_episode.tolist() == [0, 1] and kept.instructions == ["1-1", "2-0"]
    assert kept.token_ids[:, 0].tolist() == [31745, 31746] and kept.log_probs[:, 0].tolist() == [12.0, 20.0]
    assert kept.group_ids.tolist() == [0, 1] and kept.agentview[:, 0, 0, 0].tolist() == [1, 2]


def test_rollout_metrics_report_success_per_task_drawn():
    counts = {"episodes": 24, "successes": 9, "episode_length_sum": 2400, "policy_queries": 2400, "lost_episodes": 0,
              "lost_resets": 2, "groups_played": 3,
              "groups_kept": 2, "groups_uninformative": 1, "groups_lost": 0, "refill_rounds": 0,
              "advantage_abs_sum": 12.0, "advantage_count": 16, "episodes_task_0": 16, "successes_task_0": 8,
              "episodes_task_3": 8, "successes_task_3": 1, "episodes_task_5": 0, "successes_task_5": 0}
    metrics = rollout_metrics(counts, [0, 3, 5])
    assert metrics["rollout/success_rate"] == 9 / 24 and metrics["rollout/groups_dropped_fraction"] == 1 / 3
    assert metrics["rollout/task_0/success_rate"] == 0.5 and metrics["rollout/task_3/success_rate"] == 0.125
    assert "rollout/task_5/success_rate" not in metrics  # not drawn this iteration: no rate rather than 0
    assert metrics["rollout/lost_resets"] == 2


def test_dynamic_sampling_keeps_only_informative_whole_groups(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--groups-per-iteration", "4", "--max-refill-rounds", "2")
    batch, counts = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, group_size=4,
                                   groups_per_iteration=4, temperature=1.6, dynamic_sampling=True,
                                   max_refill_rounds=2)
    trainer.close()
    # each refill round plays as many new groups as are still missing (4 envs = 1 group of 4 per wave)
    assert counts["groups_played"] >= 4 + counts["refill_rounds"]
    assert counts["groups_kept"] == len(np.unique(batch.group_ids)) <= 4
    assert counts["groups_kept"] == 4 or counts["refill_rounds"] == 2
    assert counts["groups_lost"] == 0  # the toy env never loses an episode
    informative = counts["groups_played"] - counts["groups_uninformative"]
    assert counts["groups_kept"] == min(4, informative)  # informative groups beyond the cap are not used
    assert counts["episodes"] == 4 * counts["groups_played"]
    assert sum(counts[f"episodes_task_{t}"] for t in trainer.task_ids) == counts["episodes"]
    assert sum(counts[f"successes_task_{t}"] for t in trainer.task_ids) == counts["successes"]
    for group in np.unique(batch.group_ids):
        rewards = batch.success[batch.group_ids == group]
        assert len(rewards) == 4 and rewards.any() and not rewards.all()
    # every stored step belongs to a kept episode and each episode has one step per env step it took
    assert np.array_equal(np.bincount(batch.step_episode, minlength=batch.num_episodes), batch.lengths)


def test_groups_need_not_fill_whole_waves_of_envs(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--num-envs", "3")  # 2 groups of 4: 8 episodes on 3 envs
    batch, counts = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, group_size=4,
                                   groups_per_iteration=2, temperature=1.6, dynamic_sampling=False,
                                   max_refill_rounds=0)
    trainer.close()
    assert counts["episodes"] == 8 and counts["groups_kept"] == 2 and batch.num_episodes == 8
    assert np.array_equal(np.bincount(batch.step_episode, minlength=8), batch.lengths)


@pytest.mark.parametrize("missing, num_envs, group_size, expected", [
    (1, 8, 4, 2), (3, 8, 4, 3), (1, 3, 4, 1), (2, 16, 8, 2), (1, 64, 2, 32)])
def test_a_refill_round_fills_the_envs(missing, num_envs, group_size, expected):
    assert refill_groups(missing, num_envs, group_size) == expected


def test_micro_batches_add_up_to_the_mini_batch_gradient(checkpoint, tmp_path):
    """micro-batch 1 (the per-sample backward mode) == micro-batch 8 == the whole mini-batch at once."""
    grads = []
    batch = None
    for micro in ("1", "8", "32"):
        trainer = toy_trainer(checkpoint, tmp_path, "--run-name", f"micro{micro}", "--micro-batch-size", micro,
                              "--mini-batch-size", "32", "--aggregation", "seq-mean-token-mean")
        if batch is None:
            batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                                      dynamic_sampling=True, max_refill_rounds=8)
            assert batch.num_episodes == 8
        advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
        trainer.accumulate_gradients(batch, advantages, torch.arange(batch.num_steps), UpdateStats())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
        trainer.close()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-4, atol=1e-7)


def test_entropy_bonus_subtracts_the_aggregated_action_entropy(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--entropy-coef", "0.05")
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=True, max_refill_rounds=8)
    rows = torch.arange(batch.num_steps)
    weights = torch.full((batch.num_steps, batch.token_ids.shape[1]), 1.0 / batch.token_ids.numel())  # token-mean
    zero_advantages = torch.zeros(batch.num_steps)  # the PPO term vanishes: only the bonus is left
    stats = UpdateStats()
    loss = trainer.micro_batch_loss(batch, rows, zero_advantages, weights, stats)
    _, entropy = trainer.policy.log_probs(batch.agentview, batch.instructions, batch.token_ids, temperature=1.6)
    trainer.close()
    assert entropy.mean() > 0
    torch.testing.assert_close(loss.detach(), -0.05 * entropy.mean().detach(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="--entropy-coef must be >= 0"):
        toy_trainer(checkpoint, tmp_path, "--run-name", "negative", "--entropy-coef", "-0.1")


def poison_gradient(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("nan"))


def poison_hidden_states(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return output * float("nan") if torch.is_grad_enabled() else None  # the update's forward only, not rollouts


@pytest.mark.parametrize("where", ["gradient", "loss"])
def test_non_finite_step_is_skipped_counted_logged_and_training_continues(checkpoint, tmp_path, where):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "3", "--mini-batch-size", "256",
                          "--micro-batch-size", "256", "--eval-every", "0")
    initial = [p.detach().clone() for p in trainer.params]
    if where == "gradient":
        handle = trainer.params[0].register_hook(poison_gradient)
    else:
        handle = trainer.policy.model.language_model.model.norm.register_forward_hook(poison_hidden_states)
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=False, max_refill_rounds=0)
    advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
    poisoned = trainer.update(batch, advantages)
    handle.remove()
    assert poisoned["train/skipped_steps"] == 1 and poisoned["train/optimizer_steps"] == 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, initial))  # the step never happened
    assert all(p.grad is None for p in trainer.params)
    trainer.train()
    trainer.close()
    rows = read_metrics(trainer.run_dir)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert all(row["train/skipped_steps"] == 0 and row["train/optimizer_steps"] == 1 for row in rows)
    assert rows[-1]["train/skipped_steps_total"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.params, initial))


def test_logged_non_finite_values_are_json_null(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "1", "--eval-every", "0",
                          "--mini-batch-size", "256", "--micro-batch-size", "256")
    handle = trainer.policy.model.language_model.model.norm.register_forward_hook(poison_hidden_states)
    trainer.train()
    handle.remove()
    trainer.close()
    line = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0]
    row = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written into metrics.jsonl"))
    assert row["train/skipped_steps"] == 1 and row["train/loss"] is None


def test_max_seconds_stops_after_the_iteration_with_an_eval_and_a_checkpoint(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "5", "--eval-every", "3", "--save-every", "3",
                          "--max-seconds", "1e-6", "--no-eval-at-start")
    trainer.train()
    trainer.close()
    rows = read_metrics(trainer.run_dir)
    assert [row["iteration"] for row in rows] == [1] and "eval/success_rate" in rows[0]
    assert [p.name for p in checkpoint_dirs(trainer.run_dir)] == ["iter_000001"]
    table = (trainer.run_dir / EVALS_DIR / "iter_000001" / "results.md").read_text()
    assert f"run `{trainer.run_dir}` at iteration 1 (from checkpoint `{checkpoint}`), computed in float32" in table


class SceneLog:
    """Wraps a vector env, logging its build_scenes calls and each reset's task by env, in order."""

    def __init__(self, env) -> None:
        self.env, self.calls = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def build_scenes(self, task_ids):
        self.calls.append(("build", {i: task for i, task in enumerate(task_ids) if task is not None}))
        self.env.build_scenes(task_ids)

    def reset(self, specs, envs=None, wait=True):
        self.calls.append(("reset", {i: spec.task_id for i, spec in zip(envs, specs)}))
        return self.env.reset(specs, envs, wait)


def test_the_envs_build_the_scenes_of_their_next_episodes_during_the_update(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "3", "--eval-every", "2", "--no-eval-at-start")
    log = trainer.env = SceneLog(trainer.env)
    trainer.train()
    trainer.close()
    builds = [at for at, (call, _) in enumerate(log.calls) if call == "build"]
    assert len(builds) == 3  # before the update of each iteration: the next rollout's, the eval's, the last eval's
    for at in builds:
        first_reset = next(tasks for call, tasks in log.calls[at + 1:] if call == "reset")
        assert log.calls[at][1] == first_reset and first_reset


def test_a_run_that_ends_by_its_timesteps_builds_the_last_evals_scenes_not_another_rollouts(checkpoint, tmp_path):
    """--timesteps ends the run after the first iteration (its episodes play at least one step): the build before
    that update is the last eval's, as with --iterations, and a run without evals builds nothing."""
    for evals, builds in ((("--eval-every", "5"), 1), (("--eval-every", "0"), 0)):
        trainer = toy_trainer(checkpoint, tmp_path / evals[1], "--timesteps", "1", *evals, "--no-eval-at-start",
                              "--eval-episodes-per-task", "2")
        log = trainer.env = SceneLog(trainer.env)
        trainer.train()
        trainer.close()
        assert trainer.iteration == 1
        built = [tasks for call, tasks in log.calls if call == "build"]
        assert len(built) == 1 and len([tasks for tasks in built if tasks]) == builds
        if builds:  # the eval's first reset, right after the update
            at = [call for call, _ in log.calls].index("build")
            assert built[0] == next(tasks for call, tasks in log.calls[at + 1:] if call == "reset")


def test_checkpoint_restores_optimizer_and_random_generators(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "1", "--eval-every", "0", "--keep-last", "2")
    trainer.train()
    for iteration in (2, 3):
        save_checkpoint(trainer.run_dir, iteration, trainer.policy, trainer.optimizer, trainer.scheduler,
                        {"iteration": iteration, "world_size": 1}, [rng_state()], {}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(trainer.run_dir)] == ["iter_000002", "iter_000003"]
    assert not list((trainer.run_dir / CHECKPOINTS).glob(".tmp-*"))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    saved_params = [p.detach().clone() for p in trainer.params]
    saved_moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.params]
    with torch.no_grad():
        for p in trainer.params:
            p.add_(1.0)
    set_rng_state(rng_state())  # any state; the load below must replace it
    torch.rand(5)
    with pytest.raises(ValueError, match="written by 1 ranks, this job has 2"):
        load_checkpoint(trainer.run_dir / CHECKPOINTS / "iter_000003", trainer.policy, trainer.optimizer,
                        trainer.scheduler, rank=0, world_size=2)
    state = load_checkpoint(trainer.run_dir / CHECKPOINTS / "iter_000003", trainer.policy, trainer.optimizer,
                            trainer.scheduler, rank=0, world_size=1)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    trainer.close()
    assert state["iteration"] == 3
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, saved_params))
    assert all(torch.equal(trainer.optimizer.state[p]["exp_avg"], m) for p, m in zip(trainer.params, saved_moments))


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(checkpoint, tmp_path):
    args = ["train", *toy_args(checkpoint, tmp_path), "--iterations", "4", "--save-every", "1", "--seed", "3"]
    script = [sys.executable, str(REPO / "OpenVLA_GRPO.py")]
    straight = subprocess.run([*script, *args, "--run-name", "straight"], env=ENV, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr

    killed = subprocess.Popen([*script, *args, "--run-name", "killed"], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    second = tmp_path / "killed" / CHECKPOINTS / "iter_000002"
    while not second.is_dir():
        assert killed.poll() is None, "the run ended before its second checkpoint"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # in iteration 3, after checkpoint 2
    killed.wait()
    resumed = subprocess.run([*script, "train", "--resume", str(tmp_path / "killed")], env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    expected, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [row["iteration"] for row in got] == [0, 1, 2, 3, 4]  # lines the killed run wrote after step 2 replaced
    assert [stable(row) for row in got] == [stable(row) for row in expected]
    assert expected[3]["train/loss"] != expected[4]["train/loss"]


def test_kl_to_the_base_model_is_logged_and_starts_at_zero(checkpoint, tmp_path):
    trainer = toy_trainer(checkpoint, tmp_path, "--iterations", "2", "--eval-every", "0", "--kl-coef", "0.1",
                          "--mini-batch-size", "8", "--lr", "1e-2")
    trainer.train()
    trainer.close()
    rows = read_metrics(trainer.run_dir)
    # LoRA B starts at zero, so the first mini-batch sees the base model exactly; k3 >= 0 afterwards
    assert all(row["train/kl_to_base"] >= 0 for row in rows)
    assert rows[-1]["train/kl_to_base"] > rows[0]["train/kl_to_base"] >= 0



@pytest.mark.parametrize("old_log_probs", ["rollout", "recompute"])
def test_old_log_probs_and_the_rollout_mismatch_are_measured_before_the_first_step(checkpoint, tmp_path,
                                                                                    old_log_probs):
    """recompute: pi_old is the update's own forward in the first epoch's micro-batches, so the one mini-batch's
    ratio is exactly 1; either way the rollout-vs-update log-prob gap is logged (float32: ~1e-6)."""
    trainer = toy_trainer(checkpoint, tmp_path, "--old-log-probs", old_log_probs, "--mini-batch-size", "256",
                          "--micro-batch-size", "8", "--eval-every", "0")
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=True, max_refill_rounds=8)
    advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
    metrics = trainer.update(batch, advantages)
    trainer.close()
    assert metrics["train/optimizer_steps"] == 1
    assert 0 <= metrics["train/rollout_logprob_mismatch"] < 1e-4
    assert metrics["train/rollout_logprob_mismatch"] <= metrics["train/rollout_logprob_mismatch_max"] < 1e-3
    if old_log_probs == "recompute":
        assert metrics["train/ratio_min"] == metrics["train/ratio_max"] == 1.0
    assert trainer.recompute_old_log_probs == (old_log_probs == "recompute")


def test_the_first_mini_batch_is_its_own_pi_old_and_no_step_is_forwarded_twice(checkpoint, tmp_path, monkeypatch):
    """recompute with several mini-batches: the no-grad pass before the first step covers only the later
    mini-batches' steps (leaving the first's NaN), in micro-batches across mini-batches, and the first mini-batch's
    gradient pass fills in its own; every step's pi_old then equals, bit for bit, a no-grad forward of the update's
    micro-batch that holds it (other steps beside it, one shape), and the mismatch is measured over all steps."""
    trainer = toy_trainer(checkpoint, tmp_path, "--old-log-probs", "recompute", "--mini-batch-size", "8",
                          "--micro-batch-size", "4", "--eval-every", "0")
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=True, max_refill_rounds=8)
    trainer.close()
    advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
    first_epoch = torch.randperm(batch.num_steps).tensor_split(3)
    forwards, log_probs = [], trainer.policy.log_probs

    def counted(*args, **kwargs):  # records whether each forward of the policy carried gradients
        forwards.append(torch.is_grad_enabled())
        return log_probs(*args, **kwargs)

    monkeypatch.setattr(trainer.policy, "log_probs", counted)
    stats = UpdateStats()
    old = trainer.old_log_probs(batch, first_epoch, stats)
    later = torch.cat(first_epoch[1:])
    assert forwards == [False] * -(-len(later) // 4)
    assert old[first_epoch[0]].isnan().all() and not old[later].isnan().any()
    trainer.accumulate_gradients(batch, advantages, first_epoch[0], stats, old, before_any_step=True)
    assert not old.isnan().any() and forwards.count(True) == -(-len(first_epoch[0]) // 4)
    with torch.no_grad():
        for rows in first_epoch:
            for index in rows.split(4):
                expected, _ = log_probs(*trainer.step_inputs(batch, index), pad_to=4,
                                        prompt_length=trainer.prompt_length)
                assert torch.equal(old[index], expected.float())
    gap = (old - batch.log_probs).abs()
    names = {"mean": ("rollout_logprob_mismatch",), "min": (), "max": ("rollout_logprob_mismatch_max",)}
    reduced = stats.reduce(trainer.ctx, names)
    assert reduced["train/rollout_logprob_mismatch"] == pytest.approx(float(gap.mean()), rel=1e-5)
    assert reduced["train/rollout_logprob_mismatch_max"] == float(gap.max())


def test_micro_batches_smaller_than_the_rollouts_batch_share_its_vision_pass(checkpoint, tmp_path, monkeypatch):
    """Micro-batches of 2 beside 4 envs: pi_old's pass and the gradient passes run the vision towers once per 4
    steps (the rollout's batch), so a step's patches are the same bits in both (the first mini-batch's gradient
    pass, which is its own pi_old, and the no-grad pass give the same numbers as a forward from patches computed at
    that shape), within float32 rounding of the forward that runs the towers per micro-batch."""
    trainer = toy_trainer(checkpoint, tmp_path, "--old-log-probs", "recompute", "--mini-batch-size", "8",
                          "--micro-batch-size", "2", "--eval-every", "0")
    assert trainer.vision_chunk == 4
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=True, max_refill_rounds=8)
    trainer.close()
    advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
    first_epoch = torch.randperm(batch.num_steps).tensor_split(3)
    vision_passes, towers = [], trainer.policy.model.patch_embeddings

    def counted(pixels):
        vision_passes.append(len(pixels))
        return towers(pixels)

    monkeypatch.setattr(trainer.policy.model, "patch_embeddings", counted)
    stats = UpdateStats()
    old = trainer.old_log_probs(batch, first_epoch, stats)
    later = len(torch.cat(first_epoch[1:]))
    assert vision_passes == [4] * -(-later // 4)
    trainer.accumulate_gradients(batch, advantages, first_epoch[0], stats, old, before_any_step=True)
    assert vision_passes[-(-later // 4):] == [4] * -(-len(first_epoch[0]) // 4) and not old.isnan().any()
    shape = {"pad_to": 2, "prompt_length": trainer.prompt_length}
    with torch.no_grad():
        for rows in first_epoch:
            for index in rows.split(2):
                patches = trainer.policy.patches(batch.agentview[index.numpy()], pad_to=4)
                expected, _ = trainer.policy.log_probs(*trainer.step_inputs(batch, index), **shape, patches=patches)
                per_micro_batch, _ = trainer.policy.log_probs(*trainer.step_inputs(batch, index), **shape)
                assert torch.equal(old[index], expected.float())
                torch.testing.assert_close(old[index], per_micro_batch.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("envs", "overlap", "micro", "chunk"), [(5, "on", 1, 3), (5, "on", 2, 4), (4, "off", 4, None),
                                                            (6, "off", 4, 8)])
def test_the_shared_vision_pass_covers_the_rollouts_query_in_whole_micro_batches(checkpoint, tmp_path, envs, overlap,
                                                                                  micro, chunk):
    """The update's shared vision pass (`vision_chunk`) spans a rollout query's batch (with overlapped halves the
    larger half, as play_episodes queries it) rounded up to whole micro-batches; none where one micro-batch covers
    it."""
    trainer = toy_trainer(checkpoint, tmp_path, "--num-envs", str(envs), "--overlap-rollouts", overlap,
                          "--micro-batch-size", str(micro), "--mini-batch-size", "8", "--eval-every", "0")
    trainer.close()
    assert trainer.vision_chunk == chunk


def test_with_lora_dropout_pi_old_is_a_forward_without_dropout_for_every_step(checkpoint, tmp_path):
    """--lora-dropout: the gradient pass drops out, so the no-grad pass before the first step covers the first
    mini-batch too, and the first mini-batch's gradient pass leaves pi_old as that pass gave it (the forward the
    later mini-batches' ratios start from too)."""
    trainer = toy_trainer(checkpoint, tmp_path, "--old-log-probs", "recompute", "--mini-batch-size", "8",
                          "--micro-batch-size", "4", "--eval-every", "0", "--lora-dropout", "0.5")
    assert trainer.policy.drops_out_in_training and not trainer.pi_old_from_gradient_pass
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 2, 1.6,
                              dynamic_sampling=True, max_refill_rounds=8)
    trainer.close()
    advantages = grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
    first_epoch = torch.randperm(batch.num_steps).tensor_split(3)
    stats = UpdateStats()
    old = trainer.old_log_probs(batch, first_epoch, stats)
    assert not old.isnan().any()
    before = old.clone()
    trainer.accumulate_gradients(batch, advantages, first_epoch[0], stats, old, before_any_step=True)
    assert torch.equal(old, before)
    with torch.no_grad():
        for rows in first_epoch:
            for index in rows.split(4):
                expected, _ = trainer.policy.log_probs(*trainer.step_inputs(batch, index), pad_to=4,
                                                       prompt_length=trainer.prompt_length)
                assert torch.equal(old[index], expected.float())
    reduced = stats.reduce(trainer.ctx, {"mean": ("rollout_logprob_mismatch",), "min": (), "max": ()})
    assert reduced["train/rollout_logprob_mismatch"] == pytest.approx(float((old - batch.log_probs).abs().mean()),
                                                                      rel=1e-5)


@pytest.mark.parametrize(("choice", "bfloat16", "oft", "base_quant", "recomputes"), [
    ("auto", True, False, "none", True),  # KV-cached decode vs one teacher-forced forward
    ("auto", True, True, "none", False),  # OFT's rollout is the update's forward
    ("auto", True, True, "int8", False),  # a weight-only base multiplies in bf16 as well
    ("auto", True, True, "fp8-dynamic", True),  # per-token e4m3 rounding flips with the batch shape
    ("auto", False, False, "none", False),
    ("recompute", False, True, "none", True),
    ("rollout", True, False, "none", False),
])
def test_auto_recomputes_pi_old_where_the_rollout_computes_its_log_probs_differently(choice, bfloat16, oft,
                                                                                    base_quant, recomputes):
    assert GrpoConfig(old_log_probs=choice).recomputes_old_log_probs(bfloat16, oft, base_quant) == recomputes


def test_update_stats_combine_tensors_and_numbers_and_read_them_back_once():
    """Token-weighted means, minima and maxima of tensors (kept as tensors until `reduce`) and of numbers:
    (2 * 3 + 1 * 1) / 4 = 1.75, min(3, 1.5) = 1.5, max(2, 5) = 5."""
    stats = UpdateStats()
    stats.mean("loss", torch.tensor(2.0), 3.0)
    stats.mean("loss", 1.0, 1.0)
    stats.minimum("ratio_min", torch.tensor(3.0))
    stats.minimum("ratio_min", 1.5)
    stats.maximum("ratio_max", 2.0)
    stats.maximum("ratio_max", torch.tensor(5.0))
    assert isinstance(stats.sums["loss"], torch.Tensor)
    context = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    reduced = stats.reduce(context, {"mean": ("loss",), "min": ("ratio_min",), "max": ("ratio_max",)})
    assert reduced == {"train/loss": 1.75, "train/ratio_min": 1.5, "train/ratio_max": 5.0}


def test_mini_batches_are_cut_on_micro_batch_multiples():
    """3,520 steps in 13 mini-batches of micro-batches of 16: cut i at round(i x 3520 / (13 x 16)) = round(i x
    16.92) micro-batches: 17, 34, 51, 68, 85, 102, 118 (118.46), 135, ..., 203, so 17 micro-batches (272 steps) each
    but the seventh's 16, and every micro-batch holds 16 steps; with fewer steps than 13 x 16 the cuts are the plain
    equal split."""
    torch.manual_seed(0)
    parts = shuffled_minibatches(3520, 13, 16)
    sizes = [len(p) for p in parts]
    assert sizes == [272] * 6 + [256] + [272] * 6
    assert sorted(torch.cat(parts).tolist()) == list(range(3520))
    assert [len(p) for p in shuffled_minibatches(10, 2, 16)] == [5, 5]
    assert [len(p) for p in shuffled_minibatches(70, 2, 16)] == [32, 38]  # the epoch's last micro-batch holds 6


def test_constant_aggregation_is_a_fixed_normaliser():
    """Dr. GRPO: a mini-batch of 3 steps (7 tokens each) where 4 are configured weighs 3/4 of a full one, each token
    1 / (4 x 7); token-mean would give each token 1 / (3 x 7), a sum of 1."""
    ctx = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    traj_ids = torch.tensor([0, 0, 1])
    constant = distributed.token_weights(traj_ids, 7, "constant", ctx, constant=4 * 7)
    assert constant.shape == (3, 7) and torch.allclose(constant, torch.full((3, 7), 1 / 28))
    assert torch.allclose(distributed.token_weights(traj_ids, 7, "token-mean", ctx), torch.full((3, 7), 1 / 21))
