"""Env steps/s of LiberoVectorEnv rendering agentview + wrist at 256x256, with 1 and 2 (or --workers) processes,
for single actions (OpenVLA: the cameras render after every step, as robosuite's own observables would) and for
8-action chunks (OpenVLA-OFT: the workers render once per chunk), so the chunk-1 number is the baseline.

Counts env steps summed over the envs, including the image pipeline and the pipe round trip, excluding scene
build and reset; beside each rate, per env step, the wall time and what the workers report of theirs (physics,
renders, image pipeline, the whole answer, CPU time: `worker_ms_per_env_step`). Then the seconds of one reset
round (every env to a new init state, 10 wait steps included) with simulators kept across resets (the default)
against rebuilt at every reset (LIBERO's hard reset, the baseline).
Last, where one process's time goes: robosuite's env.step (physics and control), one camera render, and the image
pipeline of one frame, each timed alone. Writes bench/results/libero_env.json.

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
    """Timed env steps per env (a multiple of every chunk size)."""
    workers: tuple[int, ...] = (1, 2)
    """Worker process counts to measure."""
    chunks: tuple[int, ...] = (1, 8)
    """Actions per policy query to measure (1: OpenVLA, 8: OpenVLA-OFT)."""
    warmup_steps: int = 3
    """Untimed steps per env before timing (the first renders are slower)."""
    resets: int = 4
    """Timed reset rounds per reset mode, after the untimed first one (which builds the scene)."""
    out: str = "bench/results/libero_env.json"
    """Result file, written atomically."""


def steps_per_second(args: Args, num_envs: int, chunk: int) -> tuple[float, dict[str, float]]:
    """Env steps per second summed over the envs, and per env step the milliseconds of wall time (one env's
    share of a round) and of each part the workers report (libero_env._worker.WORKER_TIMES)."""
    rng = np.random.default_rng(0)
    total = args.warmup_steps + args.steps
    with LiberoVectorEnv(args.suite, num_envs=num_envs, wrist=True, resolution=256, max_steps=total) as env:
        env.reset([EpisodeSpec(task_id=0, init_index=i % 50) for i in range(num_envs)])

        def actions(length: int) -> np.ndarray:
            batch = rng.uniform(-0.3, 0.3, size=(num_envs, length, 7))
            batch[..., 6] = 1.0
            return batch

        env.step(actions(args.warmup_steps))
        before = dict(env.worker_seconds)
        start = time.perf_counter()
        for _ in range(args.steps // chunk):
            result = env.step(actions(chunk))
        elapsed = time.perf_counter() - start
        worker = {part: (env.worker_seconds[part] - seconds) * 1e3 / (num_envs * args.steps)
                  for part, seconds in before.items()}
    if (result.steps != total).any() or result.lost.any():
        raise RuntimeError(f"an episode ended early (steps {result.steps.tolist()}, lost {result.lost.tolist()})")
    return num_envs * args.steps / elapsed, {"wall": elapsed * 1e3 / args.steps, **worker}


def reset_seconds(args: Args, num_envs: int, rebuild_on_reset: bool) -> float:
    """Mean wall seconds of one reset round of all envs, each to another init state of task 0."""
    with LiberoVectorEnv(args.suite, num_envs=num_envs, wrist=True, resolution=256,
                         rebuild_on_reset=rebuild_on_reset) as env:
        env.reset([EpisodeSpec(task_id=0, init_index=i) for i in range(num_envs)])
        start = time.perf_counter()
        for round_index in range(1, args.resets + 1):
            env.reset([EpisodeSpec(task_id=0, init_index=(round_index * num_envs + i) % 50) for i in range(num_envs)])
        return (time.perf_counter() - start) / args.resets


def step_breakdown_ms(args: Args) -> dict[str, float]:
    """Milliseconds, in this process, of one env.step (25 physics substeps and the controller), one render of the
    agentview camera at 256x256, and preprocess_image of that frame: which of them a step of the vector env is
    mostly made of on this machine."""
    from libero_env._worker import AGENTVIEW, _Simulator
    from libero_env.processing import preprocess_image
    from libero_env.suites import load_tasks

    task = load_tasks(args.suite)[0]
    simulator = _Simulator(wrist=True, resolution=256)
    try:
        simulator.reset(task.bddl_file, task.init_states[0], 0, record=False)
        actions = np.random.default_rng(0).uniform(-0.3, 0.3, size=(args.warmup_steps + args.steps, 7))
        actions[:, 6] = 1.0

        def mean_ms(work, repeats: int) -> float:
            start = time.perf_counter()
            for index in range(repeats):
                work(index)
            return round((time.perf_counter() - start) / repeats * 1e3, 2)

        for action in actions[:args.warmup_steps]:
            simulator.env.step(action.tolist())
        frame = simulator.render(AGENTVIEW)
        return {"env_step": mean_ms(lambda i: simulator.env.step(actions[args.warmup_steps + i].tolist()), args.steps),
                "render_one_camera": mean_ms(lambda i: simulator.render(AGENTVIEW), args.warmup_steps + 5),
                "preprocess_one_image": mean_ms(lambda i: preprocess_image(frame), 20)}
    finally:
        simulator.close()


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
    if any(args.steps % chunk for chunk in args.chunks):
        raise ValueError(f"--steps {args.steps} must be a multiple of every --chunks value {args.chunks}")
    measured = {f"{workers}_workers_chunk_{chunk}": steps_per_second(args, workers, chunk)
                for workers in args.workers for chunk in args.chunks}
    rates = {key: round(rate, 2) for key, (rate, _) in measured.items()}
    resets = {f"{workers}_workers_{mode}": round(reset_seconds(args, workers, mode == "rebuilt"), 3)
              for workers in args.workers for mode in ("kept", "rebuilt")}
    results = {
        "steps_per_s": rates,
        "reset_seconds": resets,
        "reset_speedup": {f"{workers}_workers": round(resets[f"{workers}_workers_rebuilt"]
                                                     / resets[f"{workers}_workers_kept"], 1)
                          for workers in args.workers},
        "chunk_speedup": {f"{workers}_workers": round(rates[f"{workers}_workers_chunk_{max(args.chunks)}"]
                                                     / rates[f"{workers}_workers_chunk_{min(args.chunks)}"], 2)
                          for workers in args.workers},
        "worker_ms_per_env_step": {key: {part: round(ms, 2) for part, ms in parts.items()}
                                   for key, (_, parts) in measured.items()},
        "one_process_ms": step_breakdown_ms(args),
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
