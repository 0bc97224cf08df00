"""The one way a run turns a ModelConfig (and a LoraConfig) into a VLAPolicy: train, eval and sft all call
`build_policy`."""

import torch

from trainer import fsdp
from trainer.checkpoint import resolve_adapter
from trainer.config import LoraConfig, ModelConfig
from vla_actor import LoraSettings, VLAPolicy, load_policy, resolve_dtype
from vla_actor.fused_kernels import INSTALL_HINT, fused_kernels_available


def lora_settings(lora: LoraConfig) -> LoraSettings:
    """The LoRA flags as the model package takes them."""
    target = "all-linear" if lora.lora_target == ("all-linear",) else lora.lora_target
    return LoraSettings(rank=lora.lora_rank, alpha=lora.lora_alpha, dropout=lora.lora_dropout, target=target,
                        include_projector=lora.lora_projector, include_vision=lora.lora_vision)


def asks_fused_kernels(model: ModelConfig, device: torch.device, full: bool = False) -> bool:
    """Whether `build_policy` swaps in the fused kernels where liger-kernel is installed: asked for, on CUDA, and
    neither compiled layers nor full fine-tuning."""
    return model.fused_kernels and device.type == "cuda" and not model.compile_layers and not full


def build_policy(model: ModelConfig, lora: LoraConfig | None, unnorm_key: str, device: torch.device,
                 full: bool = False) -> VLAPolicy:
    """The checkpoint with a trainable LoRA adapter (fresh, or `model.adapter`) or, with `full`, every used weight
    trainable; lora=None with no adapter and not full gives the plain policy for eval. `unnorm_key` names the
    checkpoint's action statistics to decode with (REF 1.3). With `model.base_quant` the base is quantized while it
    loads, before the adapter goes on (vla_actor.quant); with `model.compile_layers` the finished policy's blocks are
    compiled last, adapters included; otherwise, on CUDA, `model.fused_kernels` swaps in Liger's kernels last."""
    policy = load_policy(model.checkpoint, unnorm_key=unnorm_key, device=str(device),
                         dtype=resolve_dtype(model.dtype, model.checkpoint, device),
                         attn_implementation=model.attn_implementation, base_quant=model.base_quant,
                         base_quant_vision=model.base_quant_vision)
    policy.cuda_graphs = model.cuda_graphs
    if not model.graph_update:  # a quantized base and compile_layers turn it off themselves
        policy.graph_update = False
    if lora is not None:
        policy.apply_lora(lora_settings(lora))
    if model.adapter is not None:
        policy.load_adapter(resolve_adapter(model.adapter))
    if full:
        fsdp.make_trainable(policy)
    if model.gradient_checkpointing and (lora is not None or full):
        policy.gradient_checkpointing(True)
    if model.compile_layers:
        policy.compile_layers()
    if asks_fused_kernels(model, device, full):
        if fused_kernels_available():
            policy.fuse_kernels()
        else:
            print(f"fused kernels off: liger-kernel is not installed. {INSTALL_HINT} for 1.41x faster 7B "
                  f"updates (BENCHMARKS.md), or pass --no-fused-kernels", flush=True)
    return policy
