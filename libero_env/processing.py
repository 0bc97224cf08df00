"""Conversions between LIBERO and the OpenVLA / OpenVLA-OFT policies: images (REF 5.3), actions (REF 5.2),
proprio (REF 6.3). Pure numpy, Pillow and simplejpeg, no simulator.

The reference preprocesses with TensorFlow; this file mirrors each TF op. The JPEG round trip and the crop reproduce
TF's output exactly (tests/fixtures/jpeg_tf_round_trip.npz holds TF's round trip of real LIBERO frames). The Lanczos
resize can still differ by a grey level: it accumulates in float32 (TF) versus double (Pillow "F" mode), so values
sitting on a .5 boundary can round the other way.
"""

import io

import numpy as np
import simplejpeg
from PIL import Image

POLICY_IMAGE_SIZE = 224
"""Side of the square images the policies take."""
ACTION_DIM = 7
"""One action: eef position delta, axis-angle rotation delta, gripper (REF 5.2)."""
PROPRIO_DIM = 8
"""OFT's LIBERO proprio: eef position, eef axis-angle, 2 gripper joint positions (REF 6.3)."""
JPEG_QUALITY = 95
"""tf.image.encode_jpeg's default quality, used by the reference (REF 5.3)."""
CENTER_CROP_AREA = 0.9
"""Area fraction of the centred crop, matching the training-time random_resized_crop scale (REF 5.3)."""


def upright(frame: np.ndarray) -> np.ndarray:
    """Rotates a rendered frame by 180 degrees; MuJoCo's offscreen render is upside down and mirrored (REF 5.3)."""
    return np.ascontiguousarray(frame[::-1, ::-1])


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """tf.io.encode_jpeg's defaults: baseline, 4:2:0 chroma, accurate integer forward DCT, standard Huffman tables.
    The bytes equal TF's from the quantisation tables on; only the JFIF header's pixel density differs."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """tf.io.decode_image's defaults: libjpeg's fast integer IDCT (JDCT_IFAST) and fancy (smooth) chroma upsampling.
    Pillow's decoder uses the accurate IDCT instead: up to 14 grey levels (1.1 on average) off TF on the LIBERO
    frames of tests/fixtures/jpeg_tf_round_trip.npz (BENCHMARKS.md, JPEG round trip fidelity)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encodes to JPEG and decodes again as TF does, the way the RLDS training images were stored and read."""
    return decode_jpeg(encode_jpeg(image, quality))


def lanczos_resize(image: np.ndarray, size: int = POLICY_IMAGE_SIZE) -> np.ndarray:
    """tf.image.resize(method="lanczos3", antialias=True) followed by round, clip and cast to uint8.

    Pillow's LANCZOS is the same antialiased lanczos-3 filter; resizing each channel in "F" mode keeps the
    intermediate in floating point as TF does, instead of Pillow's 8-bit fixed-point path.
    """
    channels = [
        np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((size, size), Image.Resampling.LANCZOS))
        for c in range(image.shape[-1])
    ]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def center_crop_box(area: float = CENTER_CROP_AREA) -> tuple[float, float, float, float]:
    """Normalised (y1, x1, y2, x2) of the centred square box covering `area` of the image, in float32 as TF."""
    side = np.clip(np.sqrt(np.float32(area)), np.float32(0), np.float32(1))
    offset = (np.float32(1) - side) / np.float32(2)
    return float(offset), float(offset), float(offset + side), float(offset + side)


def crop_sample_points(lo: float, hi: float, in_size: int, out_size: int) -> np.ndarray:
    """Source coordinates tf.image.crop_and_resize samples for a box edge pair (lo, hi): float32 [out_size]."""
    scale = np.float32(hi - lo) * np.float32(in_size - 1) / np.float32(out_size - 1)
    return np.float32(lo) * np.float32(in_size - 1) + np.arange(out_size, dtype=np.float32) * scale


def center_crop(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """The reference centre crop (REF 5.3 step 4): uint8 -> float [0,1], tf.image.crop_and_resize of the centred
    box back to the same size (bilinear), clip, then tf.image.convert_image_dtype(uint8, saturate=True), which
    multiplies by 255.5 and truncates."""
    pixels = image.astype(np.float32) * np.float32(1.0 / 255)
    height, width = image.shape[:2]
    y1, x1, y2, x2 = center_crop_box(area)
    ys = crop_sample_points(y1, y2, height, height)
    xs = crop_sample_points(x1, x2, width, width)
    y_floor, x_floor = np.floor(ys), np.floor(xs)
    top, bottom = y_floor.astype(np.int64), np.ceil(ys).astype(np.int64)
    left, right = x_floor.astype(np.int64), np.ceil(xs).astype(np.int64)
    y_lerp = (ys - y_floor)[:, None, None]  # float32, as TF's in_y - top_y_index
    x_lerp = (xs - x_floor)[None, :, None]
    # Same float32 operations in the same order as TF (left/right blend first, then top/bottom), with the column
    # blend done once for every source row instead of once per output row.
    left_pixels, right_pixels = np.take(pixels, left, axis=1), np.take(pixels, right, axis=1)
    row_blend = left_pixels + (right_pixels - left_pixels) * x_lerp
    upper, lower = row_blend[top], row_blend[bottom]
    cropped = np.clip(upper + (lower - upper) * y_lerp, 0, 1)
    return np.minimum(cropped * np.float32(255.5), 255).astype(np.uint8)


def preprocess_image(raw: np.ndarray) -> np.ndarray:
    """Raw 256x256 render -> the policy's uint8 [224,224,3]: rotate 180, JPEG, Lanczos to 224, centre crop."""
    return center_crop(lanczos_resize(jpeg_round_trip(upright(raw))))


def to_env_actions(actions: np.ndarray) -> np.ndarray:
    """Dataset convention (gripper in [0,1], 1 = open) -> LIBERO env convention (-1 = open, +1 = close).

    REF 5.2: g <- 2g - 1, g <- sign(g) (sign(0) = 0), g <- -g. Works on any [..., 7] array; returns float64.
    """
    converted = np.array(actions, dtype=np.float64)
    converted[..., 6] = -np.sign(2.0 * converted[..., 6] - 1.0)
    return converted


def to_dataset_actions(env_actions: np.ndarray) -> np.ndarray:
    """LIBERO env convention (gripper -1 = open, +1 = close) -> dataset convention (1 = open, 0 = close), as
    OpenVLA's LIBERO dataset transform does (REF 5.2): clip the gripper to [0, 1], then invert. Returns float32."""
    converted = np.array(env_actions, dtype=np.float32)
    converted[..., 6] = 1.0 - np.clip(converted[..., 6], 0.0, 1.0)
    return converted


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's quat2axisangle for an (x, y, z, w) quaternion, without its in-place clipping of the input.

    Kept here so the parent process never imports robosuite (and MuJoCo with it).
    """
    quat = np.asarray(quat, dtype=np.float64)
    w = np.clip(quat[3], -1.0, 1.0)
    sin_half = np.sqrt(1.0 - w * w)
    if sin_half == 0.0:
        return np.zeros(3)
    return quat[:3] * 2.0 * np.arccos(w) / sin_half


def proprio_vector(eef_pos: np.ndarray, eef_quat: np.ndarray, gripper_qpos: np.ndarray) -> np.ndarray:
    """OFT's 8-D LIBERO proprio (REF 6.3): eef position, axis-angle of the eef quaternion, 2 gripper joints."""
    return np.concatenate([eef_pos, quat_to_axis_angle(eef_quat), gripper_qpos]).astype(np.float32)
