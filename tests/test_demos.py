"""Demo files and statistics: no-op filtering and statistics by hand, the on-disk format round trip; official
LIBERO demonstration files read and replayed."""

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from libero_env.demos import (
    EPISODES_DIR,
    STATISTICS_FILE,
    Episode,
    dataset_statistics,
    episode_key,
    episode_paths,
    REPLAY_SCENE_SEED,
    LiberoDemo,
    load_episode,
    noop_mask,
    read_libero_hdf5,
    replay_demo,
    replay_libero_demos,
    save_episode,
    task_of_file,
    write_dataset_statistics,
)
from libero_env.processing import to_dataset_actions, to_env_actions
from libero_env.suites import NUM_WAIT_STEPS, WAIT_ACTION, load_tasks
from libero_hdf5_writer import write_libero_hdf5


def test_noop_mask_by_hand():
    actions = np.zeros((6, 7), np.float32)
    actions[:3, 6] = 1.0          # open, open, open, then closed
    actions[1, 0] = 0.5           # a real move
    actions[4, 0] = 5e-5          # below the 1e-4 threshold
    actions[5, 1] = 2e-4          # above it
    # 0: still, first action -> dropped. 1: moves -> kept. 2: still, gripper as kept 1 -> dropped.
    # 3: still but the gripper closes -> kept. 4: still, gripper as kept 3 -> dropped. 5: moves -> kept.
    assert noop_mask(actions).tolist() == [True, False, True, False, True, False]


def test_noop_mask_compares_with_the_last_kept_action():
    actions = np.zeros((3, 7), np.float32)
    actions[0, 0], actions[0, 6] = 1.0, 1.0   # kept, open
    actions[1, 6] = 0.0                        # still, gripper closes -> kept
    actions[2, 6] = 0.0                        # still, same as kept 1 -> dropped
    assert noop_mask(actions).tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"\[T, 7\]"):
        noop_mask(np.zeros((3, 6)))


def test_dataset_statistics_by_hand():
    ramp = np.arange(101) / 100.0                          # 0, 0.01, ..., 1
    actions = np.zeros((101, 7))
    actions[:, 0] = ramp
    actions[:, 1] = -0.5
    actions[:, 6] = ramp >= 0.5                            # 50 closed (0), then 51 open (1)
    proprio = np.tile(np.arange(8.0), (101, 1))
    proprio[:, 0] = 2 * ramp
    stats = dataset_statistics([actions[:60], actions[60:]], [proprio[:60], proprio[60:]])

    action = stats["action"]
    # Ramp 0..1 in 101 steps: mean 0.5; population variance sum((i-50)^2)/101 / 100^2 = 85850/101/1e4 = 0.085;
    # linear quantiles at (101-1)*0.01 = index 1 and index 99.
    np.testing.assert_allclose(action["mean"][:2], [0.5, -0.5])
    np.testing.assert_allclose(action["std"][:2], [np.sqrt(0.085), 0.0])
    np.testing.assert_allclose(action["q01"][0], 0.01)
    np.testing.assert_allclose(action["q99"][0], 0.99)
    assert action["min"][0] == 0.0 and action["max"][0] == 1.0
    np.testing.assert_allclose(action["mean"][6], 51 / 101)
    assert action["q01"][6] == 0.0 and action["q99"][6] == 1.0
    assert action["mask"] == [True, True, True, True, True, True, False]
    np.testing.assert_allclose(stats["proprio"]["mean"], [1.0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_allclose(stats["proprio"]["q99"][0], 1.98)
    assert "mask" not in stats["proprio"]
    assert stats["num_transitions"] == 101 and stats["num_trajectories"] == 2
    assert set(action) == {"mean", "std", "max", "min", "q01", "q99", "mask"}


def make_episode(task_id: int, steps: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    # Smooth images (gradients plus an offset) so that JPEG's error stays small and bounded.
    ys, xs = np.mgrid[0:224, 0:224]
    base = np.stack([xs, ys, (xs + ys) // 2], axis=-1)
    images = np.stack([(base + 10 * t + seed) % 200 for t in range(steps)]).astype(np.uint8)
    return Episode(
        suite="libero_spatial", task_id=task_id, init_index=7 + seed, instruction="pick up the black bowl",
        agentview=images, wrist=images[:, ::-1].copy(),
        proprio=rng.normal(size=(steps, 8)).astype(np.float32),
        actions=rng.uniform(-1, 1, (steps, 7)).astype(np.float32),
    )


def test_episode_round_trip_png_is_exact(tmp_path):
    episode = make_episode(task_id=3, steps=4, seed=0)
    path = tmp_path / "episode.npz"
    save_episode(path, episode, image_format="png")
    loaded = load_episode(path)
    assert (loaded.suite, loaded.task_id, loaded.init_index, loaded.instruction) == (
        "libero_spatial", 3, 7, "pick up the black bowl")
    for name in ("agentview", "wrist", "proprio", "actions"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(episode, name))
    assert loaded.agentview.dtype == np.uint8 and loaded.actions.dtype == np.float32
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert str(data["image_format"]) == "png" and data["agentview_offsets"].shape == (5,)


def test_episode_round_trip_jpeg_is_close(tmp_path):
    episode = make_episode(task_id=1, steps=3, seed=1)
    path = tmp_path / "episode.npz"
    save_episode(path, episode, image_format="jpeg")
    loaded = load_episode(path)
    np.testing.assert_array_equal(loaded.actions, episode.actions)
    np.testing.assert_array_equal(loaded.proprio, episode.proprio)
    assert loaded.agentview.shape == (3, 224, 224, 3)
    error = np.abs(loaded.agentview.astype(int) - episode.agentview.astype(int))
    assert error.mean() < 2.0
    assert load_episode(path, images=False).agentview.shape == (0, 224, 224, 3)


def test_save_episode_rejects_mismatched_arrays(tmp_path):
    episode = make_episode(task_id=0, steps=2, seed=0)
    episode.proprio = episode.proprio[:1]
    with pytest.raises(ValueError, match="proprio"):
        save_episode(tmp_path / "bad.npz", episode)
    with pytest.raises(ValueError, match="image_format"):
        save_episode(tmp_path / "bad.npz", make_episode(0, 2, 0), image_format="gif")


def test_statistics_file_in_openvla_layout(tmp_path):
    episodes = [make_episode(task_id=t, steps=2 + t, seed=t) for t in range(3)]
    for e in episodes:
        save_episode(tmp_path / EPISODES_DIR / f"{episode_key(e.task_id, e.init_index)}.npz", e, image_format="png")
    names = [p.name for p in episode_paths(tmp_path)]
    assert names == ["task00_init007.npz", "task01_init008.npz", "task02_init009.npz"]
    written = write_dataset_statistics(tmp_path)
    on_disk = json.loads((tmp_path / STATISTICS_FILE).read_text())
    assert on_disk == written
    assert list(on_disk) == ["libero_spatial"]
    expected = dataset_statistics([e.actions for e in episodes], [e.proprio for e in episodes])
    suite = on_disk["libero_spatial"]
    assert suite["num_transitions"] == 2 + 3 + 4 and suite["num_trajectories"] == 3
    np.testing.assert_allclose(suite["action"]["q99"], expected["action"]["q99"])
    with pytest.raises(FileNotFoundError, match="collect demos first"):
        write_dataset_statistics(tmp_path / "empty")


def test_to_dataset_actions_by_hand():
    env_actions = np.array([[0.5, 0, 0, 0, 0, 0, -1.0], [0, 0, 0, 0, 0, 0.25, 1.0], [0, 0, 0, 0, 0, 0, 0.3]])
    # gripper: clip to [0, 1], then 1 - g: -1 (open) -> 1, +1 (close) -> 0, 0.3 -> 0.7
    np.testing.assert_allclose(to_dataset_actions(env_actions)[:, 6], [1.0, 0.0, 0.7])
    np.testing.assert_array_equal(to_dataset_actions(env_actions)[:, :6], env_actions[:, :6])
    dataset = np.array([[0.1] * 6 + [1.0], [0.2] * 6 + [0.0]], np.float32)
    np.testing.assert_array_equal(to_dataset_actions(to_env_actions(dataset)), dataset)


def test_read_libero_hdf5(tmp_path):
    rng = np.random.default_rng(0)
    demos = [(rng.uniform(-1, 1, (4 + i, 7)), rng.normal(size=(4 + i, 9))) for i in range(3)]
    path = write_libero_hdf5(tmp_path / "PICK_demo.hdf5", "pick up the black bowl", "task.bddl", demos)
    instruction, read = read_libero_hdf5(path)
    assert instruction == "pick up the black bowl" and [d.index for d in read] == [0, 1, 2]
    for (actions, states), demo in zip(demos, read):
        np.testing.assert_array_equal(demo.actions, actions)
        np.testing.assert_array_equal(demo.first_state, states[0])
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as file:
        file.create_group("observations")
    with pytest.raises(ValueError, match="is not a LIBERO demo file: expected a 'data' group"):
        read_libero_hdf5(other)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_libero_hdf5(tmp_path / "missing.hdf5")


def test_task_of_file_by_name_then_instruction():
    tasks = load_tasks("libero_spatial")
    name = Path(tasks[3].bddl_file).stem
    assert task_of_file(f"/data/{name}_demo.hdf5", "", tasks, "libero_spatial") == 3
    assert task_of_file("/data/renamed.hdf5", f" {tasks[5].language} ", tasks, "libero_spatial") == 5
    with pytest.raises(ValueError, match="neither its name nor its instruction 'stack the cups' is a task of "
                                         "libero_spatial; pass the suite"):
        task_of_file("/data/renamed.hdf5", "stack the cups", tasks, "libero_spatial")


class ScriptedEnv:
    """Stands in for the LIBERO env: keeps the actions it is stepped with; reports success from the given step."""

    def __init__(self, success_from_step: int):
        self.success_from_step = success_from_step
        self.stepped: list[list[float]] = []
        self.state = None
        self.seeded = None
        self.env = SimpleNamespace(robots=[])  # start_episode resets the robots' gripper commands

    def seed(self, seed):
        self.seeded = seed

    def reset(self):
        self.stepped = []

    def set_init_state(self, state):
        self.state = state
        return {"steps": 0}

    def step(self, action):
        self.stepped.append(action)
        return {"steps": len(self.stepped)}, 0.0, len(self.stepped) >= self.success_from_step, {}


def test_replay_skips_noops_without_executing_them():
    actions = np.zeros((6, 7))
    actions[:, 6] = -1.0
    actions[1, 0] = 0.5           # 0: still, first -> skipped; 1: moves -> kept
    actions[2, 6] = 1.0           # 2: still, gripper closes -> kept; 3: still, same gripper as 2 -> skipped
    actions[3, 6] = 1.0
    actions[4, 6], actions[5, 2] = 1.0, 0.3   # 4: still, same gripper -> skipped; 5: moves -> kept
    demo = LiberoDemo(index=4, actions=actions, first_state=np.arange(3.0))
    env = ScriptedEnv(success_from_step=NUM_WAIT_STEPS + 3)
    observations, kept, success = replay_demo(env, demo)
    np.testing.assert_array_equal(kept, actions[[1, 2, 5]])
    assert env.stepped == [list(WAIT_ACTION)] * NUM_WAIT_STEPS + kept.tolist()
    assert [o["steps"] for o in observations] == [NUM_WAIT_STEPS, NUM_WAIT_STEPS + 1, NUM_WAIT_STEPS + 2]
    assert success and env.state.tolist() == [0.0, 1.0, 2.0] and env.seeded == REPLAY_SCENE_SEED
    assert not replay_demo(ScriptedEnv(success_from_step=NUM_WAIT_STEPS + 4), demo)[2]


@pytest.mark.slow
@pytest.mark.libero
def test_replay_official_layout_from_expert_episode(tmp_path):
    """An expert episode written as a LIBERO demo file (with no-ops added) replays into one kept episode whose
    actions are the expert's; its first five actions alone (a failed replay) are dropped."""
    from libero_env.expert import make_env, run_expert
    from libero_env.suites import get_suite, load_tasks

    task = load_tasks("libero_spatial")[0]
    env = make_env(task.bddl_file, cameras=False)
    try:
        # in the draw of fixtures the replay uses, as the expert that recorded an official demo stood in one
        run = run_expert(env, task.init_states[0], REPLAY_SCENE_SEED, get_suite("libero_spatial").max_steps)
    finally:
        env.close()
    assert run.settled
    expert_actions = run.actions[~noop_mask(run.actions)]
    env_actions = to_env_actions(run.actions)
    still = np.array([0.0] * 6 + [-1.0])
    with_noops = np.concatenate([[still, still], env_actions[:5], [env_actions[4] * [0, 0, 0, 0, 0, 0, 1]],
                                 env_actions[5:]])
    states = np.repeat(task.init_states[0][None], len(with_noops), axis=0)  # the replay reads states[0] only
    path = write_libero_hdf5(tmp_path / "task_demo.hdf5", task.language, task.bddl_file,
                             [(with_noops, states), (env_actions[:5], states[:5])])
    result = replay_libero_demos([path], "libero_spatial", tmp_path / "demos")
    assert result["attempts"] == {"task00_demo000": "success", "task00_demo001": "failure"}
    [episode_path] = episode_paths(tmp_path / "demos")
    episode = load_episode(episode_path)
    np.testing.assert_array_equal(episode.actions, expert_actions)
    assert episode.agentview.shape == episode.wrist.shape == (len(expert_actions), 224, 224, 3)
    assert (episode.task_id, episode.init_index, episode.instruction) == (0, 0, task.language)
    statistics = json.loads((tmp_path / "demos" / STATISTICS_FILE).read_text())["libero_spatial"]
    assert statistics["num_transitions"] == len(expert_actions) and statistics["num_trajectories"] == 1
