"""libero_env.toy: the interface of LiberoVectorEnv, determinism, and the success rule checked by hand."""

import itertools

import numpy as np
import pytest

from libero_env import EpisodeSpec, Observation, StepResult
from libero_env.toy import QUADRANTS, TASK_COLOURS, ToyVectorEnv


def push(signs: list[tuple[int, int]]) -> np.ndarray:
    """Actions [N, 7] whose first two dimensions have the given signs (the rest is arbitrary)."""
    actions = np.full((len(signs), 7), 0.3, dtype=np.float32)
    actions[:, :2] = 0.5 * np.asarray(signs, dtype=np.float32)
    return actions


def marker_signs(env: ToyVectorEnv, specs: list[EpisodeSpec]) -> list[tuple[int, int]]:
    return [tuple(np.sign(env.marker_position(s.task_id, s.init_index)).astype(int)) for s in specs]


def test_interface_shapes_and_dtypes():
    specs = [EpisodeSpec(task_id=t, init_index=i) for t, i in [(0, 0), (1, 5), (3, 49)]]
    with ToyVectorEnv(num_envs=3) as env:
        assert env.num_tasks == len(TASK_COLOURS) == 4
        assert env.max_steps == 4
        assert env.instruction(2) == "push toward the blue marker"
        obs = env.reset(specs)
        assert isinstance(obs, Observation)
        for image in (obs.agentview, obs.wrist):
            assert image.dtype == np.uint8 and image.shape == (3, 224, 224, 3)
        assert obs.proprio.dtype == np.float32 and obs.proprio.shape == (3, 8)
        assert obs.instructions == [env.instruction(s.task_id) for s in specs]
        res = env.step(np.zeros((3, 7), dtype=np.float32))
        assert isinstance(res, StepResult)
        for name, dtype in [("done", bool), ("success", bool), ("lost", bool)]:
            assert getattr(res, name).dtype == dtype and getattr(res, name).shape == (3,)
        assert np.issubdtype(res.steps.dtype, np.integer) and res.steps.tolist() == [1, 1, 1]
        assert not res.lost.any()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(specs)


def test_deterministic_per_instance_and_held_out_positions_differ():
    specs = [EpisodeSpec(task_id=1, init_index=7), EpisodeSpec(task_id=2, init_index=7)]
    first, second = ToyVectorEnv(num_envs=2), ToyVectorEnv(num_envs=2)
    obs_a, obs_b = first.reset(specs), second.reset(specs)
    assert np.array_equal(obs_a.agentview, obs_b.agentview) and np.array_equal(obs_a.wrist, obs_b.wrist)
    actions = push(marker_signs(first, specs))
    assert np.array_equal(first.step(actions).obs.agentview, second.step(actions).obs.agentview)
    # Re-resetting the same instance gives the start image again.
    assert np.array_equal(first.reset(specs).agentview, obs_a.agentview)
    positions = np.stack([first.marker_position(t, i) for t in range(4) for i in range(50)])
    assert len(np.unique(positions.round(6), axis=0)) == 200
    assert (np.abs(positions) >= 0.3).all() and (np.abs(positions) <= 0.7).all()
    assert not np.array_equal(ToyVectorEnv(1, seed=1).marker_position(1, 7), first.marker_position(1, 7))


def test_image_shows_the_marker_where_the_rule_says():
    env = ToyVectorEnv(num_envs=4)
    specs = [EpisodeSpec(task_id=t, init_index=i) for t, i in [(0, 0), (0, 1), (1, 1), (3, 2)]]
    obs = env.reset(specs)
    for k, spec in enumerate(specs):
        # quadrant (task + init) % 4: (0,0) -> (+,+), (0,1) -> (-,+), (1,1) -> (-,-), (3,2) -> (-,+)
        x, y = env.marker_position(spec.task_id, spec.init_index)
        assert (np.sign(x), np.sign(y)) == tuple(QUADRANTS[(spec.task_id + spec.init_index) % 4])
        colour = list(TASK_COLOURS.values())[spec.task_id]
        rows, cols = np.nonzero((obs.agentview[k] == colour).all(axis=-1))
        # pixel centre (col + 0.5, row + 0.5) <-> x = col / 112 - 1, y = 1 - row / 112
        assert (cols + 0.5).mean() / 112 - 1 == pytest.approx(x, abs=0.01)
        assert 1 - (rows + 0.5).mean() / 112 == pytest.approx(y, abs=0.01)
    assert [tuple(QUADRANTS[(t + i) % 4]) for t, i in [(0, 0), (0, 1), (1, 1), (3, 2)]] == [
        (1, 1), (-1, 1), (-1, -1), (-1, 1)]


def test_success_rule_by_hand():
    specs = [EpisodeSpec(task_id=0, init_index=i) for i in range(5)]
    env = ToyVectorEnv(num_envs=5)
    env.reset(specs)
    right = marker_signs(env, specs)
    wrong = [(-sx, sy) for sx, sy in right]  # one axis wrong is a wrong push
    zero = [(0, sy) for _, sy in right]  # sign 0 is never correct
    # env 0: R R -> success at 2; env 1: W W W W -> fail at 4; env 2: R W W R -> success at 4;
    # env 3: R W W W -> fail at 4; env 4: 0 R 0 R -> success at 4
    plan = ["RR..", "WWWW", "RWWR", "RWWW", "0R0R"]
    expected = [
        ([False] * 5, [False] * 5, [1, 1, 1, 1, 1]),
        ([True, False, False, False, False], [True, False, False, False, False], [2, 2, 2, 2, 2]),
        ([True, False, False, False, False], [True, False, False, False, False], [2, 3, 3, 3, 3]),
        ([True, True, True, True, True], [True, False, True, False, True], [2, 4, 4, 4, 4]),
    ]
    choice = {"R": right, "W": wrong, "0": zero, ".": right}
    for step, (done, success, steps) in enumerate(expected):
        res = env.step(push([choice[plan[k][step]][k] for k in range(5)]))
        assert res.done.tolist() == done and res.success.tolist() == success and res.steps.tolist() == steps
    # Finished envs ignore further actions.
    res = env.step(push(right))
    assert res.steps.tolist() == [2, 4, 4, 4, 4] and res.success.tolist() == [True, False, True, False, True]


def test_cursor_moves_only_on_correct_pushes():
    env = ToyVectorEnv(num_envs=2)
    specs = [EpisodeSpec(task_id=2, init_index=3), EpisodeSpec(task_id=2, init_index=3)]
    obs = env.reset(specs)
    assert (obs.proprio == 0).all()
    right = marker_signs(env, specs)[0]
    res = env.step(push([right, (-right[0], -right[1])]))
    marker = env.marker_position(2, 3)
    assert np.allclose(res.obs.proprio[0, :2], marker / 2) and (res.obs.proprio[0, 2:] == 0).all()
    assert (res.obs.proprio[1] == 0).all()
    assert not np.array_equal(res.obs.agentview[0], obs.agentview[0])
    assert np.array_equal(res.obs.agentview[1], obs.agentview[1])


def test_chunks_run_action_by_action_and_stop_at_the_end():
    env = ToyVectorEnv(num_envs=2)
    specs = [EpisodeSpec(task_id=1, init_index=0), EpisodeSpec(task_id=1, init_index=1)]
    env.reset(specs)
    right = marker_signs(env, specs)
    chunk = np.stack([push([right[0], (-right[1][0], right[1][1])])] * 8, axis=1)  # [2, 8, 7]
    res = env.step(chunk)
    assert res.steps.tolist() == [2, 4] and res.success.tolist() == [True, False] and res.done.all()


def test_random_and_constant_policies_by_enumeration():
    # Every sequence of 4 pushes out of 4 directions, from one instance: 67 of 256 reach 2 correct pushes,
    # 1 - (3/4)^4 - 4 (1/4) (3/4)^3 = 67/256.
    directions = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    sequences = list(itertools.product(directions, repeat=4))
    env = ToyVectorEnv(num_envs=len(sequences))
    env.reset([EpisodeSpec(task_id=0, init_index=0)] * len(sequences))
    for step in range(4):
        res = env.step(push([sequence[step] for sequence in sequences]))
    assert res.done.all() and res.success.sum() == 67
    # A constant push succeeds on exactly one quadrant: 4 of the 16 instances (4 tasks x 4 init indices).
    specs = [EpisodeSpec(task_id=t, init_index=i) for t in range(4) for i in range(4)]
    env = ToyVectorEnv(num_envs=16)
    for direction in directions:
        env.reset(specs)
        for _ in range(4):
            res = env.step(push([direction] * 16))
        assert res.success.sum() == 4


def test_video_frames_only_when_recorded():
    env = ToyVectorEnv(num_envs=2)
    specs = [EpisodeSpec(task_id=0, init_index=0, record_video=True), EpisodeSpec(task_id=0, init_index=1)]
    obs = env.reset(specs)
    res = env.step(push(marker_signs(env, specs)))
    res = env.step(push(marker_signs(env, specs)))
    frames = env.frames(0)
    assert len(frames) == 3 and all(f.shape == (224, 224, 3) and f.dtype == np.uint8 for f in frames)
    assert np.array_equal(frames[0], obs.agentview[0]) and np.array_equal(frames[-1], res.obs.agentview[0])
    assert env.frames(1) == []
    with pytest.raises(ValueError, match="env index 2 out of range"):
        env.frames(2)


def test_reset_of_some_envs_leaves_the_others_running():
    env = ToyVectorEnv(num_envs=2, horizon=4)
    first = env.reset([EpisodeSpec(0, 0), EpisodeSpec(1, 0)])
    assert env.step(np.zeros((2, 7))).steps.tolist() == [1, 1]
    obs = env.reset([EpisodeSpec(2, 3, record_video=True)], envs=[1])
    assert obs.instructions == [first.instructions[0], env.instruction(2)]
    np.testing.assert_array_equal(obs.agentview[0], first.agentview[0])  # zero pushes: env 0 did not move
    result = env.step(np.zeros((2, 7)))
    assert result.steps.tolist() == [2, 1] and len(env.frames(1)) == 2 and env.frames(0) == []
    assert env.reset([EpisodeSpec(3, 0)], envs=[0], wait=False) is None  # starts at the next step call
    result = env.step(np.zeros((2, 7)))
    assert result.started.tolist() == [True, False] and result.steps.tolist() == [0, 2]
    assert env.step(np.zeros((2, 7))).steps.tolist() == [1, 3]
    never_reset = ToyVectorEnv(num_envs=3).reset([EpisodeSpec(0, 0)], envs=[2])
    assert never_reset.instructions[:2] == ["", ""]  # envs 0 and 1 have no episode yet
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 1\], got \[0, 0\]"):
        env.reset([EpisodeSpec(0, 0)] * 2, envs=[0, 0])
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 1\], got \[2\]"):
        env.reset([EpisodeSpec(0, 0)], envs=[2])
    with pytest.raises(ValueError, match="one EpisodeSpec per env it names: 1 envs, 2 specs"):
        env.reset([EpisodeSpec(0, 0)] * 2, envs=[0])


def test_bad_inputs_raise_clear_errors():
    env = ToyVectorEnv(num_envs=2)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros((2, 7)))
    with pytest.raises(ValueError, match=r"unknown task_id 4: valid task ids are 0..3"):
        env.reset([EpisodeSpec(task_id=4, init_index=0)] * 2)
    with pytest.raises(ValueError, match="unknown task_id -1"):
        env.instruction(-1)
    with pytest.raises(ValueError, match=r"init_index 50 out of range: valid init indices are 0..49"):
        env.reset([EpisodeSpec(task_id=0, init_index=50)] * 2)
    with pytest.raises(ValueError, match="one EpisodeSpec per env"):
        env.reset([EpisodeSpec(task_id=0, init_index=0)])
    with pytest.raises(ValueError, match="build_scenes needs a task \\(or None\\) per env: expected 2, got 1"):
        env.build_scenes([0])
    with pytest.raises(ValueError, match="unknown task_id 4"):
        env.build_scenes([None, 4])
    env.build_scenes([None, 3])  # the toy has no scenes to build: nothing changes
    env.reset([EpisodeSpec(task_id=0, init_index=0)] * 2)
    for shape in [(2, 6), (3, 7), (2, 8, 7, 1), (2, 0, 7), (7,)]:
        with pytest.raises(ValueError, match="actions must have shape"):
            env.step(np.zeros(shape, dtype=np.float32))
    actions = np.zeros((2, 8, 7), dtype=np.float32)
    actions[1, 3, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(envs \[1\]\)"):
        env.step(actions)
    assert env.step(np.zeros((2, 7))).steps.tolist() == [1, 1]  # the rejected call stepped nothing
    with pytest.raises(ValueError, match="pushes_to_goal"):
        ToyVectorEnv(num_envs=2, horizon=2, pushes_to_goal=3)
    with pytest.raises(ValueError, match="num_envs"):
        ToyVectorEnv(num_envs=0)


def test_steps_sent_by_halves_equal_one_step_and_a_start_is_reported_by_its_half():
    specs = [EpisodeSpec(task, 0) for task in range(3)]
    whole, halves = ToyVectorEnv(num_envs=3), ToyVectorEnv(num_envs=3)
    whole.reset(specs)
    halves.reset(specs)
    chunks = np.random.default_rng(0).uniform(-1, 1, size=(3, 2, 7))
    expected = whole.step(chunks)
    halves.send_step(chunks[:2], envs=[0, 1])
    halves.send_step(chunks[2:], envs=[2])
    with pytest.raises(RuntimeError, match=r"env\(s\) \[2\] have a step in flight: receive_step\(\) them first"):
        halves.reset([specs[0]], envs=[2])
    halves.receive_step([2])
    result = halves.receive_step([0, 1])
    for key in ("done", "success", "steps"):
        np.testing.assert_array_equal(getattr(result, key), getattr(expected, key))
    np.testing.assert_array_equal(result.obs.agentview, expected.obs.agentview)

    halves.reset([EpisodeSpec(3, 0)], envs=[0], wait=False)
    assert not halves.receive_step([1, 2]).started.any()
    assert halves.receive_step([0]).started.tolist() == [True, False, False]
