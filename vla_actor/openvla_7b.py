"""The real OpenVLA-7B shape without its files: on the meta device for shape checks (REF 2.6: 7,541,237,184
parameters in 982 tensors), or with random weights directly on a GPU for benchmarks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vla_actor.checkpoint import PREPROCESSOR_CONFIG, dtype_name, released_config
from vla_actor.model import ModelSpec, OpenVLAModel, build_model, checkpoint_tensors, fill
from vla_actor.policy import VLAPolicy
from vla_actor.quant import check_base_quant, check_quantizable, quantize_layer, quantized_layer_names
from vla_actor.tiny import LIBERO_SPATIAL_STATS, build_llama_tokenizer

PARAMETERS_7B = 7_541_237_184
TENSORS_7B = 982
PROPRIO_DIM = 8


def openvla_7b_config(variant: str = "openvla", num_images: int = 1, use_proprio: bool = False,
                      dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json of the released checkpoints (REF 1.2) with libero_spatial statistics; OFT adds its hints."""
    if variant not in ("openvla", "oft"):
        raise ValueError(f"variant must be 'openvla' or 'oft', got {variant!r}")
    config = released_config({"libero_spatial": LIBERO_SPATIAL_STATS}, dtype_name(dtype))
    if variant == "oft":
        config.update(use_proprio=use_proprio, proprio_dim=PROPRIO_DIM, num_images_in_input=num_images)
    return config


def build_openvla_7b(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
                     with_proprio: bool = False, attn_implementation: str = "sdpa") -> OpenVLAModel:
    """The full-size network, randomly initialised on `device` (no memory on "meta")."""
    spec = ModelSpec.from_config(openvla_7b_config(), proprio_dim=PROPRIO_DIM if with_proprio else None)
    return build_model(spec, device, dtype, attn_implementation)


def checkpoint_shapes(model: OpenVLAModel) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor the HF checkpoint holds for `model`."""
    return {key: tuple(tensor.shape) for key, tensor in checkpoint_tensors(model).items()}


def random_language_model(model: OpenVLAModel, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama's random initialisation (transformers' LlamaPreTrainedModel: linear and embedding weights normal with
    std initializer_range, the embedding's padding row zero, RMSNorm weights one) for `fill`, one tensor at a time
    on `device`, in the order of the LLM's parameters."""
    language_model = model.language_model
    std = language_model.config.initializer_range
    for name, parameter in language_model.named_parameters():
        owner = language_model.get_submodule(name.rpartition(".")[0])
        tensor = torch.empty(parameter.shape, dtype=parameter.dtype, device=device)
        if isinstance(owner, LlamaRMSNorm):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, std)
        if isinstance(owner, nn.Embedding) and owner.padding_idx is not None:
            tensor[owner.padding_idx] = 0.0
        yield f"language_model.{name}", tensor


def random_7b_policy(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                     variant: str = "openvla", num_images: int = 1, use_proprio: bool = False,
                     attn_implementation: str = "sdpa", base_quant: str = "none",
                     base_quant_vision: bool = False) -> VLAPolicy:
    """A 7B-shaped policy with random weights created directly on `device` (for speed/memory benchmarks).

    The ViTs and projectors are built by their constructors; the LLM is filled one tensor at a time
    (`random_language_model`), each quantized layer as soon as it is drawn with `base_quant` (vla_actor.quant), so a
    quantized policy never holds the unquantized LLM; the same seed gives the same weights for every `base_quant`.
    The tokenizer is the look-alike one (same special ids and action ids as Llama-2), so prompts may be a
    few tokens longer than with the real vocabulary.
    """
    config = openvla_7b_config(variant, num_images, use_proprio, dtype)
    is_oft = variant == "oft"
    spec = ModelSpec.from_config(config, proprio_dim=PROPRIO_DIM if is_oft and use_proprio else None)
    check_base_quant(base_quant, torch.device(device))
    model = build_model(spec, device, dtype, attn_implementation, empty=("language_model",))
    if base_quant != "none" and base_quant_vision:  # the ViTs are built whole (1.3 GB in bf16), then quantized
        check_quantizable(model, base_quant, include_vision=True)
        for name in quantized_layer_names(model, include_vision=True):
            if name.startswith("vision_backbone."):
                model.set_submodule(name, quantize_layer(model.get_submodule(name), base_quant))
    fill(model, random_language_model(model, device), device, base_quant)
    model.requires_grad_(False)
    model.eval()
    return VLAPolicy(model, build_llama_tokenizer(), config=config, norm_stats=config["norm_stats"],
                     unnorm_key="libero_spatial", is_oft=is_oft, num_images=num_images if is_oft else 1,
                     uses_proprio=is_oft and use_proprio, preprocessor_config=PREPROCESSOR_CONFIG)
