"""scripts/transfer.py: a work directory packed into size-limited parts comes back whole, exports included."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.transfer import Pack, Unpack, pack, unpack

KEPT = ("sft_export/config.json", "sft_export/model-00001-of-00001.safetensors",
        "sft_export/proprio_projector--40000_checkpoint.pt", "sft_export/action_head--40000_checkpoint.pt",
        "grpo15_export/model-00001-of-00001.safetensors", "grpo/metrics.jsonl", "sft/metrics.jsonl",
        "eval_sft_heldout/results.json", "stage_seconds.json")
LEFT_OUT = ("demos/task0_init0/frames.npz", "init/config.json", "sft/model/model.safetensors",
            "sft/checkpoints/iter_003000/optimizer.pt", "grpo/checkpoints/iter_000015/model/model.safetensors")


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    root = tmp_path / "machine" / "ll12"
    for name in KEPT + LEFT_OUT:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(6_000))  # incompressible, so the pack spans several parts
    return root


def test_round_trip_keeps_the_exports_and_leaves_out_the_float32_state(work_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = pack(Pack(work_dir=work_dir, out_dir=out, part_bytes=10_000))
    parts = sorted(out.glob("ll12.tar.gz.*"))
    assert manifest.name == "ll12.manifest.json" and len(parts) >= 5
    assert all(part.stat().st_size <= 10_000 for part in parts)

    restored = unpack(Unpack(parts_dir=out, dest=tmp_path / "here" / "runs"))
    assert restored == tmp_path / "here" / "runs" / "ll12"
    found = sorted(str(path.relative_to(restored)) for path in restored.rglob("*") if path.is_file())
    assert found == sorted(KEPT)
    for name in KEPT:
        assert (restored / name).read_bytes() == (work_dir / name).read_bytes()


def test_unpack_refuses_a_missing_or_damaged_part(work_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack(Pack(work_dir=work_dir, out_dir=out, part_bytes=10_000))
    second = out / "ll12.tar.gz.001"
    content = second.read_bytes()
    second.write_bytes(content[:-1])
    with pytest.raises(ValueError, match="do not match ll12.manifest.json"):
        unpack(Unpack(parts_dir=out, dest=tmp_path / "runs"))
    second.unlink()
    with pytest.raises(FileNotFoundError, match="parts missing .*ll12.tar.gz.001"):
        unpack(Unpack(parts_dir=out, dest=tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_pack_refuses_more_parts_than_the_machine_returns(work_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="more than --max-parts 2; the largest files"):
        pack(Pack(work_dir=work_dir, out_dir=out, part_bytes=10_000, max_parts=2))
    assert list(out.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        pack(Pack(work_dir=tmp_path / "nowhere", out_dir=out))


def test_command_line(work_dir: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out, dest = tmp_path / "out", tmp_path / "runs"
    for args in (["pack", "--work-dir", str(work_dir), "--out-dir", str(out)],
                 ["unpack", "--parts-dir", str(out), "--dest", str(dest)]):
        subprocess.run([sys.executable, "-m", "scripts.transfer", *args], cwd=root, check=True)
    assert (dest / "ll12" / "sft_export" / "proprio_projector--40000_checkpoint.pt").is_file()
    assert not (dest / "ll12" / "demos").exists()
