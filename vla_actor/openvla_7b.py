"""The real OpenVLA-7B shape without its files: on the meta device for shape checks (REF 2.6: 7,541,237,184
parameters in 982 tensors), or with random weights directly on a GPU for benchmarks."""

from __future__ import annotations

import torch

from vla_actor.checkpoint import PREPROCESSOR_CONFIG, dtype_name, released_config
from vla_actor.model import ModelSpec, OpenVLAModel, build_model, checkpoint_tensors
from vla_actor.policy import VLAPolicy
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


def random_7b_policy(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                     variant: str = "openvla", num_images: int = 1, use_proprio: bool = False,
                     attn_implementation: str = "sdpa") -> VLAPolicy:
    """A 7B-shaped policy with random weights created directly on `device` (for speed/memory benchmarks).

    The tokenizer is the look-alike one (same special ids and action ids as Llama-2), so prompts may be a
    few tokens longer than with the real vocabulary.
    """
    config = openvla_7b_config(variant, num_images, use_proprio, dtype)
    is_oft = variant == "oft"
    spec = ModelSpec.from_config(config, proprio_dim=PROPRIO_DIM if is_oft and use_proprio else None)
    model = build_model(spec, device, dtype, attn_implementation)
    model.requires_grad_(False)
    model.eval()
    return VLAPolicy(model, build_llama_tokenizer(), config=config, norm_stats=config["norm_stats"],
                     unnorm_key="libero_spatial", is_oft=is_oft, num_images=num_images if is_oft else 1,
                     uses_proprio=is_oft and use_proprio, preprocessor_config=PREPROCESSOR_CONFIG)
