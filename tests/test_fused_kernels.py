"""`vla_actor.fused_kernels.lora_linear` on the CPU: the scale-and-add folded into one addmm_ equals PEFT's LoRA
Linear, forward and gradients, and every state it does not fold runs PEFT's own forward. Liger's kernels need CUDA
(tests/test_vla_gpu.py checks the fused modules there)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from vla_actor.fused_kernels import lora_linear


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(12, 20, bias=False), nn.Linear(20, 12, bias=True)


def lora_model(dtype=torch.float32, cast_inputs=True):
    """LoRA r4, alpha 6 (scale 1.5) on both layers, adapters random (B starts at zero)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLinears().to(dtype), LoraConfig(r=4, lora_alpha=6, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
                parameter.data = parameter.data.float()  # PEFT keeps adapters in float32 over half weights
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = cast_inputs
    return model.base_model.model


def relative_error(expected, found):
    return ((found.float() - expected.float()).norm() / expected.float().norm()).item()


def forward_and_grads(model, x, fused):
    x = x.clone().requires_grad_(True)
    call = (lambda layer, h: lora_linear(layer, h)) if fused else (lambda layer, h: layer(h))
    out = call(model.down, torch.relu(call(model.up, x)))
    (out.float() ** 2).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_lora_linear_equals_peft_forward_and_gradients():
    model = lora_model()
    x = torch.randn(3, 5, 12)
    plain, plain_grads = forward_and_grads(model, x, fused=False)
    fused, fused_grads = forward_and_grads(model, x, fused=True)
    assert fused.shape == (3, 5, 12)
    assert torch.allclose(plain, fused, atol=1e-5)
    assert len(plain_grads) == 5
    for plain_grad, fused_grad in zip(plain_grads, fused_grads):
        assert torch.allclose(plain_grad, fused_grad, rtol=1e-4, atol=1e-5)


def test_lora_linear_under_autocast_takes_half_weights_and_float32_adapters():
    """As the policy runs a bfloat16 base: autocast, adapters in float32, PEFT's input cast off."""
    model = lora_model(torch.bfloat16, cast_inputs=False)
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = forward_and_grads(model, x, fused=False)
        fused, fused_grads = forward_and_grads(model, x, fused=True)
    assert fused.dtype == torch.bfloat16
    assert relative_error(plain, fused) < 1e-2
    for plain_grad, fused_grad in zip(plain_grads, fused_grads):
        assert fused_grad.dtype == plain_grad.dtype
        assert relative_error(plain_grad, fused_grad) < 2e-2  # entries cancel: the norm's scale


def test_lora_linear_casts_the_input_to_the_adapters_dtype_as_peft_does():
    """bf16 weights, float32 adapters, no autocast: PEFT's input cast (on by default) feeds the adapters float32."""
    model = lora_model(torch.bfloat16, cast_inputs=True)
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16)
    plain, plain_grads = forward_and_grads(model, x, fused=False)
    fused, fused_grads = forward_and_grads(model, x, fused=True)
    assert fused.dtype == torch.bfloat16
    assert relative_error(plain, fused) < 1e-2
    for plain_grad, fused_grad in zip(plain_grads, fused_grads):
        assert relative_error(plain_grad, fused_grad) < 2e-2


@pytest.mark.parametrize("state", ["disabled", "merged", "plain linear", "adapter bias", "DoRA"])
def test_states_it_does_not_fold_run_as_themselves(state):
    model = lora_model()
    x = torch.randn(4, 12)
    layer = model.up
    if state == "disabled":
        layer.enable_adapters(False)
    elif state == "merged":
        layer.merge()
    elif state == "plain linear":
        layer = nn.Linear(12, 20)
    else:
        config = LoraConfig(r=4, target_modules=["up"], lora_bias=state == "adapter bias", use_dora=state == "DoRA")
        layer = get_peft_model(TwoLinears(), config).base_model.model.up
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.normal_(0.0, 0.3)
    assert torch.equal(lora_linear(layer, x), layer(x))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(12, 20, bias=False), nn.Linear(12, 20, bias=False), nn.Linear(20, 12)


def swiglu_model(dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(SwiGLU(), LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout,
                                                target_modules=["gate", "up", "down"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    return model.base_model.model


def product_of(gate, up):
    return nn.functional.silu(gate) * up


def swiglu_forward_and_grads(model, x, recompute):
    """The MLP through lora_linear, the down adapter's input kept or recomputed; its output, the gradients and the
    storage of every tensor autograd saved."""
    saved = set()

    def keep(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        gate, up = lora_linear(model.gate, x), lora_linear(model.up, x)
        product = product_of(gate, up)
        out = lora_linear(model.down, product, recomputed_from=(product_of, gate, up) if recompute else None)
    (out ** 2).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, saved, product.untyped_storage().data_ptr()


def test_the_down_adapter_can_recompute_its_input_instead_of_keeping_it():
    model, x = swiglu_model(), torch.randn(3, 5, 12)
    kept, kept_grads, kept_saved, kept_product = swiglu_forward_and_grads(model, x, recompute=False)
    again, again_grads, again_saved, again_product = swiglu_forward_and_grads(model, x, recompute=True)
    assert torch.equal(kept, again)
    for kept_grad, again_grad in zip(kept_grads, again_grads):
        assert torch.allclose(kept_grad, again_grad, rtol=1e-5, atol=1e-6)
    assert kept_product in kept_saved and again_product not in again_saved  # the adapter kept the product, or not
    # with dropout on the adapter's input the recomputed rows would miss its mask: the dropped-out input is kept
    dropping = swiglu_model(dropout=0.1).train()
    runs = []
    for recompute in (False, True):
        torch.manual_seed(1)
        runs.append(swiglu_forward_and_grads(dropping, x, recompute))
    assert torch.equal(runs[0][0], runs[1][0]) and len(runs[0][2]) == len(runs[1][2])
