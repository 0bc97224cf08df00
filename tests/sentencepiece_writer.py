"""A Llama-2-layout SentencePiece tokenizer.model trained on the fly, and the 12 prompts the tokenizer tests use.

SentencePiece trains a small BPE model with Llama-2's normaliser settings; its pieces are then laid out as in
Llama-2's 32000-piece model: <unk> <s> </s>, the 256 byte pieces, whitespace-only pieces with score -1e9 (as
Llama-2 has "▁▁" at 259), the trained pieces, "▁" at 29871, single CJK / Hangul character fillers elsewhere.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

LLAMA_PIECES = 32000
SPACE_PIECE_ID = 29871
WORDS = ("pick up the black bowl between plate and ramekin place it on open top drawer of wooden cabinet put moka "
         "pots stove turn alphabet soup basket tomato sauce cream cheese wine bottle rack in what action should "
         "robot take to out").split()
PROMPTS = [
    "In: What action should the robot take to pick up the black bowl between the plate and the ramekin?\nOut:",
    "In: What action should the robot take to put both moka pots  on the stove?\nOut:",
    "Put The Wine Bottle On Top Of The Cabinet",
    "open the top drawer 2 of 3, then 10 more",
    "don't put it in the robot's basket",
    "a  b   c    d",
    "turn\ton the stove",
    "place the bowl on the plate\n\nthen stop",
    "pick up the café crème — ça va?",
    "put the 漢字 box on the rack",
    "stack the 🍅 tomato sauce",
    "  leading and trailing spaces  ",
]


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for index in range(3000):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        if index % 5 == 0:
            line = line.title()
        if index % 11 == 0:
            line = line.replace(" ", "  ", 1)
        if index % 13 == 0:
            line += f" {rng.randint(0, 999)}, don't"
        lines.append(line)
    return lines


def write_llama_sentencepiece(path: Path) -> Path:
    """Train the model and write it, laid out as Llama-2's tokenizer.model, to `path`."""
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buffer, model_type="bpe", vocab_size=600, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    trained = sentencepiece_model_pb2.ModelProto()
    trained.ParseFromString(buffer.getvalue())
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    head = list(trained.pieces[:259])  # <unk> <s> </s> <0x00>..<0xFF>
    learned = [piece for piece in trained.pieces[259:] if piece.piece.strip("▁")]
    whitespace = [piece_type(piece=text, score=-1e9, type=piece_type.NORMAL) for text in ("▁▁", "▁▁▁▁")]
    space = [piece for piece in trained.pieces if piece.piece == "▁"]
    assert len(space) == 1
    known = {piece.piece for piece in trained.pieces}
    fillers = (chr(code) for code in [*range(0x4E00, 0x9FA6), *range(0xAC00, 0xD7A4)] if chr(code) not in known)

    def filler() -> sentencepiece_model_pb2.ModelProto.SentencePiece:
        return piece_type(piece=next(fillers), score=-1e6, type=piece_type.NORMAL)

    pieces = head + whitespace + learned
    pieces += [filler() for _ in range(SPACE_PIECE_ID - len(pieces))] + space
    pieces += [filler() for _ in range(LLAMA_PIECES - len(pieces))]
    del trained.pieces[:]
    trained.pieces.extend(pieces)
    path.write_bytes(trained.SerializeToString())
    return path
