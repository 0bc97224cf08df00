"""The released HF checkpoint format (REF 1, 2): file names, config templates, strict loading, atomic writing."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vla_actor.tokenizer import TOKENIZER_JSON, legacy_tokenizer_json

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
STATISTICS_FILE = "dataset_statistics.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROPRIO_PATTERN = "proprio_projector--*.pt"
L1_HEAD_PATTERN = "action_head--*.pt"
PROPRIO_FILE = "proprio_projector--150000_checkpoint.pt"
DEFAULT_SHARD_BYTES = 5_000_000_000

DINO_MEAN_BF16 = [0.484375, 0.455078125, 0.40625]  # ImageNet constants rounded to bf16 by the converter
DINO_STD_BF16 = [0.228515625, 0.2236328125, 0.224609375]

# Small files of the released checkpoints, verbatim where REF 1.1 / 1.4 quotes them.
ADDED_TOKENS = {"<PAD>": 32000}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000,
                     "transformers_version": "4.40.1"}
PROCESSOR_CONFIG = {"auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
                    "processor_class": "PrismaticProcessor"}
SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "pad_token": {"content": "<PAD>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
}


def _special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {"0": _special_token("<unk>"), "1": _special_token("<s>"), "2": _special_token("</s>"),
                             "32000": _special_token("<PAD>")},
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": "<PAD>",
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
PREPROCESSOR_CONFIG = {
    "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                 "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
    "image_processor_type": "PrismaticImageProcessor",
    "image_resize_strategy": "resize-naive",
    "input_sizes": [[3, 224, 224], [3, 224, 224]],
    "interpolations": ["bicubic", "bicubic"],
    "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
    "processor_class": "PrismaticProcessor",
    "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
    "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
    "tvf_do_letterbox": False,
    "tvf_letterbox_fill": None,
    "tvf_normalize_params": [{"inplace": False, "mean": DINO_MEAN_BF16, "std": DINO_STD_BF16},
                             {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}],
    "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]},
                          {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}],
    "use_fused_vision_backbone": True,
}


def released_config(norm_stats: dict, dtype_name: str = "bfloat16") -> dict:
    """config.json of the released OpenVLA-7B LIBERO fine-tunes (REF 1.2), with the given statistics."""
    return {
        "_name_or_path": "openvla/openvla-7b",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "openvla/openvla-7b--configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "openvla/openvla-7b--modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": norm_stats,
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": dtype_name, "vocab_size": 32064},
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "torch_dtype": dtype_name,
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


TRAINING_DTYPE_KEY = "training_dtype"
"""config.json key of this project: the dtype the weights were trained (computed) in. torch_dtype only says how
they are stored: a model trained in float32 may ship in bfloat16 at half the size, and computing it in bfloat16
changes its actions (run 11's small policy, BENCHMARKS.md: 0.475 held-out success in float32, ~0.30 in
bfloat16)."""


def trained_dtype_name(config: dict) -> str:
    """The dtype a checkpoint was trained in: training_dtype where this project wrote one, else the stored
    torch_dtype (the released OpenVLA checkpoints: bfloat16)."""
    return config.get(TRAINING_DTYPE_KEY) or config.get("torch_dtype") or "bfloat16"


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_directory(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise an `owner/name` hub id fetched with huggingface_hub."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.match(str(path_or_hub_id)):
        raise FileNotFoundError(f"checkpoint {str(path_or_hub_id)!r} is neither a local directory nor a hub id "
                                f"of the form 'owner/name'")
    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(f"checkpoint {str(path_or_hub_id)!r} is not a local directory and could not be "
                                f"downloaded from the hub: {error}") from error


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore the file or copy it again") from error


def read_norm_stats(directory: Path, config: dict) -> tuple[dict, str]:
    """dataset_statistics.json replaces config.json's norm_stats when present (REF 1.3); returns (stats, source)."""
    statistics_path = directory / STATISTICS_FILE
    if statistics_path.is_file():
        return read_json(statistics_path), str(statistics_path)
    return config.get("norm_stats") or {}, f"{directory / CONFIG_FILE} norm_stats"


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safe_open of a weights file; a truncated or damaged file is a ValueError naming it and the fix."""
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): it is truncated or damaged; copy "
                         f"or download it again") from error
    with handle:
        yield handle


def weight_map(directory: Path) -> dict[str, str]:
    """File key -> shard file name, from model.safetensors.index.json (or a single model.safetensors)."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        mapping = read_json(index_path).get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"{index_path} has no 'weight_map' (expected {{tensor name: shard file}})")
    elif (directory / SINGLE_WEIGHTS_FILE).is_file():
        with open_safetensors(directory / SINGLE_WEIGHTS_FILE) as handle:
            mapping = {key: SINGLE_WEIGHTS_FILE for key in handle.keys()}
    else:
        raise FileNotFoundError(f"no weights in {directory}: expected {INDEX_FILE} with its shards "
                                f"(or a single {SINGLE_WEIGHTS_FILE})")
    missing_shards = sorted({shard for shard in mapping.values() if not (directory / shard).is_file()})
    if missing_shards:
        raise FileNotFoundError(f"shard(s) {missing_shards} listed in {INDEX_FILE} are missing from {directory}")
    return mapping


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """Strict comparison of names and shapes; one ValueError naming every problem."""
    problems = []
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    wrong = [f"{key}: file {list(found[key])} vs expected {list(expected[key])}"
             for key in sorted(expected.keys() & found.keys()) if tuple(found[key]) != tuple(expected[key])]
    if wrong:
        problems.append(f"shape mismatch for {len(wrong)} tensors ({'; '.join(wrong[:8])})")
    if problems:
        raise ValueError(f"{source} does not match the model built from its config: {'; '.join(problems)}. The "
                         f"config and the weights must come from the same checkpoint")


def read_weights(expected: dict[str, torch.Size], directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the sharded safetensors as (file key, tensor), one at a time in file order, after a strict
    check of every name and shape against `expected` (file key -> shape) that reads only the headers."""
    mapping = weight_map(directory)
    shards: dict[str, list[str]] = {}
    for key, shard in mapping.items():
        shards.setdefault(shard, []).append(key)
    found: dict[str, torch.Size] = {}
    for shard, keys in shards.items():
        with open_safetensors(directory / shard) as handle:
            absent = set(keys) - set(handle.keys())
            if absent:
                raise ValueError(f"{shard} lacks {_names(absent)} that {INDEX_FILE} places in it")
            found.update({key: torch.Size(handle.get_slice(key).get_shape()) for key in keys})
    check_keys(expected, found, f"{directory} ({len(shards)} shards)")
    for shard, keys in shards.items():
        with open_safetensors(directory / shard) as handle:
            for key in keys:
                yield key, handle.get_tensor(key)


@torch.no_grad()
def load_weights(targets: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy every tensor of the sharded safetensors into `targets` (file key -> tensor), strictly."""
    for key, tensor in read_weights({key: target.shape for key, target in targets.items()}, directory):
        targets[key].copy_(tensor)


def find_one(directory: Path, pattern: str) -> Path | None:
    matches = sorted(directory.glob(pattern))
    if len(matches) > 1:
        raise ValueError(f"{directory} has several {pattern} files ({[m.name for m in matches]}); keep exactly one")
    return matches[0] if matches else None


def load_torch_file(path: Path, **kwargs) -> object:
    """torch.load(weights_only=True) of `path`; a missing, truncated or damaged file is one error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{path} is truncated or damaged ({reason}); copy it again or use an earlier "
                         f"checkpoint") from error


def read_proprio_projector(path: Path) -> dict[str, torch.Tensor]:
    """OFT proprio projector state (weights_only); the DDP 'module.' prefix is dropped (REF 6.3)."""
    state = load_torch_file(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a state dict of tensors, got {type(state).__name__}")
    return {key.removeprefix("module."): tensor for key, tensor in state.items()}


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o755)
    if target.is_dir() and any(target.iterdir()):
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        if target.is_dir():
            target.rmdir()
        os.replace(staging, target)


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Stream tensors into model-0000k-of-0000n.safetensors shards plus the index, as HF's save does."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes, files = 0, 0, []
    owners: dict[str, int] = {}

    def flush() -> None:
        files.append(directory / f"shard-{len(files):05d}.tmp")
        save_file(shard, files[-1], metadata={"format": "pt"})
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        owners[name] = len(files)
        shard_bytes += size
        total_bytes += size
    if shard:
        flush()
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for path, name in zip(files, names):
        os.replace(path, directory / name)
    write_json(directory / INDEX_FILE, {"metadata": {"total_size": total_bytes},
                                        "weight_map": {key: names[owners[key]] for key in sorted(owners)}})


def write_checkpoint(directory: str | os.PathLike, config: dict, tensors: Iterable[tuple[str, torch.Tensor]],
                     tokenizer, norm_stats: dict, preprocessor_config: dict,
                     proprio_state: dict[str, torch.Tensor] | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, carried_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete checkpoint directory in the released layout, atomically.

    carried_files: the source checkpoint's tokenizer and remote-code files (name -> bytes), written verbatim; the
      tokenizer files it lacks are written from `tokenizer` and the released constants, tokenizer.json with the
      merges in the form tokenizers 0.19 (OpenVLA's stack) reads.
    """
    carried_files = carried_files or {}
    with atomic_directory(directory) as staging:
        write_shards(staging, tensors, max_shard_bytes)
        write_json(staging / CONFIG_FILE, config)
        write_json(staging / STATISTICS_FILE, norm_stats)
        write_json(staging / PREPROCESSOR_FILE, preprocessor_config)
        write_json(staging / "processor_config.json", PROCESSOR_CONFIG)
        write_json(staging / "generation_config.json", GENERATION_CONFIG)
        for name, content in carried_files.items():
            (staging / name).write_bytes(content)
        if TOKENIZER_JSON not in carried_files:
            (staging / TOKENIZER_JSON).write_text(legacy_tokenizer_json(tokenizer))
        for name, content in (("tokenizer_config.json", TOKENIZER_CONFIG), ("added_tokens.json", ADDED_TOKENS),
                              ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
            if name not in carried_files:
                write_json(staging / name, content)
        if proprio_state is not None:
            torch.save({k: v.detach().to("cpu").contiguous() for k, v in proprio_state.items()},
                       staging / PROPRIO_FILE)
    return Path(directory)
