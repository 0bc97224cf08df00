"""The scripted libero_spatial expert: measure its success rate, or collect demos and their dataset statistics;
or replay the official LIBERO demonstration files (HDF5) into the same demo format.

Run from the repository root (MUJOCO_GL=egl for the camera renders of `collect`):

    python -m scripts.collect_demos measure --init-states 0-4            # 5 init states x 10 tasks, no rendering
    python -m scripts.collect_demos measure --workers 16                 # all 500 episodes on a 16-core machine
    python -m scripts.collect_demos collect --out-dir demos/libero_spatial --init-states train --per-task 1
    python -m scripts.collect_demos replay --hdf5 libero_spatial/*_demo.hdf5 --out-dir demos/replayed

`measure` writes bench/results/expert_libero_spatial.json (per-task successes / trials, totals, the command and
its wall time). `collect` writes the demo directory described in libero_env/demos.py; re-running it resumes.
Demos come from the training init states by default, so held-out states stay unseen (init_state_split).
`replay` replays each file's demos at 256x256 with both cameras as OpenVLA regenerated its LIBERO data (no-op
actions skipped, failed replays dropped) and writes the same demo directory; re-running it resumes.
"""

import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Literal

import tyro

from libero_env.demos import collect_demos, measure_expert, replay_libero_demos, write_json
from libero_env.expert import ExpertConfig
from libero_env.suites import NUM_INIT_STATES, get_suite, init_state_split
from trainer.errors import one_line_errors, traceback_requested


def parse_indices(spec: str, count: int, what: str) -> list[int]:
    """"all", "train" / "heldout" (init states only: init_state_split's default split), "a-b" (inclusive) or
    "i,j,k" -> sorted indices in [0, count)."""
    if spec == "all":
        return list(range(count))
    if spec in ("train", "heldout") and what == "init states":
        train, heldout = init_state_split(n_states=count)
        return train if spec == "train" else heldout
    try:
        if "-" in spec:
            low, high = (int(x) for x in spec.split("-"))
            indices = list(range(low, high + 1))
        else:
            indices = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        indices = []
    if not indices or not all(0 <= i < count for i in indices):
        forms = '"all", "train", "heldout", ' if what == "init states" else '"all", '
        raise ValueError(f"{what} {spec!r}: use {forms}a range like 0-4 or a list like 0,3,7, within [0, {count - 1}]")
    return indices


@dataclass
class Measure:
    """Success rate of the expert, without rendering."""

    suite: str = "libero_spatial"
    """LIBERO suite (the expert handles pick-and-place tasks: libero_spatial)."""
    tasks: str = "all"
    """Task ids: "all", a range "0-4" or a list "0,3"."""
    init_states: str = "all"
    """Init states per task: "all", "train", "heldout", a range or a list."""
    workers: int = 1
    """Processes (one per core; the reset rebuilds the scene, so a core plays about one episode in 3 s)."""
    out: str = "bench/results/expert_libero_spatial.json"
    """Where to write the results."""
    device: str = ""
    """Description of the machine for the record; default: CPU count and platform."""


@dataclass
class Collect:
    """Demos with the real observation pipeline, kept when successful, plus dataset_statistics.json."""

    out_dir: str
    """Demo directory (created; an existing one is resumed)."""
    suite: str = "libero_spatial"
    """LIBERO suite."""
    tasks: str = "all"
    """Task ids: "all", a range "0-4" or a list "0,3"."""
    init_states: str = "train"
    """Init states per task: "train" (default: held-out ones stay unseen), "heldout", "all", a range or a list."""
    per_task: int = 0
    """Use only the first this many of the selected init states of each task (0: all of them)."""
    workers: int = 1
    """Processes."""
    image_format: Literal["jpeg", "png"] = "jpeg"
    """Image encoding in the episode files: jpeg (quality 95, compact) or png (lossless)."""


@dataclass
class Replay:
    """Official LIBERO demonstrations (HDF5) replayed into a demo directory, plus dataset_statistics.json."""

    hdf5: tuple[str, ...]
    """LIBERO demo files (<task name>_demo.hdf5), each matched to a task of --suite by its instruction."""
    out_dir: str
    """Demo directory (created; an existing one is resumed)."""
    suite: str = "libero_spatial"
    """LIBERO suite the files belong to."""
    max_demos: int = 0
    """Replay only the first this many demos of each file (0: all of them)."""
    image_format: Literal["jpeg", "png"] = "jpeg"
    """Image encoding in the episode files: jpeg (quality 95, compact) or png (lossless)."""


def measure(args: Measure) -> None:
    spec = get_suite(args.suite)
    start = time.perf_counter()
    results = measure_expert(
        args.suite, parse_indices(args.tasks, spec.num_tasks, "task ids"),
        parse_indices(args.init_states, NUM_INIT_STATES, "init states"), workers=args.workers, config=ExpertConfig(),
    )
    results["command"] = "python -m scripts.collect_demos " + shlex.join(sys.argv[1:])
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["workers"] = args.workers
    results["device"] = args.device or f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}"
    write_json(args.out, results)
    print(f"{results['successes']}/{results['trials']} successes ({100 * results['success_rate']:.1f} %), "
          f"{results['seconds']} s -> {args.out}")


def collect(args: Collect) -> None:
    spec = get_suite(args.suite)
    if args.per_task < 0:
        raise ValueError(f"per_task must be >= 0 (0 = all selected init states), got {args.per_task}")
    init_indices = parse_indices(args.init_states, NUM_INIT_STATES, "init states")
    if args.per_task:
        init_indices = init_indices[: args.per_task]
    result = collect_demos(
        args.suite, parse_indices(args.tasks, spec.num_tasks, "task ids"), init_indices, args.out_dir,
        workers=args.workers, image_format=args.image_format,
    )
    kept = sum(v == "success" for v in result["attempts"].values())
    stats = result["statistics"][args.suite]
    print(f"{kept}/{len(result['attempts'])} episodes kept, {stats['num_transitions']} transitions -> {args.out_dir}")


def replay(args: Replay) -> None:
    get_suite(args.suite)
    if args.max_demos < 0:
        raise ValueError(f"max_demos must be >= 0 (0 = all demos of each file), got {args.max_demos}")
    result = replay_libero_demos(args.hdf5, args.suite, args.out_dir, args.max_demos, args.image_format)
    kept = sum(v == "success" for v in result["attempts"].values())
    stats = result["statistics"][args.suite]
    print(f"{kept}/{len(result['attempts'])} replays kept, {stats['num_transitions']} transitions -> {args.out_dir}")


if __name__ == "__main__":
    show_traceback, args = traceback_requested(sys.argv[1:])
    with one_line_errors("collect_demos.py", show_traceback):
        command = tyro.extras.subcommand_cli_from_dict({"measure": Measure, "collect": Collect, "replay": Replay},
                                                       args=args)
        {Measure: measure, Collect: collect, Replay: replay}[type(command)](command)
