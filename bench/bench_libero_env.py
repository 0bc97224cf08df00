"""Env steps/s of LiberoVectorEnv rendering agentview + wrist at 256x256, with 1 and 2 worker processes.

Counts policy steps summed over the envs, including the image pipeline and the pipe round trip, excluding scene
build and reset. Writes bench/results/libero_env.json.

    OMP_NUM_THREADS=1 MUJOCO_GL=egl .venv/bin/python -m bench.bench_libero_env
"""

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro

from libero_env import EpisodeSpec, LiberoVectorEnv


@dataclass
class Args:
    suite: str = "libero_spatial"
    """Suite whose task 0 is stepped."""
    steps: int = 40
    """Timed steps per env."""
    warmup_steps: int = 3
    """Untimed steps per env before timing (the first renders are slower)."""
    out: str = "bench/results/libero_env.json"
    """Result file, written atomically."""


def steps_per_second(args: Args, num_envs: int) -> float:
    rng = np.random.default_rng(0)
    total = args.warmup_steps + args.steps
    with LiberoVectorEnv(args.suite, num_envs=num_envs, wrist=True, resolution=256, max_steps=total) as env:
        env.reset([EpisodeSpec(task_id=0, init_index=i) for i in range(num_envs)])

        def actions() -> np.ndarray:
            batch = rng.uniform(-0.3, 0.3, size=(num_envs, 7))
            batch[:, 6] = 1.0
            return batch

        for _ in range(args.warmup_steps):
            env.step(actions())
        start = time.perf_counter()
        for _ in range(args.steps):
            result = env.step(actions())
        elapsed = time.perf_counter() - start
    if (result.steps != total).any() or result.lost.any():
        raise RuntimeError(f"an episode ended early (steps {result.steps.tolist()}, lost {result.lost.tolist()})")
    return num_envs * args.steps / elapsed


def gl_renderer() -> str:
    """The OpenGL renderer MuJoCo gets here, e.g. "llvmpipe" for Mesa's software rasteriser."""
    import mujoco
    from OpenGL import GL

    context = mujoco.GLContext(16, 16)
    context.make_current()
    renderer = f"{GL.glGetString(GL.GL_RENDERER).decode()}, {GL.glGetString(GL.GL_VERSION).decode()}"
    context.free()
    return renderer


def cpu_description() -> str:
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} logical cores"


def main(args: Args) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    results = {
        "steps_per_s_1_worker": round(steps_per_second(args, 1), 2),
        "steps_per_s_2_workers": round(steps_per_second(args, 2), 2),
        "render": f"MUJOCO_GL={os.environ['MUJOCO_GL']}, {gl_renderer()}; agentview + wrist at 256x256",
        "cpu": cpu_description(),
        "suite": args.suite,
        "timed_steps_per_env": args.steps,
    }
    print(json.dumps(results, indent=2))
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".json", delete=False) as tmp:
        json.dump(results, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
