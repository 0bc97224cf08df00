"""The subprocess side of LiberoVectorEnv: one LIBERO env, driven over a pipe.

Messages in: ("reset", bddl_file, init_state, scene_seed, record), ("step", env_actions [K,7], record), ("close",).
Answers: ("ok", payload dict) or ("error", traceback text); after an error the worker exits, since its simulator
state can no longer be trusted, and the parent starts a fresh one.
"""

import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

import numpy as np

from libero_env.processing import preprocess_image, proprio_vector, upright
from libero_env.suites import start_episode

AGENTVIEW, WRIST = "agentview", "robot0_eye_in_hand"


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

    def reset(self, bddl_file: str, init_state: np.ndarray, scene_seed: int, record: bool) -> dict:
        if bddl_file != self.bddl_file:
            self.close()
            self.env = _make_env(bddl_file, self.cameras, self.resolution, self.rebuild_on_reset)
            self.bddl_file = bddl_file
        obs = start_episode(self.env, init_state, scene_seed)
        return self._payload(obs, executed=0, success=False, frames=[upright(self.render(AGENTVIEW))] if record else [])

    def step(self, env_actions: np.ndarray, record: bool) -> dict:
        frames, executed, success = [], 0, False
        for action in env_actions:
            obs, _, success, _ = self.env.step(action.tolist())
            executed += 1
            if record:
                frames.append(upright(self.render(AGENTVIEW)))
            if success:  # LIBERO's done flag is the task's success predicate
                break
        return self._payload(obs, executed, bool(success), frames)

    def render(self, camera: str) -> np.ndarray:
        """The raw (upside-down) frame of `camera` at the current simulator state."""
        return self.env.sim.render(camera_name=camera, width=self.resolution, height=self.resolution)

    def _payload(self, obs: dict, executed: int, success: bool, frames: list) -> dict:
        return {
            "agentview": preprocess_image(self.render(AGENTVIEW)),
            "wrist": preprocess_image(self.render(WRIST)) if self.wrist else None,
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
        try:
            if command == "reset":
                payload = simulator.reset(*args)
            elif command == "step":
                payload = simulator.step(*args)
            else:
                raise ValueError(f"unknown worker command {command!r}")
        except Exception:
            _answer(conn, ("error", traceback.format_exc()))
            return
        if not _answer(conn, ("ok", payload)):
            return


def _answer(conn: Connection, message: tuple) -> bool:
    """Sends `message`; False when the parent has gone away."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True
