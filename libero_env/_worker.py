"""The subprocess side of LiberoVectorEnv: one LIBERO env, driven over a pipe.

Messages in: ("reset", bddl_file, init_state, scene_seed, record), ("step", env_actions [K,7], record),
("build", bddl_file), ("close",). Answers: ("ok", payload dict) or ("error", traceback text); after an error the
worker exits, since its simulator state can no longer be trusted, and the parent starts a fresh one. Every payload
carries `seconds`: where the worker's time for that answer went (WORKER_TIMES).
"""

import os
import signal
import sys
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from multiprocessing.connection import Connection

import numpy as np

from libero_env.processing import preprocess_image, proprio_vector, upright
from libero_env.suites import start_episode

AGENTVIEW, WRIST = "agentview", "robot0_eye_in_hand"
WORKER_TIMES = ("build", "physics", "render", "preprocess", "answer", "cpu")
"""Seconds a worker reports per answer: building a scene, robosuite's env.step and resets (physics and control),
camera renders, the image pipeline; the wall time from taking the command to sending the answer, and the CPU time
the process used meanwhile (all its threads): an answer well above the four parts, or CPU time well below the
answer, says the worker waited for something other than its own work (a CPU core, the GPU's renderer)."""


class _Simulator:
    """One OffScreenRenderEnv, built when the task changes and reset the way the reference eval does
    (suites.start_episode); with `rebuild_on_reset`, LIBERO's hard reset rebuilds it at every reset as well.

    The cameras are rendered once per answer, after the last executed action, instead of after every action by
    robosuite's camera observables (disabled here): an 8-action chunk then renders 2 images instead of 16, 5.2x
    the env steps/s with software rendering and 2.5x on an H100 machine (BENCHMARKS.md). The image is the camera
    sensor's own render call at the same resolution, taken one 2 ms physics substep after robosuite would sample it.
    """

    def __init__(self, wrist: bool, resolution: int, rebuild_on_reset: bool = False):
        self.wrist = wrist
        self.resolution = resolution
        self.rebuild_on_reset = rebuild_on_reset
        self.cameras = [AGENTVIEW, WRIST] if wrist else [AGENTVIEW]
        self.env = None
        self.bddl_file = ""
        self.seconds: dict[str, float] = defaultdict(float)
        """Time of the current answer, by part (WORKER_TIMES); _serve clears it per command."""

    @contextmanager
    def timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started

    def build(self, bddl_file: str) -> dict:
        """Holds the scene of `bddl_file`, building it unless it already does; no episode starts."""
        if bddl_file != self.bddl_file:
            self.close()
            with self.timed("build"):
                self.env = _make_env(bddl_file, self.cameras, self.resolution, self.rebuild_on_reset)
            self.bddl_file = bddl_file
        return {}

    def reset(self, bddl_file: str, init_state: np.ndarray, scene_seed: int, record: bool) -> dict:
        self.build(bddl_file)
        with self.timed("physics"):
            obs = start_episode(self.env, init_state, scene_seed)
        return self._payload(obs, executed=0, success=False, frames=[upright(self.render(AGENTVIEW))] if record else [])

    def step(self, env_actions: np.ndarray, record: bool) -> dict:
        frames, executed, success = [], 0, False
        for action in env_actions:
            with self.timed("physics"):
                obs, _, success, _ = self.env.step(action.tolist())
            executed += 1
            if record:
                frames.append(upright(self.render(AGENTVIEW)))
            if success:  # LIBERO's done flag is the task's success predicate
                break
        return self._payload(obs, executed, bool(success), frames)

    def render(self, camera: str) -> np.ndarray:
        """The raw (upside-down) frame of `camera` at the current simulator state."""
        with self.timed("render"):
            return self.env.sim.render(camera_name=camera, width=self.resolution, height=self.resolution)

    def policy_image(self, camera: str) -> np.ndarray:
        """The current frame of `camera` as the policy sees it."""
        frame = self.render(camera)
        with self.timed("preprocess"):
            return preprocess_image(frame)

    def _payload(self, obs: dict, executed: int, success: bool, frames: list) -> dict:
        return {
            "agentview": self.policy_image(AGENTVIEW),
            "wrist": self.policy_image(WRIST) if self.wrist else None,
            "proprio": proprio_vector(obs["robot0_eef_pos"], obs["robot0_eef_quat"], obs["robot0_gripper_qpos"]),
            "executed": executed,
            "success": success,
            "frames": frames,
        }

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
            self.bddl_file = ""


def _make_env(bddl_file: str, cameras: list[str], resolution: int, hard_reset: bool):
    # Imported here, after MUJOCO_GL is settled, and never in the parent process.
    from libero.libero.envs import OffScreenRenderEnv

    env = OffScreenRenderEnv(bddl_file_name=bddl_file, camera_heights=resolution, camera_widths=resolution,
                             camera_names=cameras, hard_reset=hard_reset)
    for camera in cameras:
        env.env.modify_observable(f"{camera}_image", "enabled", False)
    return env


def worker_main(conn: Connection, wrist: bool, resolution: int, rebuild_on_reset: bool) -> None:
    """Entry point of a worker process; returns when told to close or when the parent goes away."""
    # Ctrl-C reaches the whole process group; the parent handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    simulator = _Simulator(wrist, resolution, rebuild_on_reset)
    try:
        _serve(conn, simulator)
    finally:
        simulator.close()
        conn.close()


def _serve(conn: Connection, simulator: _Simulator) -> None:
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # the parent is gone
            return
        if command == "close":
            return
        started, cpu_started = time.perf_counter(), time.process_time()
        simulator.seconds.clear()
        try:
            if command == "reset":
                payload = simulator.reset(*args)
            elif command == "step":
                payload = simulator.step(*args)
            elif command == "build":
                payload = simulator.build(*args)
            else:
                raise ValueError(f"unknown worker command {command!r}")
        except Exception:
            _answer(conn, ("error", traceback.format_exc()))
            return
        payload["seconds"] = {**simulator.seconds, "answer": time.perf_counter() - started,
                              "cpu": time.process_time() - cpu_started}
        if not _answer(conn, ("ok", payload)):
            return


def _answer(conn: Connection, message: tuple) -> bool:
    """Sends `message`; False when the parent has gone away."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True
