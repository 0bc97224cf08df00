"""Moves a run or experiment directory between machines when the way back carries only a few files of limited size
(a lent GPU machine that returns at most 8 files of 16 MiB, say): `pack` writes the directory as a gzipped tar split
into parts and a manifest; `unpack` checks the parts against the manifest and extracts them. Any directory packs;
--exclude leaves out what only resumes a stage on the machine that ran it.

    python -m scripts.transfer pack --work-dir runs/ll12 --out-dir $OUT          # on the machine that ran it
    python -m scripts.transfer unpack --parts-dir /path/of/the/returned/files --dest runs

The default exclusions fit a scripts/libero_learning.py work directory: the demos, the random initial model,
SFT's float32 model and every run's checkpoints/ (float32 resume state, too large to carry) stay behind.
sft_export/ and grpo<N>_export/ come whole, with their proprio projector and action head files, so the evals and a
GRPO continuation run from them.
"""

import fnmatch
import hashlib
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import tyro

from trainer.checkpoint import CHECKPOINTS, MODEL_DIR, write_json
from trainer.errors import one_line_errors, traceback_requested

MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class Pack:
    """Pack a work directory into parts of at most part_bytes (plus a small manifest)."""

    work_dir: Path
    """The experiment's work directory (e.g. runs/ll12)."""
    out_dir: Path
    """Where the parts and the manifest go (e.g. the folder the machine returns)."""
    part_bytes: int = 15_000_000
    """Largest part (e.g. 15 MB for a machine that returns files of at most 16 MiB)."""
    max_parts: int = 7
    """Refuse to write more parts than this (e.g. 7 for a machine that returns 8 files: the manifest is one)."""
    exclude: tuple[str, ...] = ("demos", "init", f"sft/{MODEL_DIR}", f"*/{CHECKPOINTS}")
    """Paths relative to work_dir (glob patterns) left out with everything under them."""


@dataclass
class Unpack:
    """Check the parts against their manifest and extract the work directory under dest."""

    parts_dir: Path
    """The folder holding the parts and the manifest, as returned."""
    dest: Path
    """The work directory is extracted as dest/<its name>; files already there are replaced."""


class PartWriter:
    """A write-only binary stream cut into numbered files of at most part_bytes, hashed as one stream."""

    def __init__(self, prefix: Path, part_bytes: int) -> None:
        self.prefix, self.part_bytes = prefix, part_bytes
        self.parts: list[Path] = []
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.file: BinaryIO | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.file is None or self.file.tell() >= self.part_bytes:
                self._next_part()
            chunk = view[:self.part_bytes - self.file.tell()]
            self.file.write(chunk)
            self.sha256.update(chunk)
            self.size += len(chunk)
            view = view[len(chunk):]
        return len(data)

    def _next_part(self) -> None:
        if self.file is not None:
            self.file.close()
        self.parts.append(Path(f"{self.prefix}.{len(self.parts):03d}"))
        self.file = self.parts[-1].open("wb")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def packed_files(work_dir: Path, exclude: tuple[str, ...]) -> list[Path]:
    """The files under work_dir that pack carries, sorted."""
    def excluded(path: Path) -> bool:
        relative = path.relative_to(work_dir)
        return any(fnmatch.fnmatch(str(Path(*relative.parts[:depth])), pattern)
                   for pattern in exclude for depth in range(1, len(relative.parts) + 1))
    return sorted(path for path in work_dir.rglob("*") if path.is_file() and not excluded(path))


def pack(config: Pack) -> Path:
    """Writes the parts and the manifest; returns the manifest's path."""
    work_dir = config.work_dir
    if not work_dir.is_dir():
        raise FileNotFoundError(f"{work_dir} is not a directory: pass the experiment's --work-dir")
    files = packed_files(work_dir, config.exclude)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    writer = PartWriter(config.out_dir / f"{work_dir.name}.tar.gz", config.part_bytes)
    with tarfile.open(fileobj=writer, mode="w:gz") as archive:
        for path in files:
            archive.add(path, arcname=str(Path(work_dir.name) / path.relative_to(work_dir)), recursive=False)
    writer.close()
    if len(writer.parts) > config.max_parts:
        for part in writer.parts:
            part.unlink()
        largest = sorted(files, key=lambda path: path.stat().st_size, reverse=True)[:5]
        raise ValueError(f"{work_dir} packs into {len(writer.parts)} parts of {config.part_bytes / 1e6:.0f} MB, "
                         f"more than --max-parts {config.max_parts}; the largest files: "
                         f"{', '.join(str(path.relative_to(work_dir)) for path in largest)}. "
                         "Leave some out with --exclude or pack fewer runs at a time")
    manifest = config.out_dir / f"{work_dir.name}{MANIFEST_SUFFIX}"
    write_json(manifest, {"work_dir": work_dir.name, "parts": [part.name for part in writer.parts],
                          "bytes": writer.size, "sha256": writer.sha256.hexdigest(), "files": len(files)})
    print(f"{len(files)} files of {work_dir} -> {len(writer.parts)} parts ({writer.size / 1e6:.1f} MB) "
          f"and {manifest}")
    return manifest


def unpack(config: Unpack) -> Path:
    """Extracts the packed work directory under dest after checking every part; returns its path."""
    manifests = sorted(config.parts_dir.glob(f"*{MANIFEST_SUFFIX}"))
    if len(manifests) != 1:
        raise FileNotFoundError(f"{config.parts_dir} holds {len(manifests)} *{MANIFEST_SUFFIX} files, not one: "
                                "point --parts-dir at the folder of one pack's returned files")
    manifest = json.loads(manifests[0].read_text())
    parts = [config.parts_dir / name for name in manifest["parts"]]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"parts missing from {config.parts_dir}: {', '.join(missing)}; bring back every "
                                "file pack wrote")
    joined = b"".join(part.read_bytes() for part in parts)  # a few parts of 15 MB: memory is no concern
    if hashlib.sha256(joined).hexdigest() != manifest["sha256"]:
        raise ValueError(f"the parts in {config.parts_dir} do not match {manifests[0].name} (sha256): a part is "
                         "truncated or from another pack; bring the files back again")
    config.dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(joined), mode="r:gz") as archive:
        archive.extractall(config.dest, filter="data")
    work_dir = config.dest / manifest["work_dir"]
    print(f"{manifest['files']} files -> {work_dir}")
    return work_dir


def main() -> None:
    show_traceback, args = traceback_requested(sys.argv[1:])
    with one_line_errors("transfer.py", show_traceback):
        command = tyro.extras.subcommand_cli_from_dict({"pack": Pack, "unpack": Unpack}, args=args)
        if isinstance(command, Pack):
            pack(command)
        else:
            unpack(command)


if __name__ == "__main__":
    main()
