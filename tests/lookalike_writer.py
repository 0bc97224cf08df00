"""An OpenVLA look-alike checkpoint written straight from REF sections 1-2, without vla_actor.

The key list below is transcribed from REF 2.1-2.5 (not derived from any model object), the config is a
hand-written dict of REF 1.2 fields, and the tokenizer is built here with the `tokenizers` library, so that a
loader passing on this directory is proven against the format rather than against its own writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast


def reference_shapes(dino_dim: int = 1024, dino_depth: int = 24, siglip_dim: int = 1152, siglip_depth: int = 27,
                     llm_dim: int = 4096, llm_layers: int = 32, llm_mlp: int = 11008,
                     vocab: int = 32064) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of REF section 2 (defaults = the real 7B dims)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dino = "vision_backbone.featurizer."
    shapes[dino + "cls_token"] = (1, 1, dino_dim)
    shapes[dino + "reg_token"] = (1, 4, dino_dim)
    shapes[dino + "pos_embed"] = (1, 256, dino_dim)
    shapes[dino + "patch_embed.proj.weight"] = (dino_dim, 3, 14, 14)
    shapes[dino + "patch_embed.proj.bias"] = (dino_dim,)
    for i in range(dino_depth):
        block = f"{dino}blocks.{i}."
        shapes[block + "norm1.weight"] = shapes[block + "norm1.bias"] = (dino_dim,)
        shapes[block + "attn.qkv.weight"] = (3 * dino_dim, dino_dim)
        shapes[block + "attn.qkv.bias"] = (3 * dino_dim,)
        shapes[block + "attn.proj.weight"] = (dino_dim, dino_dim)
        shapes[block + "attn.proj.bias"] = (dino_dim,)
        shapes[block + "ls1.scale_factor"] = (dino_dim,)
        shapes[block + "norm2.weight"] = shapes[block + "norm2.bias"] = (dino_dim,)
        shapes[block + "mlp.fc1.weight"] = (4 * dino_dim, dino_dim)
        shapes[block + "mlp.fc1.bias"] = (4 * dino_dim,)
        shapes[block + "mlp.fc2.weight"] = (dino_dim, 4 * dino_dim)
        shapes[block + "mlp.fc2.bias"] = (dino_dim,)
        shapes[block + "ls2.scale_factor"] = (dino_dim,)
    shapes[dino + "norm.weight"] = shapes[dino + "norm.bias"] = (dino_dim,)

    siglip = "vision_backbone.fused_featurizer."
    siglip_mlp = int(siglip_dim * 3.7362)
    shapes[siglip + "pos_embed"] = (1, 256, siglip_dim)
    shapes[siglip + "patch_embed.proj.weight"] = (siglip_dim, 3, 14, 14)
    shapes[siglip + "patch_embed.proj.bias"] = (siglip_dim,)
    for i in range(siglip_depth):
        block = f"{siglip}blocks.{i}."
        shapes[block + "norm1.weight"] = shapes[block + "norm1.bias"] = (siglip_dim,)
        shapes[block + "attn.qkv.weight"] = (3 * siglip_dim, siglip_dim)
        shapes[block + "attn.qkv.bias"] = (3 * siglip_dim,)
        shapes[block + "attn.proj.weight"] = (siglip_dim, siglip_dim)
        shapes[block + "attn.proj.bias"] = (siglip_dim,)
        shapes[block + "norm2.weight"] = shapes[block + "norm2.bias"] = (siglip_dim,)
        shapes[block + "mlp.fc1.weight"] = (siglip_mlp, siglip_dim)
        shapes[block + "mlp.fc1.bias"] = (siglip_mlp,)
        shapes[block + "mlp.fc2.weight"] = (siglip_dim, siglip_mlp)
        shapes[block + "mlp.fc2.bias"] = (siglip_dim,)
    shapes[siglip + "norm.weight"] = shapes[siglip + "norm.bias"] = (siglip_dim,)
    pool = siglip + "attn_pool."
    shapes[pool + "latent"] = (1, 1, siglip_dim)
    shapes[pool + "q.weight"] = (siglip_dim, siglip_dim)
    shapes[pool + "q.bias"] = (siglip_dim,)
    shapes[pool + "kv.weight"] = (2 * siglip_dim, siglip_dim)
    shapes[pool + "kv.bias"] = (2 * siglip_dim,)
    shapes[pool + "proj.weight"] = (siglip_dim, siglip_dim)
    shapes[pool + "proj.bias"] = (siglip_dim,)
    shapes[pool + "norm.weight"] = shapes[pool + "norm.bias"] = (siglip_dim,)
    shapes[pool + "mlp.fc1.weight"] = (siglip_mlp, siglip_dim)
    shapes[pool + "mlp.fc1.bias"] = (siglip_mlp,)
    shapes[pool + "mlp.fc2.weight"] = (siglip_dim, siglip_mlp)
    shapes[pool + "mlp.fc2.bias"] = (siglip_dim,)

    vision_dim = dino_dim + siglip_dim
    shapes["projector.fc1.weight"] = (4 * vision_dim, vision_dim)
    shapes["projector.fc1.bias"] = (4 * vision_dim,)
    shapes["projector.fc2.weight"] = (llm_dim, 4 * vision_dim)
    shapes["projector.fc2.bias"] = (llm_dim,)
    shapes["projector.fc3.weight"] = (llm_dim, llm_dim)
    shapes["projector.fc3.bias"] = (llm_dim,)

    shapes["language_model.model.embed_tokens.weight"] = (vocab, llm_dim)
    for i in range(llm_layers):
        layer = f"language_model.model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}self_attn.{name}.weight"] = (llm_dim, llm_dim)
        shapes[layer + "mlp.gate_proj.weight"] = (llm_mlp, llm_dim)
        shapes[layer + "mlp.up_proj.weight"] = (llm_mlp, llm_dim)
        shapes[layer + "mlp.down_proj.weight"] = (llm_dim, llm_mlp)
        shapes[layer + "input_layernorm.weight"] = (llm_dim,)
        shapes[layer + "post_attention_layernorm.weight"] = (llm_dim,)
    shapes["language_model.model.norm.weight"] = (llm_dim,)
    shapes["language_model.lm_head.weight"] = (vocab, llm_dim)
    return shapes


TINY = dict(dino_dim=16, dino_depth=3, siglip_dim=24, siglip_depth=4, llm_dim=32, llm_layers=2, llm_mlp=80)
TINY_HEADS = dict(dino=2, siglip=2, llm=4)


def _tokenizer() -> PreTrainedTokenizerFast:
    """32000 pieces: <unk> <s> </s>, 256 byte pieces, letters, "▁" at 29871, numbered filler pieces elsewhere."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?")
    pieces += [f"piece{i}" for i in range(29871 - len(pieces))]
    pieces += ["▁"] + [f"tail{i}" for i in range(32000 - 29872)]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.add_special_tokens([AddedToken("<PAD>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<PAD>")


def write_lookalike_checkpoint(directory: Path, unnorm_key: str = "libero_spatial",
                               seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the directory; return the tensors written (file key -> bf16 tensor)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in reference_shapes(**TINY).items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
            tensor = torch.ones(shape)
        elif name.endswith("scale_factor"):
            tensor = torch.full(shape, 0.5)
        else:
            tensor = 0.2 * torch.randn(shape, generator=generator)
        tensors[name] = tensor.to(torch.bfloat16)
    shard_of = {name: (1 if name.startswith("vision_backbone.") else 3 if "lm_head" in name else 2) for name in tensors}
    for shard in (1, 2, 3):
        save_file({k: v for k, v in tensors.items() if shard_of[k] == shard},
                  directory / f"model-0000{shard}-of-00003.safetensors", metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {k: f"model-0000{shard_of[k]}-of-00003.safetensors" for k in tensors}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    statistics = {unnorm_key: {
        "action": {"q01": [-0.5, -0.5, -0.5, -0.1, -0.1, -0.1, 0.0], "q99": [0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 1.0],
                   "mask": [True, True, True, True, True, True, False]},
        "proprio": {"q01": [0.0] * 7, "q99": [0.0] * 7}, "num_transitions": 10, "num_trajectories": 1}}
    config = {
        "model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True, "image_sizes": [224, 224],
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None], "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048, "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256,
        "output_projector_states": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "norm_stats": {"some_other_dataset": statistics[unnorm_key]},
        "timm_model_kwargs": [{"embed_dim": 16, "depth": 3, "num_heads": TINY_HEADS["dino"]},
                              {"embed_dim": 24, "depth": 4, "num_heads": TINY_HEADS["siglip"]}],
        "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064,
                        "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 2,
                        "num_attention_heads": TINY_HEADS["llm"]},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "dataset_statistics.json").write_text(json.dumps(statistics, indent=2))
    (directory / "added_tokens.json").write_text('{"<PAD>": 32000}')
    _tokenizer().save_pretrained(directory)
    return tensors
