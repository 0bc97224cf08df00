"""libero_env without the simulator running: suites, splits, image pipeline, action conversion, proprio, video,
and constructor validation. Fast; the simulator tests are in test_libero_env_sim.py."""

import io
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from libero_env import (
    SUITES,
    EpisodeSpec,
    LiberoVectorEnv,
    center_crop,
    get_suite,
    init_state_split,
    jpeg_round_trip,
    lanczos_resize,
    preprocess_image,
    proprio_vector,
    reference_episodes,
    to_env_actions,
    upright,
    write_video,
)
from libero_env.processing import center_crop_box, crop_sample_points, decode_jpeg, encode_jpeg, quat_to_axis_angle
from libero_env.suites import load_tasks

TF_JPEG_FIXTURE = Path(__file__).parent / "fixtures" / "jpeg_tf_round_trip.npz"
"""TensorFlow's JPEG round trip of two real LIBERO frames and a synthetic image (fixtures/make_jpeg_tf_fixture.py)."""


def test_suite_table_matches_reference():
    assert {name: s.max_steps for name, s in SUITES.items()} == {
        "libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
    assert {name: s.num_tasks for name, s in SUITES.items()} == {
        "libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}


def test_unknown_suite_names_the_valid_ones():
    with pytest.raises(ValueError, match="libero_spatial, libero_object, libero_goal, libero_10, libero_90"):
        get_suite("libero_100")


@pytest.mark.parametrize("suite", list(SUITES))
def test_tasks_load_with_language_and_50_init_states(suite):
    tasks = load_tasks(suite)
    assert len(tasks) == SUITES[suite].num_tasks
    for task in tasks:
        assert task.language and task.language == task.language.strip()
        assert task.bddl_file.endswith(".bddl")
        assert task.init_states.shape[0] == 50 and task.init_states.dtype == np.float64
    if suite == "libero_spatial":
        assert tasks[0].language == "pick up the black bowl between the plate and the ramekin and place it on the plate"


def test_init_state_split_default_is_40_10_disjoint_and_deterministic():
    train, heldout = init_state_split()
    assert len(train) == 40 and len(heldout) == 10
    assert sorted(train + heldout) == list(range(50))
    assert (train, heldout) == init_state_split(n_states=50, n_heldout=10, seed=0)
    assert init_state_split(seed=1) != (train, heldout)
    assert train == sorted(train) and heldout == sorted(heldout)


def test_init_state_split_is_configurable():
    train, heldout = init_state_split(n_states=50, n_heldout=5, seed=3)
    assert len(train) == 45 and len(heldout) == 5 and not set(train) & set(heldout)
    assert init_state_split(n_states=50, n_heldout=0) == (list(range(50)), [])


@pytest.mark.parametrize("kwargs", [dict(n_heldout=50), dict(n_heldout=-1), dict(n_states=0)])
def test_init_state_split_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be"):
        init_state_split(**kwargs)


def test_reference_protocol_is_every_task_times_50_states():
    episodes = reference_episodes("libero_spatial")
    assert len(episodes) == 500
    assert episodes[0] == EpisodeSpec(0, 0) and episodes[49] == EpisodeSpec(0, 49)
    assert episodes[50] == EpisodeSpec(1, 0) and episodes[-1] == EpisodeSpec(9, 49)
    assert len(reference_episodes("libero_90")) == 4500


def test_gripper_conversion_table():
    # dataset gripper (1 = open) -> 2g-1 -> sign -> negate -> env gripper (-1 = open, +1 = close)
    table = {0.0: 1.0, 0.25: 1.0, 0.5: 0.0, 0.75: -1.0, 1.0: -1.0}
    actions = np.zeros((len(table), 7))
    actions[:, :6] = np.arange(6) * 0.1 - 0.2
    actions[:, 6] = list(table)
    converted = to_env_actions(actions)
    assert converted[:, 6].tolist() == list(table.values())
    np.testing.assert_array_equal(converted[:, :6], actions[:, :6])
    assert actions[:, 6].tolist() == list(table)  # the input is not modified


def test_action_conversion_keeps_chunk_shape():
    chunk = np.ones((2, 8, 7), np.float32)
    converted = to_env_actions(chunk)
    assert converted.shape == (2, 8, 7) and converted.dtype == np.float64
    assert (converted[..., 6] == -1).all()


def test_rotation_is_180_degrees():
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rotated = upright(frame)
    assert rotated[0, 0].tolist() == frame[1, 2].tolist()
    assert rotated[1, 2].tolist() == frame[0, 0].tolist()
    assert rotated[0, 2].tolist() == frame[1, 0].tolist()
    np.testing.assert_array_equal(upright(rotated), frame)


def test_center_crop_box_covers_90_percent_of_the_area():
    y1, x1, y2, x2 = center_crop_box(0.9)
    side = math.sqrt(0.9)  # 0.9486833
    assert y1 == x1 and y2 == x2
    assert y1 == pytest.approx((1 - side) / 2, abs=1e-7)  # 0.0256584
    assert y2 == pytest.approx((1 + side) / 2, abs=1e-7)  # 0.9743416
    assert (y2 - y1) ** 2 == pytest.approx(0.9, abs=1e-6)


def test_crop_sample_points_follow_tf_crop_and_resize():
    # TF: in_y = y1 * (H - 1) + y * (y2 - y1) * (H - 1) / (crop_h - 1); with H = crop_h = 224
    points = crop_sample_points(0.0256584, 0.9743416, 224, 224)
    assert points[0] == pytest.approx(0.0256584 * 223, abs=1e-4)  # 5.72182
    assert points[223] == pytest.approx(0.9743416 * 223, abs=1e-4)  # 217.27818
    assert np.diff(points) == pytest.approx(np.full(223, 0.9486833), abs=3e-5)  # float32 spacing


def test_center_crop_of_ramps_matches_hand_computed_values():
    # Bilinear sampling reproduces a ramp exactly: out = floor(in_y / 255 * 255.5) (convert_image_dtype truncates).
    rows = np.repeat(np.arange(224, dtype=np.uint8)[:, None], 224, axis=1)
    image = np.stack([rows, rows.T, np.full_like(rows, 200)], axis=-1)
    cropped = center_crop(image)
    assert cropped.shape == (224, 224, 3) and cropped.dtype == np.uint8
    # in_y(0) = 5.72182 -> 5.733; in_y(111) = 111.02567 -> 111.243; in_y(223) = 217.27818 -> 217.704
    assert cropped[[0, 111, 223], 17, 0].tolist() == [5, 111, 217]
    assert cropped[42, [0, 111, 223], 1].tolist() == [5, 111, 217]
    assert (cropped[..., 0] == cropped[:, :1, 0]).all() and (cropped[..., 1] == cropped[:1, :, 1]).all()
    assert (cropped[..., 2] == 200).all()  # 200/255*255.5 = 200.39 -> 200


def test_lanczos_resize_keeps_constants_and_ramps():
    flat = np.full((256, 256, 3), 77, np.uint8)
    np.testing.assert_array_equal(lanczos_resize(flat), np.full((224, 224, 3), 77, np.uint8))
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 256, axis=0)
    resized = lanczos_resize(np.stack([ramp] * 3, axis=-1))
    # column j samples source x = (j + 0.5) * 256 / 224 - 0.5; away from the borders the ramp survives within 1 level
    expected = (np.arange(224) + 0.5) * 256 / 224 - 0.5
    assert np.abs(resized[100, 8:-8, 0].astype(float) - expected[8:-8]).max() <= 1.0


def test_jpeg_round_trip_is_exact_on_flat_colour_and_close_otherwise():
    grey = np.full((256, 256, 3), 128, np.uint8)
    np.testing.assert_array_equal(jpeg_round_trip(grey), grey)
    columns, rows = np.meshgrid(np.arange(256), np.arange(256))
    smooth = np.stack([columns, rows, np.full((256, 256), 90)], axis=-1).astype(np.uint8)
    decoded = jpeg_round_trip(smooth)
    assert decoded.shape == smooth.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth).mean() < 2.0


def tf_jpeg_cases() -> dict[str, tuple[np.ndarray, bytes, np.ndarray]]:
    """name -> (input image, tf.io.encode_jpeg's bytes, tf.io.decode_image's output) from the fixture."""
    fixture = np.load(TF_JPEG_FIXTURE)
    names = sorted({key.split("/")[0] for key in fixture.files if "/" in key})
    return {name: (fixture[f"{name}/input"], fixture[f"{name}/tf_jpeg"].tobytes(), fixture[f"{name}/tf_decoded"])
            for name in names}


def without_jfif_header(data: bytes) -> bytes:
    """The JPEG stream after its APP0 (JFIF) segment, whose pixel density TF sets to 300 dpi and Pillow to 1:1."""
    assert data[:4] == b"\xff\xd8\xff\xe0"
    return data[4 + int.from_bytes(data[4:6], "big"):]


def test_jpeg_round_trip_reproduces_tensorflow_exactly():
    """Our encoder writes TF's stream, our decoder (fast integer IDCT, fancy upsampling) gives TF's pixels, and so
    the round trip equals TF's on every pixel. Pillow's decoder (accurate IDCT) was 13-16 grey levels off at worst
    and 1.0-1.7 on average on these three images (BENCHMARKS.md, JPEG round trip fidelity)."""
    cases = tf_jpeg_cases()
    assert set(cases) == {"libero_10_robot0_eye_in_hand", "libero_spatial_agentview", "synthetic"}
    for name, (image, tf_jpeg, tf_decoded) in cases.items():
        assert without_jfif_header(encode_jpeg(image)) == without_jfif_header(tf_jpeg), name
        np.testing.assert_array_equal(decode_jpeg(tf_jpeg), tf_decoded, err_msg=name)
        np.testing.assert_array_equal(jpeg_round_trip(image), tf_decoded, err_msg=name)


def test_tf_jpeg_fixture_tells_the_accurate_idct_apart():
    """The fixture catches a return to the accurate IDCT: Pillow's decode of TF's own bytes is off on every image."""
    for name, (_, tf_jpeg, tf_decoded) in tf_jpeg_cases().items():
        accurate = np.asarray(Image.open(io.BytesIO(tf_jpeg)).convert("RGB")).astype(int)
        assert np.abs(accurate - tf_decoded).max() >= 10, name


def test_preprocess_image_shape_dtype_and_orientation():
    raw = np.zeros((256, 256, 3), np.uint8)
    raw[:128] = 255  # rendered upside down: the white half is on top in the raw frame ...
    processed = preprocess_image(raw)
    assert processed.shape == (224, 224, 3) and processed.dtype == np.uint8
    assert processed[:100].mean() < 3 and processed[-100:].mean() > 252  # ... and at the bottom after rotation


def test_quat_to_axis_angle_hand_values():
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, 0, 1]), [0, 0, 0])
    s = math.sin(math.pi / 4)
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, s, s]), [0, 0, math.pi / 2], atol=1e-12)
    np.testing.assert_allclose(quat_to_axis_angle([1, 0, 0, 0]), [math.pi, 0, 0], atol=1e-12)
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, 0, 1 + 1e-9]), [0, 0, 0])  # clipped, as robosuite


def test_proprio_vector_order_and_dtype():
    proprio = proprio_vector(np.array([0.1, 0.2, 0.3]), np.array([1.0, 0, 0, 0]), np.array([0.04, -0.04]))
    assert proprio.dtype == np.float32 and proprio.shape == (8,)
    np.testing.assert_allclose(proprio, [0.1, 0.2, 0.3, math.pi, 0, 0, 0.04, -0.04], rtol=1e-6)


def test_write_video_round_trip(tmp_path):
    frames = [np.full((64, 64, 3), 40 * k, np.uint8) for k in range(5)]
    path = tmp_path / "videos" / "episode.mp4"
    write_video(path, frames, fps=10)
    assert [p.name for p in path.parent.iterdir()] == ["episode.mp4"]
    decoded = imageio.mimread(path, format="FFMPEG")
    assert len(decoded) == 5 and decoded[0].shape == (64, 64, 3)
    assert abs(int(decoded[3].mean()) - 120) <= 3


def test_write_video_refuses_no_frames(tmp_path):
    with pytest.raises(ValueError, match="record_video=True"):
        write_video(tmp_path / "empty.mp4", [])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(suite="libero_100", num_envs=1), "unknown LIBERO suite 'libero_100'; valid suites: libero_spatial"),
        (dict(suite="libero_goal", num_envs=0), "num_envs must be >= 1"),
        (dict(suite="libero_goal", num_envs=1, max_steps=0), r"max_steps must be in \[1, 990\]"),
        (dict(suite="libero_goal", num_envs=1, max_steps=991), r"max_steps must be in \[1, 990\]"),
        (dict(suite="libero_goal", num_envs=1, start_method="fork"), "start_method must be one of"),
    ],
)
def test_vector_env_rejects_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LiberoVectorEnv(**kwargs)
