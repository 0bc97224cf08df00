"""The look-alike factory, the strict loader and its errors, an independently written checkpoint, the 7B shape."""

import json
import math
import shutil

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lookalike_writer import TINY, TINY_HEADS, reference_shapes, write_lookalike_checkpoint
from vla_actor import load_policy, make_tiny_checkpoint
from vla_actor.openvla_7b import PARAMETERS_7B, TENSORS_7B, build_openvla_7b, checkpoint_shapes

torch.set_num_threads(1)
RELEASED_FILES = {"config.json", "dataset_statistics.json", "model.safetensors.index.json", "added_tokens.json",
                  "generation_config.json", "preprocessor_config.json", "processor_config.json",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "openvla", variant="openvla")


@pytest.fixture(scope="module")
def tiny_oft(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "oft", variant="oft")


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


def images(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)


def test_factory_layout(tiny, tiny_oft):
    files = {p.name for p in tiny.iterdir()}
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert RELEASED_FILES <= files and len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in index["weight_map"]
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["pad_to_multiple_of"] == 64
    assert config["text_config"]["vocab_size"] == 32064 and "rms_norm_eps" not in config["text_config"]
    assert json.loads((tiny / "added_tokens.json").read_text()) == {"<PAD>": 32000}
    normalize = json.loads((tiny / "preprocessor_config.json").read_text())["tvf_normalize_params"]
    assert normalize[0]["mean"] == [0.484375, 0.455078125, 0.40625]
    assert list(json.loads((tiny / "dataset_statistics.json").read_text())) == ["libero_spatial"]
    proprio = torch.load(next(tiny_oft.glob("proprio_projector--*.pt")), weights_only=True)
    assert proprio["fc1.weight"].shape[1] == 8
    assert not list(tiny.glob("proprio_projector--*.pt"))


def test_factory_keys_follow_reference(tiny):
    """Names and shapes equal REF 2's list at the factory's tiny dims."""
    config = json.loads((tiny / "config.json").read_text())
    dino, siglip = config["timm_model_kwargs"]
    text = config["text_config"]
    expected = reference_shapes(dino["embed_dim"], dino["depth"], siglip["embed_dim"], siglip["depth"],
                                text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"])
    found = {}
    for shard in tiny.glob("model-*.safetensors"):
        found.update({k: tuple(v.shape) for k, v in load_file(shard).items()})
    assert found == expected


def test_tokenizer(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny, config=LlamaConfig())
    assert len(tokenizer) == 32001 and tokenizer.vocab_size == 32000
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == \
        [0, 1, 2, 32000]
    assert tokenizer.convert_ids_to_tokens(29871) == "▁"
    ids = tokenizer("In: What action should the robot take to pick up the bowl?\nOut:").input_ids
    assert ids[0] == 1 and 2 not in ids and tokenizer.decode(ids[1:]).endswith("bowl?\nOut:")


def test_load_both_variants(tiny, tiny_oft):
    policy = load_policy(tiny, "libero_spatial")
    assert (policy.is_oft, policy.tokens_per_query, policy.num_images, policy.uses_proprio) == (False, 7, 1, False)
    assert policy.model.language_model.config.rms_norm_eps == 1e-6  # LlamaConfig default fills text_config
    assert not policy.trainable_parameters()
    oft = load_policy(tiny_oft, "libero_spatial")
    assert (oft.is_oft, oft.tokens_per_query, oft.num_images, oft.uses_proprio) == (True, 56, 2, True)
    one_image = load_policy(tiny_oft, "libero_spatial", num_images=1, use_proprio=False)
    assert (one_image.num_images, one_image.uses_proprio, one_image.model.proprio_projector) == (1, False, None)
    loaded = load_file(next(tiny.glob("model-00001-*.safetensors")))
    state = policy.model.state_dict()
    for key, tensor in loaded.items():
        assert torch.equal(state[key.replace("ls1.scale_factor", "ls1.gamma").replace("ls2.scale_factor", "ls2.gamma")],
                           tensor)


def test_custom_stats_and_size_knobs(tmp_path):
    stats = {"action": {"q01": [-2.0] * 7, "q99": [2.0] * 7}}
    directory = make_tiny_checkpoint(tmp_path / "toy", unnorm_key="toy_reach", norm_stats=stats, llm_dim=32,
                                     llm_layers=1, dino_dim=16, siglip_dim=24, vit_depth=2)
    policy = load_policy(directory, "toy_reach")
    assert policy.model.language_model.config.hidden_size == 32 and policy.unnorm_key == "toy_reach"
    assert len(policy.model.vision_backbone.featurizer.blocks) == 2
    assert policy.decode(torch.tensor([[31872] * 7])).tolist() == [[0.0] * 7]  # centre 0 -> middle of [-2, 2]


def test_no_noops_fallback_and_statistics_override(tiny, tmp_path):
    directory = copy_of(tiny, tmp_path)
    statistics = json.loads((directory / "dataset_statistics.json").read_text())
    entry = statistics["libero_spatial"]
    entry["action"]["q01"], entry["action"]["q99"] = [0.0] * 7, [2.0] * 7
    (directory / "dataset_statistics.json").write_text(json.dumps({"libero_spatial_no_noops": entry}))
    policy = load_policy(directory, "libero_spatial")
    assert policy.unnorm_key == "libero_spatial_no_noops"
    # dataset_statistics.json replaces config.json's norm_stats: 0.5 (0 + 1) 2 + 0 = 1 on the masked dims
    assert policy.decode(torch.tensor([[31872] * 7]))[0, :6].tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="available keys: \\['libero_spatial_no_noops'\\]"):
        load_policy(directory, "libero_object")


def rewrite_shard(directory, edit):
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_missing_and_unexpected_keys(tiny, tmp_path):
    directory = copy_of(tiny, tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    removed = "language_model.lm_head.weight"
    shard = index["weight_map"].pop(removed)
    index["weight_map"]["language_model.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    rewrite_shard(directory, lambda t: t.update({"language_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"missing keys 1 \(language_model.lm_head.weight\).*"
                                         r"unexpected keys 1 \(language_model.extra.weight\)"):
        load_policy(directory)


def test_shape_mismatch(tiny, tmp_path):
    directory = copy_of(tiny, tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    key = "projector.fc3.bias"
    shard = directory / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"shape mismatch for 1 tensors \(projector.fc3.bias: file \[65\] vs "
                                         r"expected \[64\]\)"):
        load_policy(directory)


def test_missing_shard_and_missing_files(tiny, tmp_path):
    directory = copy_of(tiny, tmp_path)
    (directory / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['model-00002-of-00004.safetensors'\] listed in"):
        load_policy(directory)
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors.index.json"):
        load_policy(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_policy(directory)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        load_policy(tmp_path / "does" / "not" / "exist")


def test_key_listed_in_wrong_shard(tiny, tmp_path):
    directory = copy_of(tiny, tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["projector.fc1.weight"] = "model-00004-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00004-of-00004.safetensors lacks 1 \\(projector.fc1.weight\\)"):
        load_policy(directory)


def test_bad_configs(tiny, tiny_oft, tmp_path):
    directory = copy_of(tiny, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    for field, value, message in [("model_type", "prismatic", "expected 'openvla'"),
                                  ("timm_model_ids", ["vit_base"], "expected \\['vit_large"),
                                  ("pad_to_multiple_of", 32, "must be 32000"),
                                  ("n_action_bins", 128, "n_action_bins must be 256")]:
        (directory / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=message):
            load_policy(directory)
    oft = shutil.copytree(tiny_oft, tmp_path / "oft")
    next(oft.glob("proprio_projector--*.pt")).unlink()
    with pytest.raises(FileNotFoundError, match="uses proprio but .* has no proprio_projector--\\*.pt"):
        load_policy(oft)
    torch.save({"fc1.weight": torch.zeros(1)}, oft / "action_head--150000_checkpoint.pt")
    with pytest.raises(ValueError, match="L1-regression OFT checkpoint"):
        load_policy(oft)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_policy(tiny, attn_implementation="flash")


def test_proprio_projector_mismatch(tiny_oft, tmp_path):
    directory = shutil.copytree(tiny_oft, tmp_path / "oft")
    path = next(directory.glob("proprio_projector--*.pt"))
    state = torch.load(path, weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DDP prefix is accepted
    load_policy(directory)
    torch.save({"fc1.weight": state["fc1.weight"], "fc1.bias": state["fc1.bias"],
                "fc2.weight": state["fc2.weight"][:, :3]}, path)
    with pytest.raises(ValueError, match=r"missing keys 1 \(fc2.bias\).*shape mismatch for 1 tensors \(fc2.weight"):
        load_policy(directory)


def test_hub_id_is_not_fetched_for_a_local_directory(tiny, tmp_path, monkeypatch):
    owner = tmp_path / "openvla"
    shutil.copytree(tiny, owner / "openvla-7b")
    monkeypatch.chdir(tmp_path)
    assert load_policy("openvla/openvla-7b").tokens_per_query == 7


def test_independently_written_checkpoint(tmp_path):
    """A checkpoint written from the REF 2 key list (bf16, 3 shards, hand-written config) loads, and its
    first action token's log-probs equal a reference forward written here from REF 2.3 and 3.2."""
    directory = tmp_path / "lookalike"
    written = write_lookalike_checkpoint(directory)
    with pytest.raises(ValueError, match="'some_other_dataset'.*available keys: \\['libero_spatial'\\]"):
        load_policy(directory, "some_other_dataset")  # dataset_statistics.json replaced config norm_stats
    policy = load_policy(directory, "libero_spatial")
    frame = images(1, seed=3)
    instruction = "Pick up the Bowl"
    out = policy.sample(frame, [instruction], temperature=1.0, greedy=True)
    log_probs, _ = policy.log_probs(frame, [instruction], out.token_ids, temperature=1.0)
    assert torch.allclose(log_probs, out.log_probs, atol=1e-5)

    weights = {k: v.float() for k, v in written.items()}

    def tower(prefix, timm_id, heads, depth, **kwargs):
        vit = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=224,
                                embed_dim=weights[prefix + "pos_embed"].shape[-1], depth=depth, num_heads=heads,
                                **kwargs)
        state = {k[len(prefix):].replace("scale_factor", "gamma"): v for k, v in weights.items()
                 if k.startswith(prefix)}
        vit.load_state_dict(state, strict=True)
        return vit

    dino = tower("vision_backbone.featurizer.", "vit_large_patch14_reg4_dinov2", TINY_HEADS["dino"],
                 TINY["dino_depth"])
    siglip = tower("vision_backbone.fused_featurizer.", "vit_so400m_patch14_siglip_224", TINY_HEADS["siglip"],
                   TINY["siglip_depth"])
    x = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255
    dino_in = (x - torch.tensor([0.484375, 0.455078125, 0.40625]).view(1, 3, 1, 1)) / \
        torch.tensor([0.228515625, 0.2236328125, 0.224609375]).view(1, 3, 1, 1)
    dino_features = dino.get_intermediate_layers(dino_in, n={TINY["dino_depth"] - 2})[0]  # prefix tokens dropped
    siglip_features = siglip.get_intermediate_layers((x - 0.5) / 0.5, n={TINY["siglip_depth"] - 2})[0]
    fused = torch.cat([dino_features, siglip_features], dim=2)
    assert fused.shape == (1, 256, 40)
    h = F.gelu(F.linear(fused, weights["projector.fc1.weight"], weights["projector.fc1.bias"]))
    h = F.gelu(F.linear(h, weights["projector.fc2.weight"], weights["projector.fc2.bias"]))
    patches = F.linear(h, weights["projector.fc3.weight"], weights["projector.fc3.bias"])

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32064, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=TINY_HEADS["llm"], pad_token_id=32000))
    llm.load_state_dict({k[len("language_model."):]: v for k, v in weights.items()
                         if k.startswith("language_model.")}, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, config=LlamaConfig())
    ids = tokenizer(f"In: What action should the robot take to {instruction.lower()}?\nOut:").input_ids + [29871]
    text = llm.get_input_embeddings()(torch.tensor([ids]))
    embeddings = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
    logits = llm(inputs_embeds=embeddings).logits[0, -1, 31744:32000]
    expected = torch.log_softmax(logits, dim=-1)[out.token_ids[0, 0] - 31744]
    assert out.token_ids[0, 0] == 31744 + int(logits.argmax())
    assert torch.allclose(out.log_probs[0, 0], expected, atol=1e-5)


def test_7b_shapes_on_meta_device():
    model = build_openvla_7b(device="meta")
    shapes = checkpoint_shapes(model)
    assert len(shapes) == TENSORS_7B == 982
    assert sum(math.prod(s) for s in shapes.values()) == PARAMETERS_7B == 7_541_237_184
    assert shapes == reference_shapes()
    assert all(p.device.type == "meta" for p in model.parameters())
    config = model.language_model.config
    assert (config.rms_norm_eps, config.hidden_size, config.num_hidden_layers, config.vocab_size) == \
        (1e-6, 4096, 32, 32064)
