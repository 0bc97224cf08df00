"""Playing episodes with the vector env and batched sampling, and GRPO's group collection with dynamic sampling.

Only steps of still-running envs are sampled and stored. Images stay uint8 numpy on the CPU; the policy
normalises them on its device per call (DESIGN.md).
"""

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

import grpo
from libero_env import EpisodeSpec
from libero_env.processing import ACTION_DIM, POLICY_IMAGE_SIZE, PROPRIO_DIM
from trainer.sampler import GroupSampler
from vla_actor import SampleOutput


IMAGES = (0, POLICY_IMAGE_SIZE, POLICY_IMAGE_SIZE, 3)
"""Shape of an empty batch of camera images."""


class VectorEnv(Protocol):
    """What the trainer uses of LiberoVectorEnv and ToyVectorEnv (DESIGN.md)."""

    num_envs: int
    lost_resets: int
    """Resets whose worker was lost and replaced (the episode then starts on the new worker), since creation."""
    worker_seconds: dict[str, float]
    """Where the simulator workers' time went, by part, summed over envs since creation (empty without workers)."""

    def reset(self, specs: list[EpisodeSpec], envs: list[int] | None = None, wait: bool = True) -> Any: ...
    def send_step(self, actions: np.ndarray, envs: list[int] | None = None) -> None: ...
    def receive_step(self, envs: list[int] | None = None) -> Any: ...
    def frames(self, i: int) -> list[np.ndarray]: ...
    def build_scenes(self, task_ids: list[int | None]) -> None: ...


class Policy(Protocol):
    """What rollouts and evals use of VLAPolicy (DESIGN.md)."""

    def sample(self, images: np.ndarray, instructions: list[str], wrist: np.ndarray | None = None,
               proprio: np.ndarray | None = None, temperature: float = 1.0, greedy: bool = False) -> SampleOutput: ...


@dataclass(frozen=True)
class PolicyInputs:
    """Which observation parts the policy consumes (OpenVLA: the agentview only; OFT: + wrist and proprio)."""

    wrist: bool
    proprio: bool


@dataclass
class Rollouts:
    """Policy steps of whole episodes (one row per policy query) and one row per episode."""

    agentview: np.ndarray
    """uint8 [S, 224, 224, 3]: the image each step's action was sampled from."""
    wrist: np.ndarray | None
    """uint8 [S, 224, 224, 3], when the policy uses the wrist camera."""
    proprio: np.ndarray | None
    """float32 [S, 8], when the policy uses proprio."""
    instructions: list[str]
    """[S] task language."""
    token_ids: torch.Tensor
    """long [S, T] sampled action tokens (T = 7, or 56 for an OFT chunk), CPU."""
    log_probs: torch.Tensor
    """float32 [S, T] their log-probs under the rollout policy at the rollout temperature, CPU."""
    step_episode: np.ndarray
    """int [S]: the episode (row of the per-episode arrays) each step belongs to."""
    group_ids: np.ndarray
    """int [E]: the advantage group of each episode."""
    task_ids: np.ndarray
    """int [E]."""
    success: np.ndarray
    """bool [E]: the reward."""
    lengths: np.ndarray
    """int [E]: env steps the episode took (the env's `steps`)."""
    lost: np.ndarray
    """bool [E]: the env worker died during the episode; its group cannot be used."""
    videos: dict[int, list[np.ndarray]] = field(default_factory=dict)
    """Recorded agentview frames by episode."""
    model_seconds: float = 0.0
    """Wall time spent in policy.sample (the GPU's part of the rollout)."""
    env_seconds: float = 0.0
    """Wall time spent in env.reset and env.step (waiting for the simulators), reset_seconds included."""
    reset_seconds: float = 0.0
    """Of env_seconds, the first blocking reset of the envs (scene builds when a worker's task changes)."""

    @property
    def num_steps(self) -> int:
        return len(self.step_episode)

    @property
    def num_episodes(self) -> int:
        return len(self.group_ids)

    def select(self, keep: np.ndarray) -> "Rollouts":
        """The episodes where `keep` (bool [E]) is True, with their steps."""
        steps = keep[self.step_episode]
        renumber = np.cumsum(keep) - 1
        return Rollouts(
            agentview=self.agentview[steps],
            wrist=None if self.wrist is None else self.wrist[steps],
            proprio=None if self.proprio is None else self.proprio[steps],
            instructions=[s for s, k in zip(self.instructions, steps) if k],
            token_ids=self.token_ids[torch.from_numpy(steps)],
            log_probs=self.log_probs[torch.from_numpy(steps)],
            step_episode=renumber[self.step_episode[steps]],
            group_ids=self.group_ids[keep], task_ids=self.task_ids[keep], success=self.success[keep],
            lengths=self.lengths[keep], lost=self.lost[keep],
            videos={int(renumber[e]): v for e, v in self.videos.items() if keep[e]},
            model_seconds=self.model_seconds, env_seconds=self.env_seconds, reset_seconds=self.reset_seconds,
        )

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        """One batch of several; episode rows are renumbered, group ids must already be distinct."""
        offsets = np.cumsum([0] + [p.num_episodes for p in parts])
        return Rollouts(
            agentview=np.concatenate([p.agentview for p in parts]),
            wrist=None if parts[0].wrist is None else np.concatenate([p.wrist for p in parts]),
            proprio=None if parts[0].proprio is None else np.concatenate([p.proprio for p in parts]),
            instructions=[s for p in parts for s in p.instructions],
            token_ids=torch.cat([p.token_ids for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            step_episode=np.concatenate([p.step_episode + o for p, o in zip(parts, offsets)]),
            group_ids=np.concatenate([p.group_ids for p in parts]),
            task_ids=np.concatenate([p.task_ids for p in parts]),
            success=np.concatenate([p.success for p in parts]),
            lengths=np.concatenate([p.lengths for p in parts]),
            lost=np.concatenate([p.lost for p in parts]),
            videos={e + int(o): v for p, o in zip(parts, offsets) for e, v in p.videos.items()},
            model_seconds=sum(p.model_seconds for p in parts), env_seconds=sum(p.env_seconds for p in parts),
            reset_seconds=sum(p.reset_seconds for p in parts),
        )


def next_episode(pending: dict[int, list[int]], last_task: int | None, busy_tasks: list[int]) -> int:
    """Takes the next episode for an env from `pending` (task id -> indices of its episodes not started yet). A
    LIBERO worker rebuilds its scene (seconds) whenever its task changes, so an env gets another episode of the task
    it played last while one is left; otherwise one of the task with the most episodes left per env already playing
    it (`busy_tasks`), which also spreads the first episodes over the tasks."""
    if not pending.get(last_task):
        last_task = max(sorted(t for t in pending if pending[t]),
                        key=lambda t: len(pending[t]) / (1 + busy_tasks.count(t)))
    return pending[last_task].pop(0)


def pending_episodes(specs: list[EpisodeSpec]) -> dict[int, list[int]]:
    """Task id -> indices of its episodes in `specs`, in order: what next_episode takes from."""
    pending: dict[int, list[int]] = {}
    for index, spec in enumerate(specs):
        pending.setdefault(spec.task_id, []).append(index)
    return pending


def start_episodes(specs: list[EpisodeSpec], pending: dict[int, list[int]], env_tasks: list[int | None],
                   playing: np.ndarray, envs: np.ndarray) -> list[int]:
    """Gives each idle env of `envs` (playing -1), in order, its next episode from `pending` (next_episode, with
    the tasks of the envs playing as busy) while any is left; writes it to `playing` and its task to `env_tasks`;
    returns the envs that got one."""
    idle = [int(i) for i in envs if playing[i] < 0][:sum(map(len, pending.values()))]
    for i in idle:
        playing[i] = next_episode(pending, env_tasks[i], [env_tasks[j] for j in range(len(playing)) if playing[j] >= 0])
        env_tasks[i] = specs[playing[i]].task_id
    return idle


def first_tasks(specs: list[EpisodeSpec], env_tasks: list[int | None]) -> list[int | None]:
    """The task each env starts a play_episodes call of `specs` with (None: the env stays idle), for `env_tasks`
    as that call will find them: the scenes its first reset builds, which VectorEnv.build_scenes can build ahead."""
    held, playing = list(env_tasks), np.full(len(env_tasks), -1)
    started = start_episodes(specs, pending_episodes(specs), held, playing, np.arange(len(env_tasks)))
    return [held[i] if i in started else None for i in range(len(env_tasks))]


def env_halves(num_envs: int, overlap: bool) -> list[np.ndarray]:
    """The envs a rollout queries together: two fixed halves with `overlap` (the first the larger), else all."""
    return np.array_split(np.arange(num_envs), 2) if overlap and num_envs > 1 else [np.arange(num_envs)]


def play_episodes(env: VectorEnv, policy: Policy, specs: list[EpisodeSpec], group_ids: np.ndarray,
                  inputs: PolicyInputs, temperature: float, greedy: bool, keep_steps: bool,
                  progress: bool = False, overlap: bool = False, fixed_batch: bool = False,
                  env_tasks: list[int | None] | None = None) -> Rollouts:
    """Plays `specs` on env.num_envs envs and returns their outcomes, plus every policy step when `keep_steps`.
    An env starts its next episode (next_episode) as soon as its last one ends, and resets while the others step
    (reset(wait=False)), so no env waits for the longest episode of a batch or for another env's scene build.
    With `overlap`, the envs play as two fixed halves: one half's simulators execute its actions while the policy
    samples the other half's (sample A, send A, sample B, send B, receive A, sample A, send A, receive B, ...), so
    the policy and the simulators work at the same time, at half the batch per query. With `fixed_batch` every
    query holds all the envs of its half, idle or resetting ones too (with their last observation; their actions
    are dropped), so its shape stays the same while envs reset: what a policy that keeps a CUDA graph of one batch
    size replays instead of capturing anew (VLAPolicy.fixed_batch); with an odd number of envs the second, smaller
    half's queries repeat its last env's row to the first half's size. `env_tasks` is each env's task of the
    episode it played last, kept by the caller across calls and updated here, so that an env's first episode of
    this call is of the task whose scene it still holds where one is left (a scene build is seconds of blocking
    first reset); None: no env holds a task."""
    n, total = env.num_envs, len(specs)
    if env_tasks is None:
        env_tasks = [None] * n
    elif len(env_tasks) != n:
        raise ValueError(f"env_tasks holds {len(env_tasks)} envs' tasks for {n} envs")
    steps: dict[str, list] = {k: [] for k in ("agentview", "wrist", "proprio", "instructions", "token_ids",
                                              "log_probs", "step_episode")}
    success, lost = np.zeros(total, dtype=bool), np.zeros(total, dtype=bool)
    lengths = np.zeros(total, dtype=np.int64)
    videos: dict[int, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc="eval" if greedy else "rollout", unit="ep", leave=False,
               disable=None if progress else True)
    pending = pending_episodes(specs)
    playing = np.full(n, -1)  # each env's episode (resetting or running), -1 when idle
    running = np.zeros(n, dtype=bool)
    halves = env_halves(n, overlap)
    query_size = len(halves[0])  # every query's rows with fixed_batch: the first half is the larger one

    model_seconds = env_seconds = reset_seconds = 0.0
    first = start_episodes(specs, pending, env_tasks, playing, np.arange(n))
    observations = [None] * len(halves)  # each half's latest observation (its rows are current)
    if first:
        started = time.perf_counter()
        observations = [env.reset([specs[playing[i]] for i in first], envs=first)] * len(halves)
        env_seconds = reset_seconds = time.perf_counter() - started
        running[first] = True
    in_flight: dict[int, np.ndarray] = {}  # half -> its envs that were running when its actions were sent
    while True:
        for half, envs in enumerate(halves):
            if half in in_flight:
                started = time.perf_counter()
                result = env.receive_step(envs.tolist())
                env_seconds += time.perf_counter() - started
                alive = in_flight.pop(half)
                for i in alive[result.done[alive]]:
                    episode = int(playing[i])
                    success[episode], lost[episode], lengths[episode] = (result.success[i], result.lost[i],
                                                                         result.steps[i])
                    if specs[episode].record_video:
                        videos[episode] = env.frames(int(i))
                    playing[i], running[i] = -1, False
                    bar.update(1)
                running |= result.started
                observations[half] = result.obs
                starting = start_episodes(specs, pending, env_tasks, playing, envs)
                if starting:
                    started = time.perf_counter()
                    env.reset([specs[playing[i]] for i in starting], envs=starting, wait=False)
                    env_seconds += time.perf_counter() - started
            if not (playing[envs] >= 0).any():
                continue
            obs, alive = observations[half], envs[running[envs]]
            if alive.size:
                queried = envs if fixed_batch else alive
                padding = query_size - len(queried) if fixed_batch else 0  # copies of the smaller half's last row
                # the queried rows whose actions are played
                used = torch.from_numpy(np.concatenate([running[queried], np.zeros(padding, dtype=bool)]))
                queried = np.concatenate([queried, np.repeat(queried[-1:], padding)])
                started = time.perf_counter()
                out = policy.sample(obs.agentview[queried], [obs.instructions[i] for i in queried],
                                    wrist=obs.wrist[queried] if inputs.wrist else None,
                                    proprio=obs.proprio[queried] if inputs.proprio else None,
                                    temperature=temperature, greedy=greedy)
                model_seconds += time.perf_counter() - started
                actions = np.zeros((len(envs), *out.actions.shape[1:]), dtype=np.float32)
                actions[running[envs]] = out.actions[used.numpy()]
                if keep_steps:
                    steps["agentview"].append(obs.agentview[alive])
                    if inputs.wrist:
                        steps["wrist"].append(obs.wrist[alive])
                    if inputs.proprio:
                        steps["proprio"].append(obs.proprio[alive])
                    steps["instructions"].extend(obs.instructions[i] for i in alive)
                    steps["token_ids"].append(out.token_ids.cpu()[used])
                    steps["log_probs"].append(out.log_probs.float().cpu()[used])
                    steps["step_episode"].append(playing[alive])
            else:  # every env of the half is resetting: receive_step only waits for one
                actions = np.zeros((len(envs), ACTION_DIM), dtype=np.float32)
            started = time.perf_counter()
            env.send_step(actions, envs.tolist())
            env_seconds += time.perf_counter() - started
            in_flight[half] = alive
        if not in_flight:
            break
    bar.close()
    return Rollouts(
        agentview=_stack(steps["agentview"], np.uint8, IMAGES),
        wrist=_stack(steps["wrist"], np.uint8, IMAGES) if inputs.wrist else None,
        proprio=_stack(steps["proprio"], np.float32, (0, PROPRIO_DIM)) if inputs.proprio else None,
        instructions=steps["instructions"],
        token_ids=torch.cat(steps["token_ids"]) if keep_steps else torch.zeros(0, 0, dtype=torch.long),
        log_probs=torch.cat(steps["log_probs"]) if keep_steps else torch.zeros(0, 0),
        step_episode=_stack(steps["step_episode"], np.int64, (0,)),
        group_ids=np.asarray(group_ids, dtype=np.int64), task_ids=np.array([s.task_id for s in specs]),
        success=success, lengths=lengths, lost=lost, videos=videos, model_seconds=model_seconds,
        env_seconds=env_seconds, reset_seconds=reset_seconds,
    )


def _stack(arrays: list[np.ndarray], dtype: type, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(empty_shape, dtype=dtype)


def refill_groups(missing: int, num_envs: int, group_size: int) -> int:
    """Groups a dynamic-sampling refill round plays: the missing ones, or as many as the envs hold at once when
    that is more (fewer would take the same wall time with envs idle; the spares replace groups that turn out
    all-equal)."""
    return max(missing, num_envs // group_size)


def count_groups(where: np.ndarray, group_ids: np.ndarray) -> int:
    """Groups with at least one episode `where` (bool [E]) is True."""
    return grpo.count_groups(torch.from_numpy(where), torch.from_numpy(group_ids))


def collect_groups(env: VectorEnv, policy: Policy, sampler: GroupSampler, inputs: PolicyInputs, group_size: int,
                   groups_per_iteration: int, temperature: float, dynamic_sampling: bool, max_refill_rounds: int,
                   progress: bool = False, overlap: bool = False, fixed_batch: bool = False,
                   env_tasks: list[int | None] | None = None) -> tuple[Rollouts, dict[str, float]]:
    """G rollouts for each of `groups_per_iteration` groups. With dynamic sampling, groups whose rewards are all
    equal are dropped and new groups are played until enough are informative or `max_refill_rounds` is spent.
    A group with a lost episode is always dropped as a unit. Returns the kept groups and counts for logging.
    `env_tasks`: as play_episodes', carried through the refill rounds."""
    rounds: list[Rollouts] = []
    wanted, next_group, lost_resets = groups_per_iteration, 0, env.lost_resets
    worker_seconds = dict(env.worker_seconds)
    for _ in range(1 + (max_refill_rounds if dynamic_sampling else 0)):
        specs = [spec for spec in sampler.next(wanted) for _ in range(group_size)]
        group_ids = np.repeat(np.arange(next_group, next_group + wanted), group_size)
        next_group += wanted
        rounds.append(play_episodes(env, policy, specs, group_ids, inputs, temperature, greedy=False,
                                    keep_steps=True, progress=progress, overlap=overlap, fixed_batch=fixed_batch,
                                    env_tasks=env_tasks))
        group_ids, task_ids, success, lost = (np.concatenate([getattr(r, k) for r in rounds])
                                              for k in ("group_ids", "task_ids", "success", "lost"))
        usable = ~np.isin(group_ids, group_ids[lost])
        informative = usable & grpo.informative_groups(torch.from_numpy(success),
                                                       torch.from_numpy(group_ids)).numpy()
        missing = groups_per_iteration - count_groups(informative, group_ids)
        if not dynamic_sampling or missing <= 0:
            break
        wanted = refill_groups(missing, env.num_envs, group_size)
    keep = informative if dynamic_sampling else usable
    if keep.any():
        keep = grpo.select_groups(torch.from_numpy(keep), torch.from_numpy(group_ids), groups_per_iteration).numpy()
    counts = {
        "episodes": len(group_ids), "successes": int(success.sum()), "lost_episodes": int(lost.sum()),
        "lost_resets": env.lost_resets - lost_resets,
        "episode_length_sum": int(sum(r.lengths.sum() for r in rounds)),
        "policy_queries": sum(r.num_steps for r in rounds), "groups_played": next_group,
        "groups_uninformative": count_groups(usable & ~informative, group_ids),
        "groups_lost": count_groups(~usable, group_ids), "groups_kept": count_groups(keep, group_ids),
        "refill_rounds": len(rounds) - 1,
        "rollout_model_seconds": sum(r.model_seconds for r in rounds),
        "rollout_env_seconds": sum(r.env_seconds for r in rounds),
        "rollout_reset_seconds": sum(r.reset_seconds for r in rounds),
        **{f"env_worker_{part}_seconds": env.worker_seconds[part] - before
           for part, before in worker_seconds.items()},
        # every configured task has its keys (zeros if not drawn), so ranks sum the same keys
        **{f"episodes_task_{t}": int((task_ids == t).sum()) for t in sampler.task_ids},
        **{f"successes_task_{t}": int(success[task_ids == t].sum()) for t in sampler.task_ids},
    }
    per_round = np.split(keep, np.cumsum([r.num_episodes for r in rounds])[:-1])
    return Rollouts.concat([r.select(k) for r, k in zip(rounds, per_round)]), counts
