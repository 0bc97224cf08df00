"""LiberoVectorEnv: N LIBERO envs in subprocesses, stepped as one batch, surviving worker crashes."""

import logging
import multiprocessing as mp
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.context import BaseContext

import imageio.v2 as imageio
import numpy as np

from libero_env._worker import WORKER_TIMES, worker_main
from libero_env.processing import ACTION_DIM, POLICY_IMAGE_SIZE, PROPRIO_DIM, to_env_actions
from libero_env.suites import (ENV_HORIZON, NUM_INIT_STATES, NUM_WAIT_STEPS, EpisodeSpec, get_suite, load_tasks,
                                scene_seed)

logger = logging.getLogger(__name__)

START_METHODS = ("spawn", "forkserver")
"""Fork is left out: a forked child would inherit the parent's threads and GL/CUDA state."""


@dataclass
class Observation:
    """A batch of N observations, processed as the policies were trained (REF 5.3, 6.3)."""

    agentview: np.ndarray
    """uint8 [N,224,224,3] third-person camera."""
    wrist: np.ndarray | None
    """uint8 [N,224,224,3] wrist camera (robot0_eye_in_hand); None when built with wrist=False."""
    proprio: np.ndarray
    """float32 [N,8] eef position, eef axis-angle, 2 gripper joint positions (not normalised)."""
    instructions: list[str]
    """Raw `task.language` of each env's task ("" for an env that has not been reset yet)."""


@dataclass
class StepResult:
    """The batch after one step call."""

    obs: Observation
    """Observations after the last executed action (unchanged for envs that were already done)."""
    done: np.ndarray
    """bool [N]: success, time limit or lost. Done envs ignore further actions until the next reset."""
    success: np.ndarray
    """bool [N]: the task's success predicate fired (LIBERO's `done`)."""
    steps: np.ndarray
    """int64 [N]: policy actions executed in this episode, wait steps not counted."""
    lost: np.ndarray
    """bool [N]: the worker died or hung; its episode says nothing about the policy and must be re-run."""
    started: np.ndarray
    """bool [N]: envs whose reset(..., wait=False) finished during this call; their episode starts from `obs`."""


def env_indices(envs: Sequence[int] | None, num_envs: int) -> list[int]:
    """The env indices a vector env call names (default all), checked."""
    envs = list(range(num_envs)) if envs is None else [int(i) for i in envs]
    if len(set(envs)) != len(envs) or not all(0 <= i < num_envs for i in envs):
        raise ValueError(f"envs must be distinct indices in [0, {num_envs - 1}], got {envs}")
    return envs


def check_not_stepping(envs: list[int], in_flight: dict) -> None:
    """A call on envs that were sent a step whose answer has not been taken would be misread as that answer."""
    stepping = sorted(set(envs) & set(in_flight))
    if stepping:
        raise RuntimeError(f"env(s) {stepping} have a step in flight: receive_step() them first")


# SIGKILL cannot be refused, so this bounds only a teardown stuck in the kernel (a worker in uninterruptible I/O)
KILL_WAIT_S = 30.0


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: BaseContext, wrist: bool, resolution: int, rebuild_on_reset: bool):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child_conn, wrist, resolution, rebuild_on_reset),
                                   daemon=True)
        self.process.start()
        child_conn.close()

    def send(self, message: tuple) -> str:
        """Sends `message`; returns "" or why it could not be sent."""
        try:
            self.conn.send(message)
        except OSError as error:
            return f"pipe to worker closed ({error})"
        return ""

    def receive(self, timeout_s: float) -> tuple[dict | None, str]:
        """(payload, "") on success, else (None, what went wrong)."""
        ready = connection.wait([self.conn, self.process.sentinel], timeout_s)
        if not ready:
            return None, f"no answer within {timeout_s:.0f} s"
        status, payload = "exited", ""
        if self.conn in ready:
            try:
                status, payload = self.conn.recv()
            except (EOFError, OSError):  # the worker died before or while answering
                status, payload = "exited", ""
        if status == "ok":
            return payload, ""
        if status == "error":
            return None, payload
        self.process.join(timeout=5)
        return None, f"worker process exited with code {self.process.exitcode}"

    def has_answer(self) -> bool:
        """Whether receive() would return at once (an answer, or the worker's exit)."""
        return bool(connection.wait([self.conn, self.process.sentinel], 0))

    def ask_to_close(self) -> None:
        if self.process.is_alive():
            self.send(("close",))

    def join_or_kill(self, timeout_s: float = 5.0) -> None:
        """Waits timeout_s for the worker to exit, then kills it and waits for the kill: a SIGKILLed process can
        take seconds to be torn down on a loaded machine, and one left unreaped would outlive close()."""
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(KILL_WAIT_S)
        self.conn.close()


def _stop_workers(workers: list[_Worker]) -> None:
    """Closes every worker; runs from close(), garbage collection or interpreter exit (weakref.finalize)."""
    for worker in workers:
        worker.ask_to_close()
    for worker in workers:
        worker.join_or_kill()


class LiberoVectorEnv:
    """`num_envs` LIBERO envs of one suite, one subprocess each.

    reset() puts every env at a given (task, init state, scene) and runs the 10 wait steps; step() takes
    dataset-convention actions [N,7] or chunks [N,K,7] (executed open-loop, stopping at success or the time limit)
    and moves only the envs that are not done. A worker that dies or hangs is replaced and its episode reported as lost.
    Use as a context manager or call close(); leftover workers are also stopped at garbage collection and exit.
    The spawn start method (the default, and macOS's) imports the caller's main module in each worker, so scripts
    that create the env need the usual `if __name__ == "__main__":` guard.
    """

    def __init__(
        self,
        suite: str,
        num_envs: int,
        wrist: bool = True,
        resolution: int = 256,
        max_steps: int | None = None,
        start_method: str = "spawn",
        timeout_s: float = 300.0,
        rebuild_on_reset: bool = False,
    ):
        """
        suite: one of SUITES. num_envs: worker processes. wrist: also render and return the wrist camera.
        resolution: render side in pixels (reference 256). max_steps: policy steps per episode, default the suite's
        reference limit. start_method: "spawn" or "forkserver". timeout_s: longest wait for one worker answer
        (a reset includes building the scene on a task change) before the worker counts as hung.
        rebuild_on_reset: rebuild each simulator from its scene XML at every reset, as the reference eval's env
        does (LIBERO's hard reset, ~3 s on a CPU core); the default keeps it for its task, with the same episodes
        (suites.start_episode). The baseline of bench_rollout.
        """
        self.suite = get_suite(suite)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1 pixel (reference: 256), got {resolution}")
        self.max_steps = self.suite.max_steps if max_steps is None else max_steps
        longest = ENV_HORIZON - NUM_WAIT_STEPS
        if not 1 <= self.max_steps <= longest:
            raise ValueError(f"max_steps must be in [1, {longest}] (LIBERO's horizon is {ENV_HORIZON} steps, "
                             f"{NUM_WAIT_STEPS} of them wait steps), got {self.max_steps}")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_envs = num_envs
        self.wrist = wrist
        self.resolution = resolution
        self.timeout_s = timeout_s
        self.rebuild_on_reset = rebuild_on_reset
        self._tasks = load_tasks(suite)
        self._ctx = mp.get_context(start_method)
        self._workers = [_Worker(self._ctx, wrist, resolution, rebuild_on_reset) for _ in range(num_envs)]
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

        size = POLICY_IMAGE_SIZE
        self._agentview = np.zeros((num_envs, size, size, 3), np.uint8)
        self._wrist = np.zeros((num_envs, size, size, 3), np.uint8) if wrist else None
        self._proprio = np.zeros((num_envs, PROPRIO_DIM), np.float32)
        self._specs: list[EpisodeSpec | None] = [None] * num_envs
        self._starting: dict[int, EpisodeSpec] = {}  # resets in flight
        self._started: set[int] = set()  # resets finished, not yet reported by receive_step()
        self._in_flight: dict[int, str] = {}  # envs sent a step by send_step() -> "" or why the send failed
        self._building: set[int] = set()  # envs sent a scene build by build_scenes(), answer not yet taken
        self._reset_attempts = [0] * num_envs
        self._reset_deadlines = [0.0] * num_envs
        self._done = np.ones(num_envs, bool)
        self._success = np.zeros(num_envs, bool)
        self._lost = np.zeros(num_envs, bool)
        self.lost_resets = 0
        """Resets whose worker died, hung or failed and was replaced (counted per attempt), since creation."""
        self.worker_seconds = dict.fromkeys(WORKER_TIMES, 0.0)
        """Seconds the workers reported (libero_env._worker.WORKER_TIMES), summed over every answer of every env
        since creation."""
        self._steps = np.zeros(num_envs, np.int64)
        self._frames: list[list[np.ndarray]] = [[] for _ in range(num_envs)]

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    @property
    def worker_pids(self) -> list[int]:
        """Process id of each env's current worker (a lost worker's replacement gets a new one)."""
        return [worker.process.pid for worker in self._workers]

    def instruction(self, task_id: int) -> str:
        """The task's raw language instruction (`task.language`)."""
        self._check_task(task_id)
        return self._tasks[task_id].language

    def frames(self, env_index: int) -> list[np.ndarray]:
        """Upright raw agentview frames (uint8 [res,res,3]) of env `env_index`'s current episode, the observation
        after reset first; empty unless its EpisodeSpec had record_video=True."""
        if not 0 <= env_index < self.num_envs:
            raise ValueError(f"env_index must be in [0, {self.num_envs - 1}], got {env_index}")
        return list(self._frames[env_index])

    def reset(self, specs: Sequence[EpisodeSpec], envs: Sequence[int] | None = None,
              wait: bool = True) -> Observation | None:
        """Starts one episode per env, `specs[i]` on env i; with `envs`, `specs[j]` on env `envs[j]` only, while the
        other envs carry on with their episodes. With wait=False it returns at once and the resets run while
        step() moves the other envs (a reset on a task change builds the scene: seconds on the CPU); step() reports
        each env whose reset has finished in `started`. A worker that fails a reset is replaced and tried once more."""
        self._check_open()
        specs = list(specs)
        if envs is None and len(specs) != self.num_envs:
            raise ValueError(f"reset needs one EpisodeSpec per env: expected {self.num_envs}, got {len(specs)}")
        envs = env_indices(envs, self.num_envs)
        if len(envs) != len(specs):
            raise ValueError(f"reset needs one EpisodeSpec per env it names: {len(envs)} envs, {len(specs)} specs")
        for spec in specs:
            self._check_task(spec.task_id)
            if not 0 <= spec.init_index < NUM_INIT_STATES:
                raise ValueError(f"init_index must be in [0, {NUM_INIT_STATES - 1}], got {spec.init_index}")
            if spec.scene < 0:
                raise ValueError(f"scene must be >= 0, got {spec.scene}")
        if any(i in self._starting for i in envs):
            raise RuntimeError(f"env(s) {sorted(set(envs) & set(self._starting))} are still resetting: step() "
                               "until `started` reports them")
        check_not_stepping(envs, self._in_flight)
        self._finish_builds(envs)
        for i, spec in zip(envs, specs):
            self._specs[i] = None  # until its reset has finished, step() leaves the env alone
            self._done[i] = True
            self._started.discard(i)
            self._starting[i] = spec
            self._send_reset(i, attempt=1)
        if not wait:
            return None
        self._collect_starts(keep_waiting=lambda: any(i in self._starting for i in envs))
        self._started.difference_update(envs)  # the caller knows these started; others are left for step()
        return self._observation()

    def build_scenes(self, task_ids: Sequence[int | None]) -> None:
        """Starts building the scene of task `task_ids[i]` on env i (None: env i is left alone) and returns at
        once, so that the builds run while the caller does other work (the trainer's update) and a later reset of
        env i to that task finds its scene built. The episodes played are the same either way: a reset puts a kept
        simulator where a fresh one would start (suites.start_episode). Only envs with no episode running or
        starting can be given a task; a build that fails leaves a fresh worker, which builds at the reset."""
        self._check_open()
        task_ids = list(task_ids)
        if len(task_ids) != self.num_envs:
            raise ValueError(f"build_scenes needs a task (or None) per env: expected {self.num_envs}, got "
                             f"{len(task_ids)}")
        envs = [i for i, task_id in enumerate(task_ids) if task_id is not None]
        for i in envs:
            self._check_task(task_ids[i])
        busy = sorted(i for i in envs if not self._done[i] or i in self._starting or i in self._in_flight)
        if busy:
            raise RuntimeError(f"env(s) {busy} are playing or starting an episode: build scenes between episodes")
        if self.rebuild_on_reset:
            return  # every reset rebuilds its scene anyway
        self._finish_builds(envs)
        for i in envs:
            reason = self._workers[i].send(("build", self._tasks[task_ids[i]].bddl_file))
            if reason:
                self._restart(i, reason)
            else:
                self._building.add(i)

    def step(self, actions) -> StepResult:
        """Executes dataset-convention actions [N,7] or chunks [N,K,7] on the envs that are not done."""
        self.send_step(actions)
        return self.receive_step()

    def send_step(self, actions, envs: Sequence[int] | None = None) -> None:
        """step()'s first half: sends actions [len(envs),7] or chunks [len(envs),K,7] (row j for env envs[j]; default
        every env) to those of `envs` that are not done and returns at once, so the caller can compute other envs'
        actions while these simulate. receive_step(envs) takes the answers."""
        self._check_open()
        envs = env_indices(envs, self.num_envs)
        chunks = self._check_actions(actions, envs)
        if all(spec is None for spec in self._specs) and not self._starting:
            raise RuntimeError("call reset() before step()")
        check_not_stepping(envs, self._in_flight)
        env_actions = to_env_actions(chunks)
        try:  # every message goes out before any answer is awaited, so the workers run in parallel
            for row, i in enumerate(envs):
                if not self._done[i]:
                    self._in_flight[i] = self._workers[i].send(
                        ("step", env_actions[row, : self.max_steps - self._steps[i]], self._specs[i].record_video))
        except BaseException:
            self.close()  # interrupted (Ctrl-C): answers in flight would be read as answers to the next command
            raise

    def receive_step(self, envs: Sequence[int] | None = None) -> StepResult:
        """step()'s second half: waits for the answers to the steps send_step sent to `envs` (default every env) and
        returns the batch. `started` names only envs among `envs` (another env's finished reset waits for its own
        receive_step); the observation of an env whose step is still in flight is the one before that step."""
        self._check_open()
        envs = env_indices(envs, self.num_envs)
        sent = {i: self._in_flight.pop(i) for i in envs if i in self._in_flight}
        replies, failures = self._receive(sent)
        for i, payload in replies.items():
            self._store(i, payload)
            self._frames[i].extend(payload["frames"])
            self._steps[i] += payload["executed"]
            self._success[i] = payload["success"]
            self._done[i] = payload["success"] or self._steps[i] >= self.max_steps
        for i, reason in failures.items():
            self._lost[i] = self._done[i] = True
            self._restart(i, reason)
        group = set(envs)
        # nothing was stepped: wait for one of these envs' resets rather than return with nothing done
        self._collect_starts(keep_waiting=lambda: not sent and not self._started & group
                             and not group.isdisjoint(self._starting))
        reported = self._started & group
        self._started -= reported
        started = np.zeros(self.num_envs, bool)
        started[list(reported)] = True
        return StepResult(self._observation(), self._done.copy(), self._success.copy(), self._steps.copy(),
                          self._lost.copy(), started)

    def close(self) -> None:
        """Stops all workers; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> "LiberoVectorEnv":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _send_reset(self, env_index: int, attempt: int) -> None:
        spec = self._starting[env_index]
        task = self._tasks[spec.task_id]
        reason = self._workers[env_index].send(("reset", task.bddl_file, task.init_states[spec.init_index],
                                                scene_seed(spec), spec.record_video))
        self._reset_attempts[env_index] = attempt
        self._reset_deadlines[env_index] = time.monotonic() + self.timeout_s
        if reason:
            self._reset_failed(env_index, reason)

    def _finish_builds(self, envs: Sequence[int]) -> None:
        """Takes the answers of the scene builds sent to `envs`, waiting for those still building; a worker that
        failed its build is replaced (its env had no episode to lose)."""
        try:
            for i in sorted(self._building.intersection(envs)):
                self._building.discard(i)
                payload, reason = self._workers[i].receive(self.timeout_s)
                if payload is None:
                    self._restart(i, reason)
                else:
                    for part, seconds in payload["seconds"].items():
                        self.worker_seconds[part] += seconds
        except BaseException:
            self.close()  # builds still in flight would be read as answers to the next command
            raise

    def _reset_failed(self, env_index: int, reason: str) -> None:
        self.lost_resets += 1
        self._restart(env_index, reason)
        if self._reset_attempts[env_index] >= 2:
            self.close()  # other resets may still be in flight: their answers would be misread later
            raise RuntimeError(f"env {env_index} failed to reset twice on fresh workers; its last error:\n{reason}")
        self._send_reset(env_index, attempt=2)

    def _collect_starts(self, keep_waiting: Callable[[], bool]) -> None:
        """Takes in the answers of the resets in flight that are there, and waits for more while keep_waiting();
        each env whose episode has started joins self._started until step() reports it."""
        try:
            while self._starting:
                answered = [i for i in self._starting if self._workers[i].has_answer()]
                for i in answered:
                    payload, reason = self._workers[i].receive(self.timeout_s)
                    if payload is None:
                        self._reset_failed(i, reason)
                        continue
                    self._specs[i] = self._starting.pop(i)
                    self._done[i] = self._success[i] = self._lost[i] = False
                    self._steps[i] = 0
                    self._store(i, payload)
                    self._frames[i] = payload["frames"]
                    self._started.add(i)
                if not self._starting or not keep_waiting():
                    break
                if not answered:
                    first = min(self._starting, key=self._reset_deadlines.__getitem__)
                    workers = [self._workers[i] for i in self._starting]
                    ends = [w.conn for w in workers] + [w.process.sentinel for w in workers]
                    if not connection.wait(ends, max(0.0, self._reset_deadlines[first] - time.monotonic())):
                        self._reset_failed(first, f"no answer within {self.timeout_s:.0f} s")
        except BaseException:
            self.close()  # resets still in flight would be read as answers to the next command
            raise

    def _receive(self, sent: dict[int, str]) -> tuple[dict[int, dict], dict[int, str]]:
        """The answers of the workers that were sent a step (env -> "" or why the send failed), and the failures."""
        failures = {i: reason for i, reason in sent.items() if reason}
        replies = {}
        try:
            for i in sent:
                if i in failures:
                    continue
                payload, reason = self._workers[i].receive(self.timeout_s)
                if payload is None:
                    failures[i] = reason
                else:
                    replies[i] = payload
        except BaseException:
            # Interrupted (Ctrl-C) with answers still in flight: they would be read as answers to the next command.
            self.close()
            raise
        return replies, failures

    def _restart(self, env_index: int, reason: str) -> None:
        logger.warning("LIBERO env %d lost its worker (%s); starting a new one", env_index, reason)
        self._workers[env_index].join_or_kill(timeout_s=1.0)  # it failed: no goodbye, kill it if it lingers
        self._workers[env_index] = _Worker(self._ctx, self.wrist, self.resolution, self.rebuild_on_reset)

    def _store(self, env_index: int, payload: dict) -> None:
        """Takes in an answer's observation and the worker's times."""
        for part, seconds in payload["seconds"].items():
            self.worker_seconds[part] += seconds
        self._agentview[env_index] = payload["agentview"]
        if self._wrist is not None:
            self._wrist[env_index] = payload["wrist"]
        self._proprio[env_index] = payload["proprio"]

    def _observation(self) -> Observation:
        return Observation(
            agentview=self._agentview.copy(),
            wrist=None if self._wrist is None else self._wrist.copy(),
            proprio=self._proprio.copy(),
            instructions=["" if spec is None else self._tasks[spec.task_id].language for spec in self._specs],
        )

    def _check_actions(self, actions, envs: list[int]) -> np.ndarray:
        """[len(envs),7] or [len(envs),K,7] -> float64 [len(envs),K,7]; raises before anything reaches a worker."""
        count = len(envs)
        chunks = np.asarray(actions, dtype=np.float64)
        if chunks.ndim == 2:
            chunks = chunks[:, None, :]
        if chunks.ndim != 3 or chunks.shape[0] != count or chunks.shape[1] < 1 or chunks.shape[2] != ACTION_DIM:
            raise ValueError(f"actions must have shape [{count}, {ACTION_DIM}] or [{count}, K, "
                             f"{ACTION_DIM}] with K >= 1, got {list(np.shape(actions))}")
        bad_envs = [envs[row] for row in np.flatnonzero(~np.isfinite(chunks).all(axis=(1, 2)))]
        if bad_envs:
            raise ValueError(f"non-finite actions (NaN or inf) for env(s) {bad_envs}; nothing was sent "
                             "to the simulator")
        return chunks

    def _check_task(self, task_id: int) -> None:
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must be in [0, {self.num_tasks - 1}] for {self.suite.name}, got {task_id}")

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this LiberoVectorEnv is closed")


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: int = 30) -> None:
    """Writes uint8 [H,W,3] frames as an mp4 (imageio-ffmpeg, H.264), atomically; 30 fps as the reference."""
    if len(frames) == 0:
        raise ValueError("no frames to write; record the episode with EpisodeSpec(..., record_video=True)")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".mp4", dir=directory)
    os.close(fd)
    try:
        imageio.mimwrite(temporary, list(frames), format="FFMPEG", fps=fps)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
