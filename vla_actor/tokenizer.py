"""The Llama-2 tokenizer files of a checkpoint: reading them, and writing them so that OpenVLA's own stack
(transformers 4.40.1 / tokenizers 0.19.1) reads the export too.

A checkpoint's tokenizer.json is used as it is. Without one, the tokenizer is built from tokenizer.model with the
BPE merges ranked by the SentencePiece piece scores, as SentencePiece itself (and transformers 4.x's conversion)
applies them: transformers 5's own conversion ranks them by vocabulary order, which puts Llama-2's whitespace
pieces ("▁▁" = 259, score -1e9) first and splits "pots  on" into "▁▁" "on" instead of "▁" "▁on".
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# Every tokenizer file a released checkpoint or an OpenVLA fine-tune export may hold; exports carry them verbatim.
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
SPACE_PIECE = "▁"
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
_BPE = sentencepiece_model_pb2.TrainerSpec.ModelType.BPE


def load_tokenizer(directory: Path, llama_config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with its tokenizer_config.json / special_tokens_map.json / added_tokens.json applied.

    The backend is handed over as an object so that transformers 5 keeps tokenizer.json's pipeline (its Llama
    class would otherwise swap the normaliser for a Metaspace that adds no "▁" before a leading space), and
    `llama_config` so that config.json's remote-code auto_map is never read.
    """
    if (directory / TOKENIZER_JSON).is_file():
        backend = Tokenizer.from_file(str(directory / TOKENIZER_JSON))
    elif (directory / SENTENCEPIECE_MODEL).is_file():
        backend = sentencepiece_backend(directory / SENTENCEPIECE_MODEL)
    else:
        raise FileNotFoundError(f"{directory} has no tokenizer: expected {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}; "
                                f"copy them from the checkpoint it was fine-tuned from (e.g. openvla/openvla-7b)")
    return AutoTokenizer.from_pretrained(directory, config=llama_config, trust_remote_code=False,
                                         tokenizer_object=backend)


def sentencepiece_backend(path: Path) -> Tokenizer:
    """A `tokenizers` BPE equal to the SentencePiece BPE model at `path` (Llama-2's normalisation: identity, a
    dummy-prefix "▁", whitespace kept, byte fallback), laid out as Llama-2's released tokenizer.json."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    normalizer = proto.normalizer_spec
    if proto.trainer_spec.model_type != _BPE or not proto.trainer_spec.byte_fallback or \
            normalizer.name != "identity" or not normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces:
        raise ValueError(f"{path} is not a Llama-2 style SentencePiece model (BPE, byte fallback, identity "
                         f"normalisation, dummy prefix, whitespace kept); add the checkpoint's {TOKENIZER_JSON}")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges_by_score(proto.pieces, vocab),
                                   unk_token=proto.pieces[proto.trainer_spec.unk_id].piece, fuse_unk=True,
                                   byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, proto.trainer_spec.bos_id)])
    backend.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False) for piece in proto.pieces
                                if piece.type in (_PIECE.CONTROL, _PIECE.UNKNOWN)])
    return backend


def merges_by_score(pieces, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces of the vocabulary, best piece score first; ties keep the
    vocabulary order of the merged piece, then of its left and right parts (transformers 4.x's order)."""
    merges = []
    for piece in pieces:
        if piece.type != _PIECE.NORMAL:
            continue
        text = piece.piece
        splits = [(text[:cut], text[cut:]) for cut in range(1, len(text))
                  if text[:cut] in vocab and text[cut:] in vocab]
        splits.sort(key=lambda split: (vocab[split[0]], vocab[split[1]]))
        merges += [(piece.score, left, right) for left, right in splits]
    merges.sort(key=lambda merge: merge[0], reverse=True)
    return [(left, right) for _, left, right in merges]


def legacy_tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> str:
    """tokenizer.json with the BPE merges as "left right" strings: tokenizers >= 0.20 writes [left, right] pairs,
    which tokenizers 0.19 (OpenVLA's stack) rejects; both read the string form."""
    content = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = content["model"].get("merges", [])
    if any(" " in part for merge in merges for part in merge):
        raise ValueError("a BPE merge contains a space, which the legacy tokenizer.json merge format cannot hold")
    content["model"]["merges"] = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
    return json.dumps(content, ensure_ascii=False, indent=2) + "\n"


def carried_files(directory: Path) -> dict[str, bytes]:
    """File name -> content of the checkpoint's tokenizer files and remote-code files (*.py beside config.json),
    which exports write back byte for byte."""
    names = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    names += sorted(path.name for path in directory.glob("*.py") if path.is_file())
    return {name: (directory / name).read_bytes() for name in names}
