"""Tiny look-alike checkpoints: the released file layout, config fields and key names (REF 1, 2), tiny dims.

The vocabulary stays 32064 (32000 Llama pieces + <PAD> + 63 padding rows), so the token arithmetic of the
real model (action ids 31744..31999, "▁" = 29871, <PAD> = 32000) is exercised unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import LlamaTokenizerFast, PreTrainedTokenizerBase

from vla_actor.action_tokens import LLAMA_VOCAB_SIZE
from vla_actor.checkpoint import PREPROCESSOR_CONFIG, dtype_name, released_config, write_checkpoint
from vla_actor.model import ModelSpec, build_model, checkpoint_tensors

SPACE_PIECE = "▁"
SPACE_PIECE_ID = 29871
# Words of the prompt and of LIBERO instructions get whole-word pieces, as a real Llama vocabulary has.
WORDS = ("In", "What", "action", "should", "the", "robot", "take", "to", "Out", "pick", "up", "put", "place",
         "it", "on", "in", "and", "black", "bowl", "plate", "open", "close", "top", "drawer", "of", "cabinet",
         "turn", "stove", "push", "between", "next", "box", "ramekin", "cookie", "wooden", "tray")
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()/"


def bounds_stats(q01: list[float], q99: list[float], mask: list[bool] | None = None) -> dict:
    """A REF 1.3 statistics entry from q01/q99 bounds; min/max/mean/std are derived from them (illustrative)."""
    entry = {"q01": q01, "q99": q99, "min": q01, "max": q99,
             "mean": [(lo + hi) / 2 for lo, hi in zip(q01, q99)], "std": [(hi - lo) / 4 for lo, hi in zip(q01, q99)]}
    return entry if mask is None else {**entry, "mask": mask}


# libero_spatial action bounds of the OpenVLA release (REF 1.3); the 8-D proprio bounds are illustrative values
# around the OFT-style means that REF 1.3 quotes, since the released OpenVLA file holds only zeros there.
LIBERO_SPATIAL_STATS = {
    "action": {
        **bounds_stats(
            q01=[-0.7454732114076613, -0.6616071462631226, -0.9375, -0.1071428582072258, -0.20678570866584778,
                 -0.1842857152223587, 0.0],
            q99=[0.9375, 0.8758928775787354, 0.9321428537368774, 0.1039285734295845, 0.17678570747375488,
                 0.14571428298950195, 1.0],
            mask=[True, True, True, True, True, True, False]),
        "min": [-0.9375, -0.9375, -0.9375, -0.1875, -0.3675000071525574, -0.36000001430511475, 0.0],
        "max": [0.9375, 0.9375, 0.9375, 0.1971428543329239, 0.33642858266830444, 0.375, 1.0],
    },
    "proprio": bounds_stats(q01=[-0.25, -0.15, 0.90, 2.80, -0.60, -0.40, 0.0, -0.042],
                            q99=[0.20, 0.35, 1.25, 3.30, 0.40, 0.25, 0.042, 0.0]),
    "num_transitions": 52970,
    "num_trajectories": 432,
}


def build_llama_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama-2-style fast tokenizer with exactly 32000 pieces plus <PAD> = 32000.

    Layout as in Llama-2: <unk>=0, <s>=1, </s>=2, byte fallback pieces <0x00>..<0xFF> = 3..258, merged word
    pieces, "▁" = 29871 followed by single characters; the remaining ids are filled with single CJK/Hangul
    characters (as the real vocabulary's tail is), so ids 31744..31999 are ordinary pieces.
    """
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = SPACE_PIECE
        for character in word:
            merges.append((piece, character))
            piece += character
            vocab.setdefault(piece, len(vocab))
    fillers = (chr(code) for code in [*range(0x4E00, 0x9FA6), *range(0xAC00, 0xD7A4)])
    while len(vocab) < SPACE_PIECE_ID:
        vocab[next(fillers)] = len(vocab)
    vocab[SPACE_PIECE] = SPACE_PIECE_ID
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    while len(vocab) < LLAMA_VOCAB_SIZE:
        vocab[next(fillers)] = len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                   byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE),
                                               normalizers.Replace(" ", SPACE_PIECE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer = LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   legacy=False, add_bos_token=True, add_eos_token=False, model_max_length=2048,
                                   padding_side="right", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def tiny_config(norm_stats: dict, *, variant: str = "openvla", llm_dim: int = 64, llm_layers: int = 2,
                llm_heads: int = 4, dino_dim: int = 32, siglip_dim: int = 48, vit_depth: int = 3,
                vit_heads: int = 2, num_images: int = 2, use_proprio: bool = True, init_std: float = 0.2,
                dtype: torch.dtype = torch.float32) -> dict:
    """The released config.json with tiny dims: text_config stays a diff against LlamaConfig defaults, and
    "timm_model_kwargs" (the one added field) shrinks the two timm towers."""
    if variant not in ("openvla", "oft"):
        raise ValueError(f"variant must be 'openvla' or 'oft', got {variant!r}")
    for dim_name, dim, heads_name, heads in (("llm_dim", llm_dim, "llm_heads", llm_heads),
                                             ("dino_dim", dino_dim, "vit_heads", vit_heads),
                                             ("siglip_dim", siglip_dim, "vit_heads", vit_heads)):
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"{dim_name} ({dim}) must be a positive multiple of {heads_name} ({heads})")
    config = released_config(norm_stats, dtype_name(dtype))
    config["text_config"].update(hidden_size=llm_dim, intermediate_size=llm_dim * 11 // 4,
                                 num_hidden_layers=llm_layers, num_attention_heads=llm_heads,
                                 initializer_range=init_std)
    config["timm_model_kwargs"] = [dict(embed_dim=dino_dim, depth=vit_depth, num_heads=vit_heads),
                                   dict(embed_dim=siglip_dim, depth=vit_depth, num_heads=vit_heads)]
    if variant == "oft":
        config.update(use_proprio=use_proprio, proprio_dim=8, num_images_in_input=num_images)
    return config


def make_tiny_checkpoint(directory: str | os.PathLike, variant: str = "openvla", unnorm_key: str = "libero_spatial",
                         seed: int = 0, *, norm_stats: dict | None = None, llm_dim: int = 64, llm_layers: int = 2,
                         llm_heads: int = 4, dino_dim: int = 32, siglip_dim: int = 48, vit_depth: int = 3,
                         vit_heads: int = 2, num_images: int = 2, use_proprio: bool = True, init_std: float = 0.2,
                         dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2_000_000) -> Path:
    """Write a randomly initialised look-alike of a released checkpoint into `directory` and return it.

    variant: "openvla" (7 autoregressive action tokens) or "oft" (parallel 8x7 tokens; `num_images` 1 or 2,
      a proprio projector file when `use_proprio`).
    norm_stats: statistics stored under `unnorm_key` (structure of REF 1.3); default libero_spatial's.
    llm_dim / llm_layers / llm_heads / dino_dim / siglip_dim / vit_depth / vit_heads: the size knobs; the rest of
      the network follows the released layout (Llama MLP 11/4 llm_dim, ViT MLP ratios, projector 4x vision width).
    init_std: Llama initializer_range only; 0.2 (not Llama's 0.02) so the random policy's action distribution
      depends on its inputs and is not uniform. The ViTs keep timm's initialisation (truncated normal 0.02,
      DINOv2 LayerScale 1e-5) and the projectors PyTorch's nn.Linear default, whatever init_std is.
    max_shard_bytes: shard size limit; the default splits the tiny weights into several shards.
    """
    if num_images not in (1, 2):
        raise ValueError(f"num_images must be 1 or 2, got {num_images}")
    stats = {unnorm_key: LIBERO_SPATIAL_STATS if norm_stats is None else norm_stats}
    config = tiny_config(stats, variant=variant, llm_dim=llm_dim, llm_layers=llm_layers, llm_heads=llm_heads,
                         dino_dim=dino_dim, siglip_dim=siglip_dim, vit_depth=vit_depth, vit_heads=vit_heads,
                         num_images=num_images, use_proprio=use_proprio, init_std=init_std, dtype=dtype)
    with_proprio = variant == "oft" and use_proprio
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(ModelSpec.from_config(config, proprio_dim=8 if with_proprio else None), dtype=dtype)
    proprio_state = model.proprio_projector.state_dict() if with_proprio else None
    return write_checkpoint(directory, config, checkpoint_tensors(model).items(), build_llama_tokenizer(), stats,
                            PREPROCESSOR_CONFIG, proprio_state=proprio_state, max_shard_bytes=max_shard_bytes)
