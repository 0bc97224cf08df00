"""A quantized frozen base (--base-quant, vla_actor.quant) on the tiny look-alike, float32 compute on the CPU:
closeness to the unquantized model, the sampling invariants inside the quantized model, LoRA training on top, the
merged export and the one-line errors. The GPU-only modes and the 7B shape are in tests/test_vla_gpu.py."""

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from trained_adapters import apply_trained_adapter

from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import LoraConfig, ModelConfig
from trainer.policy_builder import build_policy
from trainer.validation import check_model
from vla_actor import load_policy, make_tiny_checkpoint
from vla_actor.checkpoint import CONFIG_FILE, read_json
from vla_actor.model import EMPTY_PARTS, ModelSpec, build_model, fill
from vla_actor.openvla_7b import random_language_model
from vla_actor.policy import file_tensors
from vla_actor.fused_kernels import lora_linear
from vla_actor.quant import (Float8Linear, check_base_quant, dequantize, is_quantized, quantize_layer,
                             quantized_layer_names, quantized_weight_bytes)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
torch.set_num_threads(1)
INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "open the drawer", "turn on the stove"]
WEIGHT_ERROR_BOUND = {"int8": 0.5, "nf4": 0.16}
"""|W - dequantized W| over the scale of W's group, hand-computed: int8 rounds to the nearest of 127 steps per
row absmax (half a step, measured 0.498); nf4 to the nearest of QLoRA's 16 NormalFloat codes per block absmax, the
widest gap (-1 to -0.6962) giving 0.152, plus the 8-bit double quantization of the block scales (measured 0.154)."""
LOG_PROB_TOLERANCE = {"int8": 0.2, "nf4": 2.5}
"""Largest |log-prob difference| to the unquantized tiny model over 21 greedy action tokens, measured on a 2-core
Intel Xeon: int8 mean 0.037 max 0.095, nf4 mean 0.44 max 1.57 nats (random tiny weights are more sensitive than the
7B's; the GPU bench measures the 7B). The exact check is the one against the dequantized weights."""
FP8_DYNAMIC_LOG_PROB_TOLERANCE = 0.5
"""The same for fp8-dynamic, whose activations are rounded to e4m3 too: measured mean 0.10, max 0.23 nats."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "openvla")


def images(batch=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)


def quantized(checkpoint, mode, include_vision=False):
    return load_policy(checkpoint, base_quant=mode, base_quant_vision=include_vision)


def with_trained_adapter(policy, seed=0):
    """LoRA on the quantized base with non-zero adapters, as after some training."""
    return apply_trained_adapter(policy, seed=seed)


def greedy_log_probs(policy, tokens=None):
    frames = images()
    if tokens is None:
        tokens = policy.sample(frames, INSTRUCTIONS, greedy=True).token_ids
    with torch.no_grad():
        return tokens, policy.log_probs(frames, INSTRUCTIONS, tokens)[0]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_computes_with_its_dequantized_weights_close_to_the_originals(checkpoint, mode):
    reference = load_policy(checkpoint)
    tokens, expected = greedy_log_probs(reference)
    policy = quantized(checkpoint, mode)
    names = quantized_layer_names(policy.model, include_vision=False)
    assert len(names) == 2 * 7  # the 2 Llama layers' linears; embeddings, LM head, projector and ViTs stay as loaded
    assert all(is_quantized(policy.model.get_submodule(n).weight) for n in names)
    assert not is_quantized(policy.model.projector.fc1.weight)
    dequantized = load_policy(checkpoint)
    with torch.no_grad():
        for name in names:
            original = dequantized.model.get_submodule(name).weight
            weight = dequantize(policy.model.get_submodule(name).weight)
            groups = original.reshape(original.shape[0] if mode == "int8" else -1, -1 if mode == "int8" else 64)
            scale = groups.abs().amax(1, keepdim=True) / (127 if mode == "int8" else 1)
            assert ((weight.reshape(groups.shape) - groups).abs() / scale).max() <= WEIGHT_ERROR_BOUND[mode]
            original.copy_(weight)
    log_probs = greedy_log_probs(policy, tokens)[1]
    assert torch.allclose(log_probs, greedy_log_probs(dequantized, tokens)[1], atol=1e-5)
    difference = (log_probs - expected).abs()
    print(f"{mode}: |log-prob - unquantized| mean {difference.mean():.2e} max {difference.max():.2e}")
    assert 0 < difference.max() < LOG_PROB_TOLERANCE[mode]


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp8-dynamic"])
def test_batched_equals_single_and_rollout_equals_teacher_forced_inside_the_quantized_model(checkpoint, mode):
    policy = with_trained_adapter(quantized(checkpoint, mode, include_vision=mode == "int8"))
    frames = images()
    batched = policy.sample(frames, INSTRUCTIONS, temperature=1.6, greedy=True)
    for i in range(3):
        single = policy.sample(frames[i:i + 1], INSTRUCTIONS[i:i + 1], temperature=1.6, greedy=True)
        assert torch.equal(single.token_ids[0], batched.token_ids[i])
        assert torch.allclose(single.log_probs[0], batched.log_probs[i], atol=1e-5)
    out = policy.sample(frames, INSTRUCTIONS, temperature=1.6, generator=torch.Generator().manual_seed(0))
    log_probs, _ = policy.log_probs(frames, INSTRUCTIONS, out.token_ids, temperature=1.6)
    assert torch.allclose((log_probs - out.log_probs).exp(), torch.ones_like(log_probs), atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "fp8-dynamic"])
def test_lora_trains_on_the_quantized_base_and_the_reference_is_that_base(checkpoint, mode):
    """fp8-dynamic (its FP8 product computed in float32 on the CPU): the gradients reach every adapter through the
    base layers' input gradients (`Float8Product`), as int8's through the dequantized weights."""
    base = quantized(checkpoint, mode)
    tokens, base_log_probs = greedy_log_probs(base)
    policy = with_trained_adapter(quantized(checkpoint, mode))
    frames = images()
    log_probs, _ = policy.log_probs(frames, INSTRUCTIONS, tokens, temperature=1.6)
    log_probs.sum().backward()
    grads = {n for n, p in policy.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert grads == trainable and len(trainable) == 28 and all(".lora_" in n for n in trainable)
    with policy.adapter_disabled():
        assert torch.equal(greedy_log_probs(policy, tokens)[1], base_log_probs)


def test_build_policy_quantizes_the_base_before_the_adapter_goes_on(checkpoint, tmp_path):
    policy = build_policy(ModelConfig(checkpoint=str(checkpoint), base_quant="nf4", gradient_checkpointing=False),
                          LoraConfig(lora_rank=4), "libero_spatial", torch.device("cpu"))
    q_proj = policy.model.get_submodule("language_model.model.layers.1.self_attn.q_proj")
    assert is_quantized(q_proj.base_layer.weight) and not is_quantized(q_proj.lora_A["default"].weight)
    assert all(".lora_" in name for name, p in policy.model.named_parameters() if p.requires_grad)
    adapter = policy.save_adapter(tmp_path / "adapter")  # an eval of the adapter rebuilds the same quantized base
    reloaded = build_policy(ModelConfig(checkpoint=str(checkpoint), base_quant="nf4", adapter=adapter), None,
                            "libero_spatial", torch.device("cpu"))
    tokens, expected = greedy_log_probs(policy)
    assert torch.equal(greedy_log_probs(reloaded, tokens)[1], expected)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_merged_export_dequantizes_into_the_released_layout(checkpoint, mode, tmp_path):
    policy = with_trained_adapter(quantized(checkpoint, mode, include_vision=mode == "int8"))
    tokens, expected = greedy_log_probs(policy)
    exported = policy.merge_and_export(tmp_path / "merged")
    reloaded = load_policy(exported)
    assert not any(is_quantized(p) for p in reloaded.model.parameters())
    reloaded_tokens, reloaded_log_probs = greedy_log_probs(reloaded)
    assert torch.equal(reloaded_tokens, tokens)
    # the reload multiplies by the dequantized weight + the LoRA delta, the quantized model by the same values in
    # another order (dequantize in the kernel, LoRA on the side): float32 rounding only
    assert torch.allclose(reloaded_log_probs, expected, atol=1e-4)
    layer = "language_model.model.layers.0.self_attn.q_proj"
    base_weight = dequantize(policy.model.get_submodule(layer).base_layer.weight)
    delta = policy.model.get_submodule(layer).get_delta_weight("default")
    assert torch.allclose(reloaded.model.get_submodule(layer).weight, base_weight + delta, atol=1e-6)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of every plain tensor a (possibly torchao-wrapped) tensor is made of."""
    if hasattr(tensor, "__tensor_flatten__"):
        inner, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp8", "fp8-dynamic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 4096), (64, 48)])  # NF4 scales in blocks of 256 as in the 7B; of 16
def test_the_memory_model_knows_the_quantized_storage_to_the_byte(mode, dtype, shape):
    """fp8 weights cannot multiply on the CPU, but torchao stores them here as on the GPU."""
    layer = nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
    meta = torch.empty(shape, device="meta")
    layer = quantize_layer(layer, mode)
    assert quantized_weight_bytes(meta, mode, dtype.itemsize) == stored_bytes(layer.weight)


def test_one_line_errors(checkpoint):
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU with FP8.*use --base-quant int8 or nf4"):
        check_base_quant("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        load_policy(checkpoint, base_quant="fp8")
    with pytest.raises(ValueError, match="--base-quant must be one of none, int8, nf4, fp8"):
        check_base_quant("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        check_model(ModelConfig(checkpoint=str(checkpoint), device="cpu", base_quant="fp8"))
    check_model(ModelConfig(checkpoint=str(checkpoint), device="cpu", base_quant="nf4"))
    with pytest.raises(ValueError, match="--base-quant-vision quantizes the ViTs of a quantized base"):
        check_model(ModelConfig(checkpoint=str(checkpoint), device="cpu", base_quant_vision=True))
    with pytest.raises(ValueError, match=r"nf4 needs layers with a multiple of 64 weights; a \[179, 48\] layer"):
        load_policy(checkpoint, base_quant="nf4", base_quant_vision=True)  # the tiny ViT's MLP, before any read
    with pytest.raises(ValueError, match=r"fp8-dynamic multiplies layers whose dimensions are multiples of 16; "
                                         r"vision_backbone.fused_featurizer.blocks.0.mlp.fc1 is \[179, 48\]: use "
                                         r"--base-quant fp8 or int8"):
        load_policy(checkpoint, base_quant="fp8-dynamic", base_quant_vision=True)


def test_fp8_dynamic_on_a_gpu_without_fp8_is_a_one_line_error(monkeypatch):
    """What a 3090 (compute capability 8.6) is told; the CPU computes the same product in float32 (the tests)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ValueError) as error:
        check_base_quant("fp8-dynamic", torch.device("cuda", 0))
    assert str(error.value) == ("--base-quant fp8-dynamic needs compute capability 8.9+ (FP8 tensor cores); NVIDIA "
                                "GeForce RTX 3090 has 8.6: use --base-quant int8 or nf4 (or none)")
    check_base_quant("fp8-dynamic", torch.device("cpu"))


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao finds
    with pytest.raises(ValueError) as error:
        check_base_quant("int8", torch.device("cpu"))
    assert str(error.value) == ("--base-quant int8 needs the torchao package, which is not installed: pip install "
                                "torchao (or use --base-quant none)")


def test_each_layer_is_quantized_before_the_next_tensor_is_read(checkpoint):
    """The quantized base never exists whole in the compute dtype: while loading, every selected layer that has its
    weight already holds it quantized when the next tensor comes out of the file."""
    model = build_model(ModelSpec.from_config(read_json(checkpoint / CONFIG_FILE)), empty=EMPTY_PARTS)
    layers = [model.get_submodule(name) for name in quantized_layer_names(model, include_vision=False)]

    def watched(tensors):
        for key, tensor in tensors:
            assert not [layer for layer in layers if not layer.weight.is_meta and not is_quantized(layer.weight)]
            yield key, tensor

    fill(model, watched(file_tensors(model, checkpoint)), "cpu", "nf4")
    assert all(is_quantized(layer.weight) for layer in layers)


def test_quantized_loading_stays_strict(checkpoint, tmp_path):
    directory = shutil.copytree(checkpoint, tmp_path / "copy")
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    shard = directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(64, 128)
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"shape mismatch for 1 tensors \(language_model.model.layers.0.self_attn."
                                         r"q_proj.weight: file \[64, 128\] vs expected \[64, 64\]\)"):
        load_policy(directory, base_quant="nf4")


def test_random_language_model_is_llamas_initialisation_whatever_the_base_quant(checkpoint):
    """random_7b_policy's LLM on the tiny shape: normal(0, initializer_range) linears and embeddings with a zero
    padding row, RMSNorm weights one; the same seed gives the same weights with and without a quantized base."""
    spec = ModelSpec.from_config(read_json(checkpoint / CONFIG_FILE))
    models = {}
    for mode in ("none", "int8"):
        torch.manual_seed(0)
        models[mode] = build_model(spec, empty=("language_model",))
        fill(models[mode], random_language_model(models[mode], "cpu"), "cpu", mode)
    llm = models["none"].language_model
    assert torch.equal(llm.model.norm.weight, torch.ones(64))
    assert torch.equal(llm.model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    assert torch.equal(llm.model.embed_tokens.weight[32000], torch.zeros(64))
    assert abs(llm.model.layers[0].mlp.up_proj.weight.std() - 0.2) < 0.01  # the tiny config's initializer_range
    assert abs(llm.lm_head.weight.mean()) < 0.01
    for name in quantized_layer_names(models["none"], include_vision=False):
        weight = models["none"].get_submodule(name).weight
        reference = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        reference.weight = nn.Parameter(weight.clone(), requires_grad=False)
        quantize_layer(reference, "int8")
        assert torch.equal(dequantize(models["int8"].get_submodule(name).weight), dequantize(reference.weight))
    quantized_names = set(quantized_layer_names(models["none"], include_vision=False))
    for name, tensor in models["none"].state_dict().items():
        if name.rpartition(".")[0] not in quantized_names:
            assert torch.equal(models["int8"].state_dict()[name], tensor)


def test_fp8_dynamic_multiplies_each_token_quantized_with_its_own_scale_by_hand():
    """W = 2 I: each row's absmax 2 maps to 448, which e4m3 holds exactly, so W's codes are exact. Each input row is
    scaled by its own absmax: 1, 0.5 and -0.25 times 448 are e4m3 values (exact), 0.3 x 448 = 134.4 is not: the
    nearest e4m3 value is 128 (steps of 16 between 128 and 256), so 0.3 comes back as 128 / 448 = 2/7 and the
    product as 4/7, which the bf16 output rounds to 0.5703125 (1 + 18/128, halved). An all-zero row stays zero. The
    input's gradient is the gradient times the dequantized W: 2 g, exactly."""
    layer = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(2 * torch.eye(16))
    quantized = quantize_layer(layer, "fp8-dynamic")
    assert isinstance(quantized, Float8Linear) and is_quantized(quantized.weight)
    assert torch.equal(dequantize(quantized.weight), 2 * torch.eye(16))
    x = torch.zeros(3, 16)
    x[0, :4] = torch.tensor([1.0, 0.5, -0.25, 0.3])
    x[1, :2] = torch.tensor([-8.0, 4.0])  # another scale: -8 -> -448, 4 -> 224
    x.requires_grad_(True)
    y = quantized(x)
    expected = torch.zeros(3, 16)
    expected[0, :4] = torch.tensor([2.0, 1.0, -0.5, 0.5703125])
    expected[1, :2] = torch.tensor([-16.0, 8.0])
    assert torch.equal(y.detach(), expected)
    gradient = torch.randn(3, 16)
    y.backward(gradient)
    assert torch.equal(x.grad, 2 * gradient)
    assert not quantized.weight.requires_grad


def test_the_fused_lora_add_over_an_fp8_dynamic_base_is_peft_s_forward(checkpoint):
    """Every quantized layer is a Float8Linear, and `lora_linear`'s folded scale-and-add over one gives PEFT's output
    and input gradient."""
    base = quantized(checkpoint, "fp8-dynamic")
    names = quantized_layer_names(base.model, include_vision=False)
    assert all(isinstance(base.model.get_submodule(name), Float8Linear) for name in names)
    policy = with_trained_adapter(base)
    layer = policy.model.get_submodule("language_model.model.layers.0.mlp.down_proj")
    rows = torch.randn(5, layer.in_features)
    fused_rows, peft_rows = rows.clone().requires_grad_(True), rows.clone().requires_grad_(True)
    fused, expected = lora_linear(layer, fused_rows), layer(peft_rows)
    assert torch.allclose(fused, expected, atol=1e-5)
    fused.sum().backward()
    expected.sum().backward()
    assert torch.allclose(fused_rows.grad, peft_rows.grad, atol=1e-5)


def test_fp8_dynamic_stays_close_to_the_unquantized_model_and_exports_its_dequantized_weights(checkpoint, tmp_path):
    reference = load_policy(checkpoint)
    tokens, expected = greedy_log_probs(reference)
    policy = with_trained_adapter(quantized(checkpoint, "fp8-dynamic"))
    with policy.adapter_disabled():
        difference = (greedy_log_probs(policy, tokens)[1] - expected).abs()
    print(f"fp8-dynamic: |log-prob - unquantized| mean {difference.mean():.2e} max {difference.max():.2e}")
    assert 0 < difference.max() < FP8_DYNAMIC_LOG_PROB_TOLERANCE
    exported = policy.merge_and_export(tmp_path / "merged")
    reloaded = load_policy(exported)
    layer = "language_model.model.layers.0.self_attn.q_proj"
    base_weight = dequantize(policy.model.get_submodule(layer).base_layer.weight)
    delta = policy.model.get_submodule(layer).get_delta_weight("default")
    assert torch.allclose(reloaded.model.get_submodule(layer).weight, base_weight + delta, atol=1e-6)
