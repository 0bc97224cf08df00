"""The OpenVLA network (REF 2, 3.2): timm DINOv2 + SigLIP towers, the fused-GELU projector and a Llama LM.

Module names follow the released checkpoints, so `state_dict()` keys equal the file keys except for timm's
LayerScale parameter, which the files call `ls1.scale_factor` and timm calls `ls1.gamma` (see `to_file_key`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.profiler import record_function
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vla_actor.quant import check_base_quant, check_quantizable, quantize_layer, quantized_layer_names

DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"
# The architectures of timm 0.9.10 (what OpenVLA was trained with), written out so a newer timm cannot drift.
TIMM_ARCHITECTURES: dict[str, dict] = {
    DINO_ID: dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4,
                  no_embed_class=True),
    SIGLIP_ID: dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
                    global_pool="map"),
}
# What a look-alike checkpoint may shrink through its config's "timm_model_kwargs" (structure stays fixed).
RESIZABLE_VIT_FIELDS = ("embed_dim", "depth", "num_heads")
IMAGE_SIZE = 224
CHANNELS_PER_IMAGE = 6  # DINO-normalised RGB + SigLIP-normalised RGB


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the network, read from a checkpoint's config.json."""

    featurizer: dict
    """timm VisionTransformer kwargs of the DINOv2 tower."""
    fused_featurizer: dict
    """timm VisionTransformer kwargs of the SigLIP tower."""
    text_config: dict
    """config.json's `text_config` (a diff against LlamaConfig defaults)."""
    proprio_dim: int | None
    """Input size of the OFT proprio projector; None when the checkpoint has none."""

    @staticmethod
    def from_config(config: dict, proprio_dim: int | None = None) -> ModelSpec:
        """Validate the fields of REF 1.2 that define the network; raise ValueError naming a bad field."""
        expected = {"use_fused_vision_backbone": True, "arch_specifier": "no-align+fused-gelu-mlp",
                    "image_sizes": [IMAGE_SIZE, IMAGE_SIZE]}
        for field, value in expected.items():
            if config.get(field, value) != value:
                raise ValueError(f"config.json field {field!r} is {config[field]!r}; only {value!r} is supported")
        timm_ids = config.get("timm_model_ids")
        if timm_ids != [DINO_ID, SIGLIP_ID]:
            raise ValueError(f"config.json timm_model_ids is {timm_ids!r}; expected {[DINO_ID, SIGLIP_ID]}")
        if config.get("timm_override_act_layers", [None, None]) != [None, None]:
            raise ValueError("config.json timm_override_act_layers must be [null, null] (exact GELU)")
        overrides = config.get("timm_model_kwargs", [{}, {}])
        if len(overrides) != 2 or any(set(o) - set(RESIZABLE_VIT_FIELDS) for o in overrides):
            raise ValueError(f"config.json timm_model_kwargs must be two dicts with keys from "
                             f"{RESIZABLE_VIT_FIELDS}; got {overrides!r}")
        text_config = config.get("text_config")
        if not isinstance(text_config, dict) or text_config.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json text_config must be a Llama config dict; got {text_config!r}")
        return ModelSpec(
            featurizer={**TIMM_ARCHITECTURES[DINO_ID], **overrides[0]},
            fused_featurizer={**TIMM_ARCHITECTURES[SIGLIP_ID], **overrides[1]},
            text_config=text_config,
            proprio_dim=proprio_dim,
        )

    def llama_config(self) -> LlamaConfig:
        """text_config with every missing key taken from LlamaConfig's defaults (rms_norm_eps 1e-6, REF 1.2)."""
        dropped = ("model_type", "torch_dtype", "dtype", "architectures", "_name_or_path", "transformers_version")
        return LlamaConfig(**{k: v for k, v in self.text_config.items() if k not in dropped})


def build_vit(architecture: dict, device: torch.device | str, dtype: torch.dtype) -> VisionTransformer:
    """A timm ViT without a classifier head; act_layer None gives nn.GELU (exact erf), LayerNorm eps 1e-6."""
    return VisionTransformer(img_size=IMAGE_SIZE, num_classes=0, **architecture, device=device, dtype=dtype)


def vit_patch_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens after the second-to-last block, no final norm, prefix (cls/register) tokens dropped."""
    (features,) = vit.forward_intermediates(images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True,
                                            output_fmt="NLC", intermediates_only=True)
    return features


class FusedVisionBackbone(nn.Module):
    """DINOv2 (`featurizer`) and SigLIP (`fused_featurizer`) patch features concatenated per patch."""

    def __init__(self, featurizer: VisionTransformer, fused_featurizer: VisionTransformer):
        super().__init__()
        self.featurizer = featurizer
        self.fused_featurizer = fused_featurizer

    @property
    def embed_dim(self) -> int:
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 6n, 224, 224] (n images, 6 channels each) -> [B, 256n, dino_dim + siglip_dim], image 0 first."""
        batch, _, height, width = pixel_values.shape
        per_image = pixel_values.reshape(-1, CHANNELS_PER_IMAGE, height, width)
        features = torch.cat([vit_patch_features(self.featurizer, per_image[:, :3]),
                              vit_patch_features(self.fused_featurizer, per_image[:, 3:])], dim=2)
        return features.reshape(batch, -1, features.shape[-1])


class FusedProjector(nn.Module):
    """Prismatic "fused-gelu-mlp": vision_dim -> 4 vision_dim -> llm_dim -> llm_dim (REF 2.4)."""

    def __init__(self, vision_dim: int, llm_dim: int, device: torch.device | str, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, device=device, dtype=dtype)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim, device=device, dtype=dtype)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim, device=device, dtype=dtype)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


class ProprioProjector(nn.Module):
    """OFT proprio projector: one token from the normalised robot state (REF 6.3)."""

    def __init__(self, proprio_dim: int, llm_dim: int, device: torch.device | str, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim, device=device, dtype=dtype)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim, device=device, dtype=dtype)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class OpenVLAModel(nn.Module):
    """vision_backbone -> projector -> tokens inserted after BOS -> language_model (REF 3.2, 6.2, 6.3)."""

    def __init__(self, vision_backbone: FusedVisionBackbone, projector: FusedProjector,
                 language_model: LlamaForCausalLM, proprio_projector: ProprioProjector | None):
        super().__init__()
        self.vision_backbone = vision_backbone
        self.projector = projector
        self.language_model = language_model
        self.proprio_projector = proprio_projector

    def prefix_embeddings(self, pixel_values: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
        """Projected patches [B, 256n, D], followed by one proprio token when `proprio` [B, P] is given."""
        return self.append_proprio(self.patch_embeddings(pixel_values), proprio)

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision towers and the projector: [B, 3n, 224, 224] -> projected patches [B, 256n, D]."""
        with record_function("OpenVLAModel.vision"):  # a named range in torch.profiler traces (bench/profile_gpu.py)
            return self.projector(self.vision_backbone(pixel_values))

    def append_proprio(self, patches: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
        """patches [B, N, D], followed by one proprio token when `proprio` [B, P] is given."""
        if proprio is None:
            return patches
        proprio_token = self.proprio_projector(proprio.to(patches.dtype)).unsqueeze(1)
        return torch.cat([patches, proprio_token], dim=1)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(token_ids)

    def multimodal_embeddings(self, prefix: torch.Tensor, input_ids: torch.Tensor,
                              zeroed: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS] + prefix + the rest of the text; text positions where `zeroed` is True get zero embeddings."""
        text = self.embed_tokens(input_ids)
        if zeroed is not None:
            text = text * (~zeroed).unsqueeze(-1).to(text.dtype)
        return torch.cat([text[:, :1], prefix, text[:, 1:]], dim=1)

    def action_logits(self, hidden: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """LM-head logits of the action token ids [begin, end) only, in float32."""
        head = self.language_model.get_output_embeddings()
        return nn.functional.linear(hidden, head.weight[begin:end]).float()


EMPTY_PARTS = ("vision_backbone", "projector", "language_model", "proprio_projector")


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", empty: tuple[str, ...] = ()) -> OpenVLAModel:
    """Randomly initialised network of `spec`, created directly on `device` in `dtype` (meta works too). The parts
    named in `empty` (of EMPTY_PARTS) are left on the meta device, taking no memory, for `fill` to load tensor by
    tensor; the LLM's rotary frequencies, computed rather than stored, are on `device` all the same."""
    unknown = set(empty) - set(EMPTY_PARTS)
    if unknown:
        raise ValueError(f"empty takes parts of {EMPTY_PARTS}, got {sorted(unknown)}")

    def where(part: str) -> torch.device | str:
        return "meta" if part in empty else device

    featurizer = build_vit(spec.featurizer, where("vision_backbone"), dtype)
    fused_featurizer = build_vit(spec.fused_featurizer, where("vision_backbone"), dtype)
    vision = FusedVisionBackbone(featurizer, fused_featurizer)
    llama_config = spec.llama_config()
    with torch.device(where("language_model")):
        language_model = AutoModelForCausalLM.from_config(llama_config, dtype=dtype,
                                                          attn_implementation=attn_implementation)
    if "language_model" in empty:
        with torch.device(device):
            language_model.model.rotary_emb = LlamaRotaryEmbedding(language_model.config)
    llm_dim = llama_config.hidden_size
    proprio = None if spec.proprio_dim is None else ProprioProjector(spec.proprio_dim, llm_dim,
                                                                     where("proprio_projector"), dtype)
    projector = FusedProjector(vision.embed_dim, llm_dim, where("projector"), dtype)
    return OpenVLAModel(vision, projector, language_model, proprio)


@torch.no_grad()
def fill(model: OpenVLAModel, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device | str,
         base_quant: str = "none", quantize_vision: bool = False) -> None:
    """Materialise the empty parts of `model` (`build_model(empty=...)`) from (module key, values) pairs, one tensor
    at a time: each becomes a new tensor on `device` in the dtype the model was built with; with `base_quant` the
    weight of each layer the quantized base stores in low precision (vla_actor.quant) is quantized as soon as it is
    placed, so the unquantized base never exists whole. Every meta tensor must be filled."""
    check_base_quant(base_quant, torch.device(device))
    selected = set() if base_quant == "none" else set(quantized_layer_names(model, quantize_vision))
    check_quantizable(model, base_quant, quantize_vision)
    for key, values in tensors:
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        empty = getattr(owner, leaf)
        quantized = owner_name in selected and leaf == "weight"
        # what stays gets storage of its own (a tensor read from a file may view the file's mapping); what is
        # quantized is only read, so it is converted, and copied, only where the dtype or device differs
        tensor = (values.to(device=device, dtype=empty.dtype) if quantized
                  else torch.empty_like(empty, device=device).copy_(values))
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False) if isinstance(empty, nn.Parameter) else tensor)
        if quantized:
            model.set_submodule(owner_name, quantize_layer(owner, base_quant))
    unfilled = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if unfilled:
        raise ValueError(f"{len(unfilled)} tensors of the model were not filled (first: {unfilled[:4]})")


_LAYER_SCALE_MODULE = re.compile(r"\.(ls[12])\.gamma$")
_LAYER_SCALE_FILE = re.compile(r"\.(ls[12])\.scale_factor$")


def to_file_key(module_key: str) -> str:
    """timm's `ls1.gamma` is stored as `ls1.scale_factor` in the HF files (REF 2, converter renames)."""
    return _LAYER_SCALE_MODULE.sub(r".\1.scale_factor", module_key)


def to_module_key(file_key: str) -> str:
    return _LAYER_SCALE_FILE.sub(r".\1.gamma", file_key)


def checkpoint_tensors(model: OpenVLAModel) -> dict[str, torch.Tensor]:
    """The tensors of the HF checkpoint (everything but the proprio projector) under their file names."""
    return {to_file_key(name): tensor for name, tensor in model.state_dict().items()
            if not name.startswith("proprio_projector.")}
