"""The scripted libero_spatial expert: its collision geometry by hand, and one real episode without rendering."""

import numpy as np
import pytest

from libero_env import to_env_actions
from libero_env.expert import (
    GRIPPER_DOWN,
    Boxes,
    gripper_boxes,
    make_env,
    overlapping,
    rotation_vector,
    run_expert,
    yaw_rotation,
)
from libero_env.suites import EpisodeSpec, get_suite, load_tasks, scene_seed


def test_overlapping_boxes_by_hand():
    unit = Boxes(np.zeros((1, 3)), np.eye(3)[None], np.ones((1, 3)))
    turned = yaw_rotation(np.pi / 4)
    others = Boxes(
        centers=np.array([[2.1, 0.0, 0.0], [1.9, 0.0, 0.0], [1.5, 1.5, 0.0], [2.3, 2.3, 0.0]]),
        rotations=np.stack([np.eye(3), np.eye(3), turned, turned]),
        half_sizes=np.ones((4, 3)),
    )
    # Faces 0.1 apart; faces 0.1 deep into each other; a box turned 45 degrees whose nearest corner, (0.5, 0.5),
    # lies inside the unit box; the same box at (2.3, 2.3): along the diagonal the centres are 2.3*sqrt(2) = 3.25
    # apart, more than sqrt(2) (unit box) + 1 (turned box) = 2.41.
    assert overlapping(unit, others).tolist() == [[False, True, True, False]]
    assert overlapping(others, unit).tolist() == [[False], [True], [True], [False]]


def test_rotation_vector_by_hand():
    np.testing.assert_allclose(rotation_vector(np.eye(3)), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(rotation_vector(yaw_rotation(np.pi / 2)), [0.0, 0.0, np.pi / 2])
    np.testing.assert_allclose(rotation_vector(yaw_rotation(-0.3)), [0.0, 0.0, -0.3])
    half_turn_about_x = np.diag([1.0, -1.0, -1.0])
    np.testing.assert_allclose(np.abs(rotation_vector(half_turn_about_x)), [np.pi, 0.0, 0.0])
    # GRIPPER_DOWN is a half turn about the horizontal axis (1, 1, 0) / sqrt(2).
    np.testing.assert_allclose(np.abs(rotation_vector(GRIPPER_DOWN)), [np.pi / np.sqrt(2), np.pi / np.sqrt(2), 0.0])


def test_gripper_boxes_turn_with_yaw():
    site = np.array([0.1, 0.2, 1.0])
    straight, turned = gripper_boxes(site, yaw=0.0), gripper_boxes(site, yaw=np.pi / 2)
    # Fingers 0.034 m either side of the grip site along world y at yaw 0, along world -x / +x at yaw pi/2.
    np.testing.assert_allclose(straight.centers[:2], [[0.1, 0.234, 1.0165], [0.1, 0.166, 1.0165]], atol=1e-12)
    np.testing.assert_allclose(turned.centers[:2], [[0.066, 0.2, 1.0165], [0.134, 0.2, 1.0165]], atol=1e-12)
    swept = gripper_boxes(site, yaw=0.0, rise=0.2, margin=0.01)
    np.testing.assert_allclose(swept.centers[:, 2] - straight.centers[:, 2], 0.1)
    np.testing.assert_allclose(swept.half_sizes - straight.half_sizes, [[0.01, 0.01, 0.11]] * 4)


@pytest.mark.libero
def test_expert_places_the_bowl_within_the_step_limit():
    task = load_tasks("libero_spatial")[0]
    max_steps = get_suite("libero_spatial").max_steps
    env = make_env(task.bddl_file, cameras=False)
    try:
        run = run_expert(env, task.init_states[0], scene_seed(EpisodeSpec(0, 0)), max_steps)
    finally:
        env.close()
    assert run.success and run.settled
    assert 0 < len(run.actions) <= max_steps
    assert np.all(np.abs(run.actions[:, :6]) <= 1.0)
    assert set(run.actions[:, 6].tolist()) == {0.0, 1.0}
    assert set(to_env_actions(run.actions)[:, 6].tolist()) == {-1.0, 1.0}
    assert run.observations == []
