"""How far the env's JPEG round trip (REF 5.3 step 3) is from TensorFlow's, and what it costs per frame: the
decoder the env uses (simplejpeg, fast integer IDCT as TF) against the accurate-IDCT decode that Pillow gives, both
on the stream of the same encoder, on the TF outputs in tests/fixtures/jpeg_tf_round_trip.npz (two real 256x256
LIBERO frames and a small synthetic image). Also how much the accurate IDCT moves the final 224x224 policy image
(Lanczos resize and centre crop after the round trip). Writes bench/results/jpeg_fidelity.json.

    .venv/bin/python -m bench.bench_jpeg_fidelity
"""

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from PIL import Image

from bench.bench_libero_env import cpu_description
from libero_env.processing import center_crop, encode_jpeg, jpeg_round_trip, lanczos_resize
from trainer.checkpoint import write_json


@dataclass
class Args:
    fixture: Path = Path("tests/fixtures/jpeg_tf_round_trip.npz")
    """TF's round trips (tests/fixtures/make_jpeg_tf_fixture.py writes it)."""
    repeats: int = 300
    """Timed round trips per 256x256 frame and decoder."""
    out: Path = Path("bench/results/jpeg_fidelity.json")
    """Result file, written atomically."""


def accurate_idct_round_trip(image: np.ndarray) -> np.ndarray:
    """The same encoder's stream decoded by Pillow (libjpeg's accurate integer IDCT, fancy upsampling)."""
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB"))


def difference(image: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(image.astype(np.int64) - reference)
    return {"max": int(diff.max()), "mean": round(float(diff.mean()), 4),
            "pixels_off": round(float((diff > 0).mean()), 4)}


def milliseconds_per_call(round_trip, image: np.ndarray, repeats: int) -> float:
    round_trip(image)
    start = time.perf_counter()
    for _ in range(repeats):
        round_trip(image)
    return round(1000 * (time.perf_counter() - start) / repeats, 3)


def main(args: Args) -> None:
    fixture = np.load(args.fixture)
    names = sorted({key.split("/")[0] for key in fixture.files if "/" in key})
    round_trips = {"simplejpeg_fast_idct": jpeg_round_trip, "pillow_accurate_idct": accurate_idct_round_trip}
    images, timings = {}, {name: [] for name in round_trips}
    for name in names:
        image, tf_decoded = fixture[f"{name}/input"], fixture[f"{name}/tf_decoded"]
        outputs = {decoder: round_trip(image) for decoder, round_trip in round_trips.items()}
        images[name] = {f"{decoder}_vs_tf": difference(output, tf_decoded) for decoder, output in outputs.items()}
        if image.shape == (256, 256, 3):
            policy_images = [center_crop(lanczos_resize(output)) for output in outputs.values()]
            images[name]["policy_image_accurate_vs_fast_idct"] = difference(*policy_images)
            for decoder, round_trip in round_trips.items():
                timings[decoder].append(milliseconds_per_call(round_trip, image, args.repeats))
    result = {
        "what": "|round trip - TF's round trip| in grey levels per image, for the env's decoder and Pillow's accurate "
                "IDCT on the same encoder's stream; ms per encode + decode of a 256x256 frame (mean over the frames)",
        "images": images,
        "round_trip_ms_256": {decoder: round(float(np.mean(ms)), 3) for decoder, ms in timings.items()},
        "tf_version_of_fixture": str(fixture["tf_version"]),
        "cpu": cpu_description(),
        "command": ".venv/bin/python -m bench.bench_jpeg_fidelity",
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
