"""libero_env against the real LIBERO simulator (MUJOCO_GL=egl). About 5 env steps/s on 2 CPU cores, and a few
seconds per scene build and reset, so step counts stay tiny; max_steps is lowered to reach time limits quickly."""

import gc
import os
import signal
import time

import numpy as np
import pytest

from libero_env import SUITES, EpisodeSpec, LiberoVectorEnv, center_crop, jpeg_round_trip, lanczos_resize
from libero_env._worker import WORKER_TIMES

pytestmark = pytest.mark.libero


def open_gripper_actions(num_envs: int, chunk: int) -> np.ndarray:
    """Zero motion, gripper open (dataset convention: 1 = open)."""
    actions = np.zeros((num_envs, chunk, 7))
    actions[..., 6] = 1.0
    return actions


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_suite_resets_and_steps(suite):
    wrist = suite != "libero_90"  # one suite without the wrist camera covers that path
    last_task = SUITES[suite].num_tasks - 1
    with LiberoVectorEnv(suite, num_envs=1, wrist=wrist, max_steps=2) as env:
        obs = env.reset([EpisodeSpec(task_id=last_task, init_index=49)])
        assert obs.agentview.shape == (1, 224, 224, 3) and obs.agentview.dtype == np.uint8
        assert obs.agentview.std() > 5  # a rendered scene, not a blank frame
        if wrist:
            assert obs.wrist.shape == (1, 224, 224, 3) and obs.wrist.dtype == np.uint8
        else:
            assert obs.wrist is None
        assert obs.instructions == [env.instruction(last_task)]
        assert obs.proprio.shape == (1, 8) and obs.proprio.dtype == np.float32
        left_finger, right_finger = obs.proprio[0, 6:]
        assert 0 < left_finger < 0.05 and abs(left_finger + right_finger) < 1e-2

        result = env.step(open_gripper_actions(1, 1)[:, 0])
        assert result.steps.tolist() == [1] and not result.done[0] and not result.lost[0]
        result = env.step(open_gripper_actions(1, 3))  # chunk of 3 with 1 step left: stops at the time limit
        assert result.steps.tolist() == [2] and result.done[0] and not result.success[0] and not result.lost[0]


def test_worker_renders_once_per_chunk_what_the_camera_observables_show_and_plays_the_reference_episode():
    """The worker disables robosuite's camera observables and renders after the chunk itself: its images must be what
    robosuite's camera sensors give at that state. It also keeps its simulator across resets, where LIBERO's
    reference env rebuilds it from the scene XML (hard_reset): with the same scene seed, the reference env must play
    the same episode, state for state, even after the worker's previous episode closed the gripper."""
    from libero.libero.envs import OffScreenRenderEnv

    from libero_env._worker import AGENTVIEW, WRIST, _Simulator
    from libero_env.processing import preprocess_image
    from libero_env.suites import load_tasks, start_episode

    task = load_tasks("libero_spatial")[0]
    chunk = np.array([[0.3, -0.2, 0.1, 0.0, 0.0, 0.0, -1.0]] * 3)
    grip = np.array([[0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 1.0]] * 4)
    simulator = _Simulator(wrist=True, resolution=256)
    try:
        for init_index in (3, 4):  # a reset must keep the cameras switched off
            simulator.reset(task.bddl_file, task.init_states[init_index], scene_seed=11, record=False)
            assert not {"agentview_image", "robot0_eye_in_hand_image"} & set(simulator.env.env.observation_spec())
            if init_index == 3:
                simulator.step(grip, record=False)
        answer = simulator.step(chunk, record=False)
        assert answer["executed"] == 3
        state = simulator.env.get_sim_state()
        # robosuite's own camera sensors, switched back on and sampled at this very moment (no forward(): after a
        # step both see the kinematics of the last substep) in the same GL context (another context's images
        # differ in anti-aliased edges)
        for camera in (AGENTVIEW, WRIST):
            simulator.env.env.modify_observable(f"{camera}_image", "enabled", True)
        obs = simulator.env.env._get_observations(force_update=True)
        np.testing.assert_array_equal(answer["agentview"], preprocess_image(obs["agentview_image"]))
        np.testing.assert_array_equal(answer["wrist"], preprocess_image(obs["robot0_eye_in_hand_image"]))
    finally:
        simulator.close()
    reference = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=256, camera_widths=256,
                                   camera_names=[AGENTVIEW, WRIST])
    try:
        assert reference.env.hard_reset  # LIBERO's default, as in the reference eval
        start_episode(reference, task.init_states[4], seed=11)
        for action in chunk:
            reference.step(action.tolist())
        np.testing.assert_array_equal(state, reference.get_sim_state())
    finally:
        reference.close()


@pytest.fixture(scope="module")
def env():
    with LiberoVectorEnv("libero_spatial", num_envs=2, max_steps=5, start_method="forkserver") as vector_env:
        yield vector_env


def test_same_spec_gives_same_observation_and_video_frames_match_pipeline(env):
    obs = env.reset([EpisodeSpec(0, 7, record_video=True), EpisodeSpec(0, 7)])
    np.testing.assert_array_equal(obs.agentview[0], obs.agentview[1])
    np.testing.assert_array_equal(obs.wrist[0], obs.wrist[1])
    np.testing.assert_array_equal(obs.proprio[0], obs.proprio[1])
    frames = env.frames(0)
    assert len(frames) == 1 and frames[0].shape == (256, 256, 3) and frames[0].dtype == np.uint8
    assert env.frames(1) == []
    # the recorded frame is the upright raw render the policy image was made from
    np.testing.assert_array_equal(center_crop(lanczos_resize(jpeg_round_trip(frames[0]))), obs.agentview[0])


def test_a_scene_is_the_same_after_any_history_and_another_scene_moves_the_fixtures(env):
    env.reset([EpisodeSpec(0, 1), EpisodeSpec(0, 2, scene=5)])
    env.step(open_gripper_actions(2, 3))
    obs = env.reset([EpisodeSpec(0, 7, scene=3), EpisodeSpec(0, 7, scene=3)])
    np.testing.assert_array_equal(obs.agentview[0], obs.agentview[1])
    np.testing.assert_array_equal(obs.wrist[0], obs.wrist[1])
    np.testing.assert_array_equal(obs.proprio[0], obs.proprio[1])
    other = env.reset([EpisodeSpec(0, 7, scene=4)], envs=[0])
    assert not np.array_equal(other.agentview[0], obs.agentview[0])


def test_chunks_time_limit_and_finished_envs_stay_put(env):
    env.reset([EpisodeSpec(0, 1, record_video=True), EpisodeSpec(0, 2)])
    result = env.step(open_gripper_actions(2, 3))
    assert result.steps.tolist() == [3, 3] and not result.done.any()
    assert len(env.frames(0)) == 4
    result = env.step(open_gripper_actions(2, 3))
    assert result.steps.tolist() == [5, 5] and result.done.all() and not result.success.any()
    assert len(env.frames(0)) == 6
    again = env.step(open_gripper_actions(2, 3))
    assert again.steps.tolist() == [5, 5] and len(env.frames(0)) == 6
    np.testing.assert_array_equal(again.obs.agentview, result.obs.agentview)


def test_workers_report_where_their_time_went(env):
    env.reset([EpisodeSpec(0, 3), EpisodeSpec(0, 4)])
    before = dict(env.worker_seconds)
    started = time.perf_counter()
    env.step(open_gripper_actions(2, 3))
    wall = time.perf_counter() - started
    spent = {part: env.worker_seconds[part] - seconds for part, seconds in before.items()}
    assert set(spent) == set(WORKER_TIMES) and spent["build"] == 0  # a step never builds a scene
    assert spent["physics"] > 0 and spent["render"] > 0 and spent["preprocess"] > 0 and spent["cpu"] > 0
    # the parts are timed inside each answer, and both workers answered within the parent's wait
    assert spent["physics"] + spent["render"] + spent["preprocess"] <= spent["answer"] <= 2 * wall


def test_reset_of_some_envs_leaves_the_others_running(env):
    first = env.reset([EpisodeSpec(0, 1), EpisodeSpec(0, 2)])
    env.step(open_gripper_actions(2, 3))
    result = env.step(open_gripper_actions(2, 2))
    assert result.done.all()
    obs = env.reset([EpisodeSpec(0, 2, record_video=True)], envs=[0])
    np.testing.assert_array_equal(obs.proprio[0], first.proprio[1])  # env 0 at env 1's first init state
    np.testing.assert_array_equal(obs.agentview[1], result.obs.agentview[1])  # env 1 is left as it was
    np.testing.assert_array_equal(obs.proprio[1], result.obs.proprio[1])
    with pytest.raises(ValueError, match=r"envs must be distinct indices in \[0, 1\], got \[2\]"):
        env.reset([EpisodeSpec(0, 0)], envs=[2])

    # env 1 resets in the background while env 0 steps; step() reports it once its reset is done
    assert env.reset([EpisodeSpec(0, 1)], envs=[1], wait=False) is None
    with pytest.raises(RuntimeError, match=r"env\(s\) \[1\] are still resetting"):
        env.reset([EpisodeSpec(0, 3)], envs=[1])
    results = [env.step(open_gripper_actions(2, 3)) for _ in range(3)]  # env 0 ends in the second call
    assert [r.steps[0] for r in results] == [3, 5, 5] and len(env.frames(0)) == 6
    started = [r.started[1] for r in results]
    assert started.count(True) == 1 and not any(r.started[0] for r in results)
    at = results[started.index(True)]
    assert at.steps[1] == 0 and not at.done[1]
    np.testing.assert_array_equal(at.obs.proprio[1], first.proprio[0])  # init state 1, as env 0 had it

    # a waiting reset of env 0 leaves env 1's background reset for step() to report, even if it finished meanwhile
    env.reset([EpisodeSpec(0, 3)], envs=[1], wait=False)
    env.reset([EpisodeSpec(0, 4)], envs=[0])
    reports = [env.step(open_gripper_actions(2, 1)).started for _ in range(6)]  # env 0 ends in the fifth call
    assert [r[1] for r in reports].count(True) == 1 and not any(r[0] for r in reports)


def test_a_scene_built_ahead_spares_the_reset_its_build_and_plays_the_same_episode(env):
    env.reset([EpisodeSpec(0, 1), EpisodeSpec(0, 2)])
    with pytest.raises(RuntimeError, match=r"env\(s\) \[0, 1\] are playing or starting an episode"):
        env.build_scenes([1, 1])
    env.step(open_gripper_actions(2, 5))  # both reach the time limit
    with pytest.raises(ValueError, match="expected 2, got 1"):
        env.build_scenes([1])
    with pytest.raises(ValueError, match=r"task_id must be in \[0, 9\] for libero_spatial, got 10"):
        env.build_scenes([10, None])
    builds = env.worker_seconds["build"]
    env.build_scenes([1, None])  # env 0 builds task 1's scene while env 1 resets to it, building at its reset
    started = time.perf_counter()
    at_reset = env.reset([EpisodeSpec(1, 3)], envs=[1])
    building_reset = time.perf_counter() - started
    started = time.perf_counter()
    ahead = env.reset([EpisodeSpec(1, 3)], envs=[0])
    kept_reset = time.perf_counter() - started
    assert kept_reset < building_reset / 2 and env.worker_seconds["build"] > builds
    np.testing.assert_array_equal(ahead.agentview[0], at_reset.agentview[1])
    np.testing.assert_array_equal(ahead.wrist[0], at_reset.wrist[1])
    np.testing.assert_array_equal(ahead.proprio[0], at_reset.proprio[1])

    env.step(open_gripper_actions(2, 5))
    victim, lost_resets = env.worker_pids[1], env.lost_resets
    env.build_scenes([None, 0])
    os.kill(victim, signal.SIGKILL)  # dies building: a fresh worker builds at the reset, no episode is lost
    obs = env.reset([EpisodeSpec(0, 1), EpisodeSpec(0, 1)])
    assert env.worker_pids[1] != victim and not is_running(victim) and env.lost_resets == lost_resets
    np.testing.assert_array_equal(obs.agentview[0], obs.agentview[1])


def test_bad_inputs_raise_and_never_reach_the_simulator(env):
    with pytest.raises(ValueError, match=r"task_id must be in \[0, 9\] for libero_spatial, got 10"):
        env.reset([EpisodeSpec(10, 0), EpisodeSpec(0, 0)])
    with pytest.raises(ValueError, match=r"init_index must be in \[0, 49\], got 50"):
        env.reset([EpisodeSpec(0, 50), EpisodeSpec(0, 0)])
    with pytest.raises(ValueError, match="expected 2, got 1"):
        env.reset([EpisodeSpec(0, 0)])
    with pytest.raises(ValueError, match=r"task_id must be in \[0, 9\]"):
        env.instruction(-1)

    env.reset([EpisodeSpec(0, 3), EpisodeSpec(0, 4)])
    for shape in [(2, 6), (3, 7), (2, 0, 7), (2, 1, 1, 7)]:
        with pytest.raises(ValueError, match=r"actions must have shape \[2, 7\] or \[2, K, 7\]"):
            env.step(np.zeros(shape))
    for bad in [np.nan, np.inf]:
        actions = open_gripper_actions(2, 2)
        actions[1, 1, 0] = bad
        with pytest.raises(ValueError, match=r"non-finite actions \(NaN or inf\) for env\(s\) \[1\]"):
            env.step(actions)
    result = env.step(open_gripper_actions(2, 1)[:, 0])
    assert result.steps.tolist() == [1, 1]  # the rejected calls moved nothing


def test_killed_or_hung_worker_is_replaced_and_its_episode_lost(env):
    env.reset([EpisodeSpec(0, 5), EpisodeSpec(0, 6)])
    env.step(open_gripper_actions(2, 1))
    victim = env.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    result = env.step(open_gripper_actions(2, 1))
    assert result.lost.tolist() == [True, False]
    assert result.done.tolist() == [True, False] and not result.success.any()
    assert result.steps.tolist() == [1, 2]
    assert env.worker_pids[0] != victim and not is_running(victim)
    result = env.step(open_gripper_actions(2, 1))
    assert result.steps.tolist() == [1, 3] and result.lost.tolist() == [True, False]

    idle_victim = env.worker_pids[1]
    lost_resets = env.lost_resets  # a lost step is not a lost reset
    os.kill(idle_victim, signal.SIGKILL)  # dies between episodes: reset retries it on a fresh worker
    obs = env.reset([EpisodeSpec(0, 5), EpisodeSpec(0, 6)])  # env 0's re-run, on its new worker
    assert obs.agentview.std() > 5 and env.worker_pids[1] != idle_victim
    assert env.lost_resets == lost_resets + 1  # the trainer logs it as rollout/lost_resets
    result = env.step(open_gripper_actions(2, 1))
    assert result.steps.tolist() == [1, 1] and not result.lost.any() and not result.done.any()

    frozen = env.worker_pids[0]
    os.kill(frozen, signal.SIGSTOP)  # a hung worker: no answer within timeout_s
    patience = env.timeout_s
    env.timeout_s = 3.0
    try:
        result = env.step(open_gripper_actions(2, 1))
    finally:
        env.timeout_s = patience
    assert result.lost.tolist() == [True, False] and result.steps.tolist() == [1, 2]
    assert not is_running(frozen)


def test_steps_sent_to_some_envs_and_a_worker_lost_while_the_others_answer(env):
    """send_step / receive_step by env subset, as play_episodes overlaps two halves of the envs."""
    env.reset([EpisodeSpec(0, 5), EpisodeSpec(0, 6)])
    victim = env.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    env.send_step(open_gripper_actions(1, 2), envs=[0])
    env.send_step(open_gripper_actions(1, 1), envs=[1])
    with pytest.raises(RuntimeError, match=r"env\(s\) \[1\] have a step in flight: receive_step\(\) them first"):
        env.reset([EpisodeSpec(0, 3)], envs=[1])
    first = env.receive_step([0])
    assert first.steps.tolist() == [2, 0] and not first.lost.any() and not first.done.any()
    second = env.receive_step([1])
    assert second.lost.tolist() == [False, True] and second.done.tolist() == [False, True]
    assert env.worker_pids[1] != victim and not is_running(victim)

    # env 1's background reset is reported by a receive_step that names it, not by env 0's
    env.reset([EpisodeSpec(0, 7)], envs=[1], wait=False)
    for steps in (3, 4):
        env.send_step(open_gripper_actions(1, 1), envs=[0])
        result = env.receive_step([0])
        assert result.steps[0] == steps and not result.started.any()
    result = env.receive_step([1])  # nothing was sent: it waits for the reset
    assert result.started.tolist() == [False, True] and result.steps[1] == 0 and not result.lost[1]


def test_close_and_garbage_collection_leave_no_processes():
    env = LiberoVectorEnv("libero_goal", num_envs=2)
    pids = env.worker_pids
    env.close()
    env.close()
    assert not any(is_running(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset([EpisodeSpec(0, 0), EpisodeSpec(0, 1)])

    forgotten = LiberoVectorEnv("libero_goal", num_envs=1)
    pids = forgotten.worker_pids
    del forgotten
    gc.collect()
    assert not any(is_running(pid) for pid in pids)
