"""Full fine-tuning (`--finetune full`): every weight the policy uses trains. In one process the model trains as it
is; under torchrun with several ranks it is sharded with PyTorch FSDP2 (`fully_shard`).

FSDP units, bottom-up: each ViT block, each ViT tower, the LLM's token embedding, each Llama decoder layer, the Llama
decoder stack, then the root (projector, proprio projector, LM head). The policy reaches some modules through methods
other than `forward` (timm's `forward_intermediates`, OpenVLAModel's `prefix_embeddings` and `action_logits`); those
are registered as forward methods, so that FSDP gathers their parameters there as well.

Rollouts and evals run with every unit gathered (`gathered`): each rank plays its own episodes and so makes its own
number of policy calls, while a sharded forward is a collective that every rank must join. The update runs sharded:
every rank makes the same number of forward/backward passes (`padding_pass`), FSDP sums the gradients over ranks
(reduce-scatter) and each rank's AdamW steps on its shard. With half-precision weights (bf16 on CUDA) the sharded
master weights, their gradients and the AdamW states are float32; FSDP gathers bf16 copies for compute and reduces
gradients in float32 (MixedPrecisionPolicy).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from trainer.rollout import PolicyInputs
from vla_actor import ACTION_TOKEN_BEGIN, VLAPolicy
from vla_actor.checkpoint import (PROPRIO_FILE, TRAINING_DTYPE_KEY, dtype_name, load_weights, read_proprio_projector,
                                  write_checkpoint)
from vla_actor.model import IMAGE_SIZE, checkpoint_tensors, to_file_key, to_module_key

PROPRIO_PREFIX = "proprio_projector."


def make_trainable(policy: VLAPolicy) -> None:
    """Every parameter trains except those the policy never reads: each ViT's last block and its final norm,
    pooling and head (the patch features come from the second-to-last block, as LoRA's `include_vision` knows)."""
    model = policy.model
    model.requires_grad_(True)
    for vit in (model.vision_backbone.featurizer, model.vision_backbone.fused_featurizer):
        for unused in (vit.blocks[-1], vit.norm, vit.fc_norm, vit.attn_pool, vit.head):
            if unused is not None:
                unused.requires_grad_(False)


def shard(policy: VLAPolicy) -> list[FSDPModule]:
    """Shards the policy's model in place over every rank of the process group; returns the FSDP units, root last.
    Call it after `make_trainable` and before building the optimizer (its parameters become DTensor shards)."""
    model = policy.model
    compute_dtype = policy.dtype
    if compute_dtype == torch.float32:
        precision = MixedPrecisionPolicy()
    else:
        model.float()  # float32 master weights; FSDP gathers them in the compute dtype
        precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    vision, llama = model.vision_backbone, model.language_model.model
    units = [*vision.featurizer.blocks, vision.featurizer, *vision.fused_featurizer.blocks, vision.fused_featurizer,
             llama.embed_tokens, *llama.layers, llama, model]
    for unit in units:
        fully_shard(unit, mp_policy=precision)
        # Every rank's loss is already its share of the global mini-batch loss, so the gradients add up (a plain
        # sum, which gloo offers too, instead of FSDP's default mean over ranks).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    for vit in (vision.featurizer, vision.fused_featurizer):
        register_fsdp_forward_method(vit, "forward_intermediates")
    # FSDP takes the first unit to run forward as the root: VLAPolicy's calls start with prefix_embeddings.
    for method in ("prefix_embeddings", "action_logits"):
        register_fsdp_forward_method(model, method)
    # A CUDA graph would capture FSDP's hooks and their stream syncs; sharded policies run eagerly.
    policy.cuda_graphs = False
    policy.modules_changed()  # the parameters are DTensor shards now
    return units


@contextmanager
def gathered(units: list[FSDPModule]) -> Iterator[None]:
    """Inside the block every unit holds its full weights (in the compute dtype) and forwards run without
    collectives, so ranks may make different numbers of policy calls (rollouts, evals). No-op without units."""
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            # FSDP's defaults: the root keeps its weights from forward to backward, the other units reshard
            unit.set_reshard_after_forward(unit is not units[-1], recurse=False)
            unit.reshard()


def padding_pass(policy: VLAPolicy, inputs: PolicyInputs, temperature: float) -> None:
    """A forward/backward pass that adds zero to every gradient, for a rank with fewer micro-batches than another:
    FSDP's collectives in each pass pair up across ranks."""
    image = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    proprio = np.zeros((1, len(policy.stats.proprio_q01)), np.float32) if inputs.proprio else None
    tokens = torch.full((1, policy.tokens_per_query), ACTION_TOKEN_BEGIN)
    log_probs, _ = policy.log_probs(image, [""], tokens, wrist=image if inputs.wrist else None, proprio=proprio,
                                    temperature=temperature)
    (0.0 * log_probs.sum()).backward()


def full_state(model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model, optimizer) full state dicts on the CPU of rank 0 (empty elsewhere; every rank must call it). The
    optimizer's is None before its first step: get_optimizer_state_dict would create the state with a zero-lr step,
    which AdamW would count as its first."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else None
    return model_state, optimizer_state


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None, distributed: bool) -> None:
    """Restores the state dicts of `full_state` into a (sharded) model and its optimizer. With `distributed`, rank 0
    passes them and the other ranks empty dicts: rank 0 broadcasts and each rank keeps its shard."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def write_model(policy: VLAPolicy, state: dict[str, torch.Tensor], directory: Path) -> None:
    """A full state dict of the policy's model as a checkpoint in the released layout (what `merge_and_export`
    writes), in the dtype of its tensors (float32 master weights under mixed precision)."""
    config = copy.deepcopy(policy.config)
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = dtype_name(next(iter(state.values())).dtype)
    config[TRAINING_DTYPE_KEY] = dtype_name(policy.dtype)
    proprio = {k.removeprefix(PROPRIO_PREFIX): v for k, v in state.items() if k.startswith(PROPRIO_PREFIX)}
    tensors = ((to_file_key(k), v) for k, v in state.items() if not k.startswith(PROPRIO_PREFIX))
    write_checkpoint(directory, config, tensors, policy.tokenizer, policy.norm_stats, policy.preprocessor_config,
                     proprio_state=proprio or None, carried_files=policy.carried_files)


def read_model(policy: VLAPolicy, directory: Path) -> dict[str, torch.Tensor]:
    """The full state dict (CPU) that `write_model` wrote to `directory`, checked strictly against the model's keys
    and shapes."""
    targets = {key: torch.empty(tensor.shape, dtype=tensor.dtype)
               for key, tensor in checkpoint_tensors(policy.model).items()}
    load_weights(targets, directory)
    state = {to_module_key(key): tensor for key, tensor in targets.items()}
    if policy.model.proprio_projector is not None:
        proprio = read_proprio_projector(directory / PROPRIO_FILE)
        state.update({PROPRIO_PREFIX + key: tensor for key, tensor in proprio.items()})
    return state
