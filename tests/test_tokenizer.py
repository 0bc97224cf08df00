"""Tokenizer files: tokenizer.json or tokenizer.model (checked against SentencePiece's own encoding on a model
trained here), exports that carry the source's files verbatim, and the tokenizer.json form tokenizers 0.19 reads."""

import json
import shutil

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig

from sentencepiece_writer import PROMPTS, write_llama_sentencepiece
from trainer.fsdp import write_model
from vla_actor import LoraSettings, load_policy, make_tiny_checkpoint
from vla_actor.checkpoint import ADDED_TOKENS, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG
from vla_actor.policy import prompt_text
from vla_actor.tokenizer import legacy_tokenizer_json, load_tokenizer

torch.set_num_threads(1)
SIDE_FILES = {"tokenizer_config.json": TOKENIZER_CONFIG, "added_tokens.json": ADDED_TOKENS,
              "special_tokens_map.json": SPECIAL_TOKENS_MAP}


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return write_llama_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "openvla", variant="openvla")


def mirror_directory(directory, sentencepiece_model):
    """tokenizer.model and the three small files, no tokenizer.json (as some mirrors and exports have it)."""
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.json").unlink(missing_ok=True)
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    for name, content in SIDE_FILES.items():
        (directory / name).write_text(json.dumps(content))
    return directory


def test_tokenizer_model_alone_encodes_as_sentencepiece(sentencepiece_model, tmp_path):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tokenizer = load_tokenizer(mirror_directory(tmp_path / "mirror", sentencepiece_model), LlamaConfig())
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.pad_token_id) == (32001, 1, 32000)
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids == [1] + reference.encode(prompt), prompt
    assert {198, 172} <= set(tokenizer("café").input_ids)  # <0xC3> <0xA9>: "é" is not a piece, byte fallback
    # "▁▁" is piece 259 with score -1e9: ranked by vocabulary order it would be merged first
    double_space = tokenizer("moka pots  on").input_ids
    assert tokenizer.convert_ids_to_tokens(double_space[-2:]) == ["▁", "▁on"] and 259 not in double_space
    assert reference.id_to_piece(259) == "▁▁"


def test_released_style_checkpoint_gives_the_original_prompt_ids(tiny, sentencepiece_model, tmp_path):
    """Both layouts (tokenizer.json beside tokenizer.model, tokenizer.model alone) through load_policy's prompt
    path: BOS + SentencePiece ids + 29871, as OpenVLA's predict_action builds them."""
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    instructions = [prompt.split("take to ")[-1].removesuffix("?\nOut:") for prompt in PROMPTS]
    expected = [[1] + reference.encode(prompt_text(text)) + [29871] for text in instructions]
    mirror = mirror_directory(shutil.copytree(tiny, tmp_path / "mirror"), sentencepiece_model)
    assert load_policy(mirror).prompt_ids(instructions) == expected
    released = shutil.copytree(mirror, tmp_path / "released")
    (released / "tokenizer.json").write_text(legacy_tokenizer_json(load_tokenizer(mirror, LlamaConfig())))
    assert load_policy(released).prompt_ids(instructions) == expected


def test_no_tokenizer_file_is_one_clear_error(tiny, tmp_path):
    directory = shutil.copytree(tiny, tmp_path / "copy")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer: expected tokenizer.json or tokenizer.model; "
                                                "copy them from the checkpoint"):
        load_policy(directory)


def test_export_carries_tokenizer_and_remote_code_files(tiny, sentencepiece_model, tmp_path):
    source = mirror_directory(shutil.copytree(tiny, tmp_path / "source"), sentencepiece_model)
    (source / "modeling_prismatic.py").write_text("# remote code of the source checkpoint\n")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    (source / "config.json").write_text(json.dumps(config))
    policy = load_policy(source)
    full = tmp_path / "full_fine_tuning"
    write_model(policy, policy.model.state_dict(), full)
    policy.apply_lora(LoraSettings(rank=2))
    export = policy.merge_and_export(tmp_path / "export")
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                 "modeling_prismatic.py"):
        assert (export / name).read_bytes() == (source / name).read_bytes(), name
        assert (full / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((export / "config.json").read_text())["auto_map"] == config["auto_map"]
    # the source had no tokenizer.json: the export gets one, in the legacy merge form, encoding as the source
    merges = json.loads((export / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(merge, str) and merge.count(" ") == 1 for merge in merges)
    assert load_policy(export).prompt_ids(PROMPTS) == policy.prompt_ids(PROMPTS)
    carried = load_policy(export).merge_and_export(tmp_path / "again")
    assert (carried / "tokenizer.json").read_bytes() == (export / "tokenizer.json").read_bytes()


def test_lookalike_export_writes_legacy_tokenizer_json(tiny, tmp_path):
    export = load_policy(tiny).merge_and_export(tmp_path / "export")
    content = json.loads((export / "tokenizer.json").read_text())
    assert all(isinstance(merge, str) for merge in content["model"]["merges"])
    backend = Tokenizer.from_file(str(export / "tokenizer.json"))
    assert [backend.encode(prompt).ids for prompt in PROMPTS] == load_policy(tiny).tokenizer(PROMPTS).input_ids
