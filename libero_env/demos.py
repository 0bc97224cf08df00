"""Expert demonstrations for supervised fine-tuning: collection, on-disk format, no-op filtering, statistics.

A demo directory:

    <dir>/
      episodes/task03_init017.npz   one successful expert episode (task 3, init state 17), no-op steps removed
      episodes/task03_demo017.npz   or one replayed demonstration of an official LIBERO HDF5 file (its demo_17)
      attempts.json                 {"task03_init017": "success" | "failure", ...}: what collection has tried, so
                                    an interrupted or partial collection resumes where it stopped
      dataset_statistics.json       OpenVLA's layout (REF 1.3) under the suite key, from every episode in episodes/

Each episode file is an uncompressed `np.savez` archive (no pickled objects; `load_episode` reads it back) with,
for T kept steps:

    suite              str              e.g. "libero_spatial"
    task_id            int64 []         task index in the suite
    init_index         int64 []         index of the task's fixed initial state (0..49); N of demo_N for a
                                        replayed LIBERO demonstration
    instruction        str              raw `task.language`
    actions            float32 [T,7]    dataset convention: xyz and rotation deltas in the OSC controller's
                                        normalised [-1,1], gripper 1 = open, 0 = close (REF 5.2)
    proprio            float32 [T,8]    eef position, eef axis-angle, 2 gripper joints (REF 6.3), when the action
                                        was chosen
    agentview          uint8 [B]        T encoded images (JPEG quality 95, or PNG) back to back; image t is
    agentview_offsets  int64 [T+1]      agentview[offsets[t]:offsets[t+1]], the 224x224 RGB image the policy sees
                                        at that step (`preprocess_image`: rotate 180, JPEG, Lanczos 224, centre crop)
    wrist              uint8 [B]        the wrist camera (robot0_eye_in_hand), stored the same way
    wrist_offsets      int64 [T+1]
    image_format       str              "jpeg" (about 14 kB a image, one more lossy step than the env's images) or
                                        "png" (lossless, about 50 kB)

Episodes are reset as LiberoVectorEnv resets them (reset, init state, 10 wait steps, not recorded) and kept only if
the bowl rests on the plate once the expert has let go and retreated. No-op steps are then dropped as OpenVLA's
regenerated LIBERO data did (||a[:6]|| < 1e-4 and the same gripper value as the last kept action); unlike that
replay, the dropped steps had been executed, which changes nothing the next kept image shows.

`replay_libero_demos` turns the official LIBERO demonstration files (HDF5: data/demo_N/{actions, states, obs/...},
data.attrs problem_info / env_args) into such episodes as OpenVLA regenerated its LIBERO data: each demo is
replayed from its first state at 256x256 with both cameras, after the same 10 wait steps as evaluation, no-op
actions are skipped (not executed), and a demo whose last step does not report success is dropped.
"""

import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from libero_env.expert import ExpertConfig, make_env, run_expert
from libero_env.processing import preprocess_image, proprio_vector, to_dataset_actions
from libero_env.suites import EpisodeSpec, get_suite, load_tasks, scene_seed, start_episode

IMAGE_FORMATS = ("jpeg", "png")
"""Encodings an episode's images may be stored in."""
JPEG_QUALITY = 95
"""Quality of stored JPEG images (TF's encode_jpeg default, as the RLDS data)."""
NOOP_THRESHOLD = 1e-4
"""Norm of a[:6] under which an action with an unchanged gripper is a no-op (OpenVLA's regenerate_libero_dataset)."""
ACTION_MASK = [True] * 6 + [False]
"""Which action dimensions OpenVLA normalises: all but the gripper (REF 1.3)."""
EPISODES_DIR, ATTEMPTS_FILE, STATISTICS_FILE = "episodes", "attempts.json", "dataset_statistics.json"
REPLAY_SCENE_SEED = 0
"""Fixture placement of replayed official demos: their files do not record where the fixtures stood, so every
replay uses this one draw (suites.start_episode) and gives the same episode each time."""


@dataclass
class Episode:
    """One demonstration, decoded."""

    suite: str
    """LIBERO suite name."""
    task_id: int
    """Task index in the suite."""
    init_index: int
    """Index of the task's initial state."""
    instruction: str
    """Raw task language."""
    agentview: np.ndarray
    """uint8 [T,224,224,3] processed third-person images."""
    wrist: np.ndarray
    """uint8 [T,224,224,3] processed wrist images."""
    proprio: np.ndarray
    """float32 [T,8] proprioceptive state."""
    actions: np.ndarray
    """float32 [T,7] dataset-convention actions."""


def episode_key(task_id: int, init_index: int) -> str:
    return f"task{task_id:02d}_init{init_index:03d}"


def replayed_key(task_id: int, demo_index: int) -> str:
    return f"task{task_id:02d}_demo{demo_index:03d}"


def noop_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """bool [T], True for the no-op steps OpenVLA's regeneration drops: ||a[:6]|| < threshold and, after the
    first kept action, the same gripper value as the last kept one (a pure gripper move is kept)."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != 7:
        raise ValueError(f"actions must have shape [T, 7], got {actions.shape}")
    dropped = np.zeros(len(actions), dtype=bool)
    last_kept = None
    for t, action in enumerate(actions):
        still = np.linalg.norm(action[:6]) < threshold
        if still and (last_kept is None or action[6] == last_kept[6]):
            dropped[t] = True
        else:
            last_kept = action
    return dropped


def encode_images(images: np.ndarray, image_format: str = "jpeg") -> tuple[np.ndarray, np.ndarray]:
    """uint8 [T,H,W,3] -> (all encoded images back to back uint8 [B], offsets int64 [T+1])."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    options = {"quality": JPEG_QUALITY} if image_format == "jpeg" else {}
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=image_format.upper(), **options)
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    blob = np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)
    return blob, offsets


def decode_images(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of `encode_images`: uint8 [T,H,W,3]."""
    images = [
        np.asarray(Image.open(io.BytesIO(blob[start:end].tobytes())).convert("RGB"))
        for start, end in zip(offsets[:-1], offsets[1:])
    ]
    return np.stack(images) if images else np.zeros((0, 224, 224, 3), np.uint8)


def _atomic_write(path: Path, write) -> None:
    """Calls write(file object) on a temporary file next to `path`, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes `obj` as indented JSON, atomically."""
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_episode(path: str | os.PathLike, episode: Episode, image_format: str = "jpeg") -> None:
    """Writes `episode` in the format of this module's docstring, atomically."""
    steps = len(episode.actions)
    shapes = {"agentview": episode.agentview.shape, "wrist": episode.wrist.shape, "proprio": episode.proprio.shape}
    expected = {"agentview": (steps, 224, 224, 3), "wrist": (steps, 224, 224, 3), "proprio": (steps, 8)}
    if episode.actions.shape != (steps, 7) or shapes != expected:
        raise ValueError(f"episode arrays must be actions [T,7] and {expected}; got actions "
                         f"{episode.actions.shape} and {shapes}")
    agentview, agentview_offsets = encode_images(episode.agentview, image_format)
    wrist, wrist_offsets = encode_images(episode.wrist, image_format)
    arrays = dict(
        suite=np.array(episode.suite), task_id=np.int64(episode.task_id), init_index=np.int64(episode.init_index),
        instruction=np.array(episode.instruction), actions=episode.actions.astype(np.float32),
        proprio=episode.proprio.astype(np.float32), agentview=agentview, agentview_offsets=agentview_offsets,
        wrist=wrist, wrist_offsets=wrist_offsets, image_format=np.array(image_format),
    )
    _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def load_episode(path: str | os.PathLike, images: bool = True) -> Episode:
    """Reads an episode file; with images=False the image arrays are empty [0,224,224,3] (fast, for statistics)."""
    with np.load(path, allow_pickle=False) as data:
        def camera(name: str) -> np.ndarray:
            if not images:
                return np.zeros((0, 224, 224, 3), np.uint8)
            return decode_images(data[name], data[f"{name}_offsets"])

        return Episode(
            suite=str(data["suite"]), task_id=int(data["task_id"]), init_index=int(data["init_index"]),
            instruction=str(data["instruction"]), agentview=camera("agentview"), wrist=camera("wrist"),
            proprio=data["proprio"], actions=data["actions"],
        )


def episode_paths(directory: str | os.PathLike) -> list[Path]:
    """The episode files of a demo directory, sorted by task then init state (or demo number)."""
    return sorted((Path(directory) / EPISODES_DIR).glob("task*_*.npz"))


def _summary(values: np.ndarray) -> dict[str, list[float]]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
        "max": values.max(0).tolist(), "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def dataset_statistics(actions: Sequence[np.ndarray], proprio: Sequence[np.ndarray]) -> dict:
    """OpenVLA's statistics of one dataset (REF 1.3) from per-trajectory actions [T,7] and proprio [T,8]:
    mean, std (population), max, min, q01, q99 per dimension (np.quantile, linear), the action mask (gripper not
    normalised), num_transitions and num_trajectories. Put it under the dataset key (the suite) before saving."""
    if len(actions) == 0 or len(actions) != len(proprio):
        raise ValueError(f"need one proprio array per trajectory and at least one trajectory; got {len(actions)} "
                         f"action and {len(proprio)} proprio arrays")
    all_actions, all_proprio = np.concatenate(actions), np.concatenate(proprio)
    if len(all_actions) == 0:
        raise ValueError("the trajectories hold no transitions")
    return {
        "action": {**_summary(all_actions), "mask": list(ACTION_MASK)},
        "proprio": _summary(all_proprio),
        "num_transitions": int(len(all_actions)),
        "num_trajectories": int(len(actions)),
    }


def write_dataset_statistics(directory: str | os.PathLike) -> dict:
    """Computes the statistics of every episode in `directory` and writes `dataset_statistics.json` there as
    {suite: statistics}; returns that dict."""
    paths = episode_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no episodes in {Path(directory) / EPISODES_DIR}; collect demos first")
    episodes = [load_episode(p, images=False) for p in paths]
    suites = sorted({e.suite for e in episodes})
    if len(suites) != 1:
        raise ValueError(f"{directory} mixes episodes of several suites {suites}; keep one suite per directory")
    statistics = {suites[0]: dataset_statistics([e.actions for e in episodes], [e.proprio for e in episodes])}
    write_json(Path(directory) / STATISTICS_FILE, statistics)
    return statistics


def episode_from_observations(suite: str, task_id: int, init_index: int, instruction: str,
                              observations: Sequence[dict], actions: np.ndarray) -> Episode:
    """An episode from the env observation each (dataset-convention) action was chosen at."""
    return Episode(
        suite=suite, task_id=task_id, init_index=init_index, instruction=instruction,
        agentview=np.stack([preprocess_image(o["agentview_image"]) for o in observations]),
        wrist=np.stack([preprocess_image(o["robot0_eye_in_hand_image"]) for o in observations]),
        proprio=np.stack([proprio_vector(o["robot0_eef_pos"], o["robot0_eef_quat"], o["robot0_gripper_qpos"])
                          for o in observations]),
        actions=np.asarray(actions, dtype=np.float32),
    )


def record_demo(env, suite: str, task_id: int, init_index: int, instruction: str, init_state: np.ndarray,
                config: ExpertConfig = ExpertConfig()) -> tuple[Episode | None, int]:
    """Runs the expert in `env` (built with cameras), in scene 0 of (task_id, init_index), and returns (the processed
    episode without no-ops, or None if the bowl did not end on the plate; env steps the expert took)."""
    run = run_expert(env, init_state, scene_seed(EpisodeSpec(task_id, init_index)), get_suite(suite).max_steps,
                     config, keep_observations=True)
    if not run.settled:
        return None, len(run.actions)
    kept = np.flatnonzero(~noop_mask(run.actions))
    episode = episode_from_observations(suite, task_id, init_index, instruction,
                                        [run.observations[t] for t in kept], run.actions[kept])
    return episode, len(run.actions)


@dataclass(frozen=True)
class Job:
    """Episodes of one task that one process plays, reusing one env."""

    suite: str
    """LIBERO suite name."""
    task_id: int
    """Task index in the suite."""
    init_indices: tuple[int, ...]
    """Init states to play, in order."""
    config: ExpertConfig
    """The expert's settings."""
    out_dir: str = ""
    """Where to write episodes; empty to only measure (no cameras)."""
    image_format: str = "jpeg"
    """Encoding of the stored images (collecting only)."""


@dataclass(frozen=True)
class Outcome:
    """What one episode of a job gave."""

    task_id: int
    """Task index in the suite."""
    init_index: int
    """Init state index."""
    success: bool
    """Measuring: the task's success fired within the step limit. Collecting: the episode was kept."""
    steps: int
    """Env steps the expert took (no-ops included)."""
    seconds: float
    """Wall time of the episode, reset included."""


def run_job(job: Job) -> list[Outcome]:
    """Plays a job's episodes (in a worker process or in this one) and, when collecting, writes the kept ones."""
    task = load_tasks(job.suite)[job.task_id]
    env = make_env(task.bddl_file, cameras=bool(job.out_dir))
    outcomes = []
    try:
        for init_index in job.init_indices:
            start = time.perf_counter()
            if job.out_dir:
                episode, steps = record_demo(env, job.suite, job.task_id, init_index, task.language,
                                             task.init_states[init_index], job.config)
                if episode is not None:
                    path = Path(job.out_dir) / EPISODES_DIR / f"{episode_key(job.task_id, init_index)}.npz"
                    save_episode(path, episode, job.image_format)
                success = episode is not None
            else:
                run = run_expert(env, task.init_states[init_index], scene_seed(EpisodeSpec(job.task_id, init_index)),
                                 get_suite(job.suite).max_steps, job.config)
                success, steps = run.success, len(run.actions)
            outcomes.append(Outcome(job.task_id, init_index, success, steps, time.perf_counter() - start))
    finally:
        env.close()
    return outcomes


def make_jobs(suite: str, task_ids: Iterable[int], init_indices: Sequence[int], per_job: int, config: ExpertConfig,
              out_dir: str = "", image_format: str = "jpeg") -> list[Job]:
    """Splits task x init-state episodes into jobs of at most `per_job` episodes of one task."""
    spec = get_suite(suite)
    task_ids = list(task_ids)
    bad_tasks = [t for t in task_ids if not 0 <= t < spec.num_tasks]
    bad_inits = [i for i in init_indices if not 0 <= i < 50]
    if bad_tasks or bad_inits or per_job < 1:
        raise ValueError(f"task ids must be in [0, {spec.num_tasks - 1}] (got {bad_tasks}), init indices in "
                         f"[0, 49] (got {bad_inits}), per_job >= 1 (got {per_job})")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return [
        Job(suite, t, tuple(init_indices[k:k + per_job]), config, out_dir, image_format)
        for t in task_ids for k in range(0, len(init_indices), per_job)
    ]


def run_jobs(jobs: Sequence[Job], workers: int, on_outcome=None) -> list[Outcome]:
    """Runs `jobs` in this process (workers == 1) or in `workers` spawned processes; calls on_outcome(outcome)
    as results arrive (in the calling process)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = sum(len(j.init_indices) for j in jobs)
    outcomes = []
    with tqdm(total=total, desc="episodes", unit="ep") as progress:
        def take(results: list[Outcome]) -> None:
            for outcome in results:
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                progress.update(1)
            progress.set_postfix(success=f"{sum(o.success for o in outcomes)}/{len(outcomes)}")

        if workers == 1:
            for job in jobs:
                take(run_job(job))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for future in as_completed([pool.submit(run_job, job) for job in jobs]):
                    take(future.result())
    return sorted(outcomes, key=lambda o: (o.task_id, o.init_index))


def collect_demos(suite: str, task_ids: Iterable[int], init_indices: Sequence[int], out_dir: str | os.PathLike,
                  workers: int = 1, per_job: int = 5, image_format: str = "jpeg",
                  config: ExpertConfig = ExpertConfig()) -> dict:
    """Collects expert demos of the given tasks x init states into `out_dir`, skipping the episodes its
    `attempts.json` records as tried, then rewrites `dataset_statistics.json` from all its episodes.
    Returns {"attempts": {key: "success" | "failure"}, "statistics": {suite: ...}}."""
    out_dir = Path(out_dir)
    attempts_path = out_dir / ATTEMPTS_FILE
    attempts = json.loads(attempts_path.read_text()) if attempts_path.exists() else {}
    jobs = [
        job
        for task_id in task_ids
        for job in make_jobs(suite, [task_id], [i for i in init_indices if episode_key(task_id, i) not in attempts],
                             per_job, config, str(out_dir), image_format)
    ]

    def remember(outcome: Outcome) -> None:
        attempts[episode_key(outcome.task_id, outcome.init_index)] = "success" if outcome.success else "failure"
        write_json(attempts_path, dict(sorted(attempts.items())))

    run_jobs(jobs, workers, remember)
    return {"attempts": attempts, "statistics": write_dataset_statistics(out_dir)}


def measure_expert(suite: str, task_ids: Iterable[int], init_indices: Sequence[int], workers: int = 1,
                   per_job: int = 5, config: ExpertConfig = ExpertConfig()) -> dict:
    """Success of the expert (no cameras) on tasks x init states, under the suite's step limit: per task
    successes / trials and the failed init states, totals and the mean number of steps."""
    task_ids = list(task_ids)
    outcomes = run_jobs(make_jobs(suite, task_ids, init_indices, per_job, config), workers)
    tasks = load_tasks(suite)
    per_task = {}
    for task_id in task_ids:
        mine = [o for o in outcomes if o.task_id == task_id]
        per_task[str(task_id)] = {
            "instruction": tasks[task_id].language,
            "successes": sum(o.success for o in mine),
            "trials": len(mine),
            "failed_init_indices": [o.init_index for o in mine if not o.success],
        }
    successes = sum(o.success for o in outcomes)
    return {
        "suite": suite,
        "max_steps": get_suite(suite).max_steps,
        "init_indices": list(init_indices),
        "tasks": per_task,
        "successes": successes,
        "trials": len(outcomes),
        "success_rate": successes / len(outcomes),
        "mean_steps_success": float(np.mean([o.steps for o in outcomes if o.success])) if successes else None,
        "episode_seconds": float(np.mean([o.seconds for o in outcomes])),
    }


@dataclass
class LiberoDemo:
    """One demonstration of an official LIBERO HDF5 file."""

    index: int
    """N of its group data/demo_N."""
    actions: np.ndarray
    """float64 [T,7] actions in the LIBERO env convention (gripper -1 = open, +1 = close)."""
    first_state: np.ndarray
    """float64 [D] flattened MuJoCo state the demo starts from (states[0])."""


def read_libero_hdf5(path: str | os.PathLike) -> tuple[str, list[LiberoDemo]]:
    """(language instruction from data.attrs["problem_info"], demos by number) of an official LIBERO demo file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LIBERO demo file {path} not found")
    with h5py.File(path, "r") as file:
        if "data" not in file or "problem_info" not in file["data"].attrs:
            raise ValueError(f"{path} is not a LIBERO demo file: expected a 'data' group with a problem_info attribute")
        data = file["data"]
        instruction = "".join(json.loads(data.attrs["problem_info"])["language_instruction"]).strip('"')
        names = sorted((name for name in data if name.startswith("demo_")), key=lambda name: int(name[5:]))
        demos = []
        for name in names:
            actions, states = data[name]["actions"][()], data[name]["states"][()]
            if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) == 0 or len(states) == 0:
                raise ValueError(f"{path}: {name} must hold actions [T, 7] and states [T, D], got "
                                 f"{actions.shape} and {states.shape}")
            demos.append(LiberoDemo(int(name[5:]), actions.astype(np.float64), states[0].astype(np.float64)))
    if not demos:
        raise ValueError(f"{path} holds no data/demo_N groups")
    return instruction, demos


def task_of_file(path: str | os.PathLike, instruction: str, tasks: Sequence, suite: str) -> int:
    """The task a LIBERO demo file belongs to: by its name (<task name>_demo.hdf5, the task name being its BDDL
    file's), else by its instruction."""
    by_name = {Path(task.bddl_file).stem: index for index, task in enumerate(tasks)}
    by_instruction = {task.language.strip(): index for index, task in enumerate(tasks)}
    task_id = by_name.get(Path(path).stem.removesuffix("_demo"), by_instruction.get(instruction.strip()))
    if task_id is None:
        raise ValueError(f"{path}: neither its name nor its instruction {instruction!r} is a task of {suite}; "
                         f"pass the suite it belongs to (--suite)")
    return task_id


def replay_demo(env, demo: LiberoDemo) -> tuple[list[dict], np.ndarray, bool]:
    """Replays `demo` in `env` (built with cameras) as OpenVLA's regenerate_libero_dataset does, after the reset
    of evaluation (reset, first state, NUM_WAIT_STEPS wait steps): no-op actions are skipped, not executed.
    Returns (the observation each kept action was taken at, the kept env-convention actions [K,7], whether the
    env reported success at the last step)."""
    obs = start_episode(env, demo.first_state, REPLAY_SCENE_SEED)
    kept = demo.actions[~noop_mask(demo.actions)]
    observations, done = [], False
    for action in kept:
        observations.append(obs)
        obs, _, done, _ = env.step(action.tolist())
    return observations, kept, bool(done)


def replay_libero_demos(paths: Sequence[str | os.PathLike], suite: str, out_dir: str | os.PathLike,
                        max_demos: int = 0, image_format: str = "jpeg") -> dict:
    """Replays the demos of official LIBERO HDF5 files (one task each, see `task_of_file`) into
    the demo directory `out_dir`, skipping those its attempts.json records as tried, then rewrites
    dataset_statistics.json. `max_demos` > 0 keeps only the first demos of each file.
    Returns {"attempts": {key: "success" | "failure"}, "statistics": {suite: ...}}."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    tasks = load_tasks(suite)
    files = []
    for path in paths:
        instruction, demos = read_libero_hdf5(path)
        files.append((task_of_file(path, instruction, tasks, suite), demos[:max_demos] if max_demos > 0 else demos))
    out_dir = Path(out_dir)
    attempts_path = out_dir / ATTEMPTS_FILE
    attempts = json.loads(attempts_path.read_text()) if attempts_path.exists() else {}
    pending = [(task_id, [d for d in demos if replayed_key(task_id, d.index) not in attempts])
               for task_id, demos in files]
    with tqdm(total=sum(len(demos) for _, demos in pending), desc="replays", unit="demo") as progress:
        for task_id, demos in pending:
            if not demos:
                continue
            env = make_env(tasks[task_id].bddl_file, cameras=True)
            try:
                for demo in demos:
                    observations, actions, success = replay_demo(env, demo)
                    key = replayed_key(task_id, demo.index)
                    if success:
                        episode = episode_from_observations(suite, task_id, demo.index, tasks[task_id].language,
                                                            observations, to_dataset_actions(actions))
                        save_episode(out_dir / EPISODES_DIR / f"{key}.npz", episode, image_format)
                    attempts[key] = "success" if success else "failure"
                    write_json(attempts_path, dict(sorted(attempts.items())))
                    progress.update(1)
            finally:
                env.close()
    return {"attempts": attempts, "statistics": write_dataset_statistics(out_dir)}
