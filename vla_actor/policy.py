"""The policy the trainer talks to: batched action sampling, teacher-forced log-probs, LoRA, saving, loading.

Sequence layout per sample (REF 3.2, 6.2), right-padded to the longest sample of the batch:
    [BOS] [256 patches per image] [proprio token (OFT, optional)] [prompt text ... 29871] [suffix] [PAD ...]
OpenVLA decodes 7 tokens autoregressively with a KV cache; OFT reads 56 positions of one bidirectional
forward. Position p's output scores token p+1 in both, so the action logits come from the positions of
29871 and of the suffix tokens before the last one.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict, load_peft_weights,
                        set_peft_model_state_dict)
from torch import nn
from transformers import LlamaModel, PretrainedConfig, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from vla_actor.action_tokens import (ACTION_TOKEN_BEGIN, ACTION_TOKEN_END, LLAMA_VOCAB_SIZE, N_BINS, OFT_CHUNK,
                                     detokenize, find_stats, tokenize_normalized)
from vla_actor.checkpoint import (CONFIG_FILE, L1_HEAD_PATTERN, PREPROCESSOR_CONFIG, PREPROCESSOR_FILE,
                                  PROPRIO_PATTERN, TRAINING_DTYPE_KEY, atomic_directory, check_keys, dtype_name,
                                  find_one, open_safetensors, read_json, read_norm_stats, read_weights,
                                  read_proprio_projector, resolve_directory, trained_dtype_name, write_checkpoint)
from vla_actor.cuda_graphs import KeptGraph, KeptTrainingGraph
from vla_actor.fast_decode import DynamicDecoder, GraphDecoder
from vla_actor.fused_kernels import fuse_llama_kernels, set_down_input_recomputation
from vla_actor.model import (EMPTY_PARTS, IMAGE_SIZE, ModelSpec, OpenVLAModel, build_model, checkpoint_tensors, fill,
                             to_file_key, to_module_key)
from vla_actor.quant import dequantize, is_quantized, without_peft_requantize_warning
from vla_actor.tokenizer import carried_files, load_tokenizer

BOS_ID = 1
STOP_ID = 2
PAD_ID = 32000
SPACE_PIECE_ID = 29871  # "▁", the space after "Out:" (REF 3.1)
OFT_PLACEHOLDER_ID = 1  # any id works: placeholder embeddings are zeroed (REF 6.2)
OFT_CONFIG_HINTS = ("num_images_in_input", "use_proprio", "proprio_dim")
ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
"""The files of a PEFT adapter directory."""
LLM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# transformers 5.24 (pinned) calls the KV cache argument `cache`; 5.17 (the GPU image) `past_key_values`, and
# an unknown name is swallowed by **kwargs, so the name is read from the signature.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def prompt_text(instruction: str) -> str:
    """OpenVLA (not v0.1) prompt, instruction lower-cased (REF 3.1)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


@dataclass
class LoraSettings:
    """Which LoRA adapters to add (PEFT)."""

    rank: int = 16
    """LoRA rank r."""
    alpha: int = 16
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input; active only in log_probs with gradients (sampling never drops)."""
    target: str | tuple[str, ...] = "all-linear"
    """"all-linear" = every linear layer of the Llama decoder (lm_head excluded, as PEFT does), or a tuple of
    names from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    include_projector: bool = False
    """Also adapt projector.fc1/fc2/fc3."""
    include_vision: bool = False
    """Also adapt the linear layers of the ViT blocks whose output is used (not the discarded last block)."""
    init: str = "gaussian"
    """PEFT init_lora_weights: "gaussian" (OpenVLA's recipe) or "default"; B starts at zero either way."""


@dataclass
class SampleOutput:
    """One policy query for a batch of B observations."""

    token_ids: torch.Tensor
    """long [B, T] action token ids in 31744..31999 (T = 7, or 56 for OFT), on the CPU."""
    log_probs: torch.Tensor
    """float32 [B, T] log-softmax of the 256 action logits / temperature at the chosen ids, on the CPU."""
    actions: np.ndarray
    """float32 [B, 7] or [B, 8, 7]: un-normalised, dataset convention (gripper not converted, REF 5.2)."""


@dataclass(frozen=True)
class PixelNormalization:
    """Per-backbone Normalize of the released processor (REF 1.4): DINO bf16-rounded ImageNet, SigLIP 0.5."""

    mean: tuple[float, ...]
    """6 values: DINO RGB then SigLIP RGB."""
    std: tuple[float, ...]
    """6 values, same order."""

    @staticmethod
    def from_preprocessor_config(config: dict) -> PixelNormalization:
        sizes = config.get("input_sizes", [[3, IMAGE_SIZE, IMAGE_SIZE]] * 2)
        params = config.get("tvf_normalize_params")
        if sizes != [[3, IMAGE_SIZE, IMAGE_SIZE]] * 2 or not isinstance(params, list) or len(params) != 2:
            raise ValueError(f"{PREPROCESSOR_FILE} must describe two 3x224x224 inputs with two "
                             f"tvf_normalize_params entries; got input_sizes={sizes}, tvf_normalize_params={params}")
        return PixelNormalization(mean=tuple(params[0]["mean"]) + tuple(params[1]["mean"]),
                                  std=tuple(params[0]["std"]) + tuple(params[1]["std"]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, 6, H, W]: ToTensor (/255) then Normalize, per backbone."""
        # in place on the fresh tensors that .float() and .repeat() make: the same values as out-of-place arithmetic,
        # half the time on the CPU (two fewer [B, 6, H, W] float32 allocations)
        pixels = images.permute(0, 3, 1, 2).float().div_(255.0).repeat(1, 2, 1, 1)
        # copied without waiting (VLAPolicy._on_device): torch.tensor(..., device=cuda) waits for all queued GPU
        # work, which made every call start with an idle GPU while the host prepared the rest of it
        mean = torch.tensor(self.mean).view(1, 6, 1, 1).to(images.device, non_blocking=True)
        std = torch.tensor(self.std).view(1, 6, 1, 1).to(images.device, non_blocking=True)
        return pixels.sub_(mean).div_(std)


@dataclass(frozen=True)
class _ModelParts:
    """The model's parameters by part and whether training mode drops anything out, from one walk over its modules.
    A walk over the 7B's ~3,800 modules takes ~5-10 ms of host time, and each teacher-forced forward made several
    (the training graph's checks, the train/eval switch): ~40 ms a call, as long as pi_old's GPU work at
    micro-batch 4 (BENCHMARKS.md). requires_grad is read from these tuples at each use, so freezing and unfreezing
    follow; the policy collects them anew when the modules change (`modules_changed`)."""

    stack: tuple[nn.Parameter, ...]
    """The Llama decoder stack's."""
    outside_stack: tuple[nn.Parameter, ...]
    """Every other one: the towers, the projectors, the LM head."""
    vision: tuple[nn.Parameter, ...]
    """The towers' and the projector's."""
    drops_out: bool
    """Whether training mode drops anything out (VLAPolicy.drops_out_in_training)."""

    @staticmethod
    def of(model: OpenVLAModel) -> _ModelParts:
        stack = tuple(model.language_model.model.parameters())
        in_stack = {id(p) for p in stack}
        rates = [getattr(model.language_model.config, "attention_dropout", 0.0) or 0.0]
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                rates.append(module.p)
            rates.append(getattr(module, "drop_prob", 0.0) or 0.0)  # timm's DropPath
        return _ModelParts(
            stack=stack, outside_stack=tuple(p for p in model.parameters() if id(p) not in in_stack),
            vision=tuple(p for part in (model.vision_backbone, model.projector) for p in part.parameters()),
            drops_out=max(rates) > 0)


@dataclass(frozen=True)
class _Inputs:
    """A right-padded multimodal batch."""

    embeddings: torch.Tensor  # [B, M, D]
    valid: torch.Tensor  # bool [B, M], False on padding
    prompt_end: torch.Tensor  # long [B]: index of the first suffix position (= length without suffix)

    def padded_to(self, length: int) -> "_Inputs":
        """The batch right-padded to at least `length` positions (zero embeddings, not valid)."""
        batch, current, width = self.embeddings.shape
        if length <= current:
            return self
        extra = length - current
        embeddings = torch.cat([self.embeddings, self.embeddings.new_zeros(batch, extra, width)], dim=1)
        return _Inputs(embeddings, torch.cat([self.valid, self.valid.new_zeros(batch, extra)], dim=1), self.prompt_end)


class VLAPolicy:
    """An OpenVLA or OpenVLA-OFT policy. Build it with `load_policy`.

    `cuda_graphs` (default True): on CUDA, `sample` replays the vision towers (`cuda_graphs.KeptGraph`) and
    OpenVLA's decode steps (`fast_decode.GraphDecoder`) from CUDA graphs, same results, each kept from one call to
    the next of the same batch size (and prompt length); set it to False to run them eagerly (what is kept stays
    until `release_graphs`). Teacher-forced forwards (`log_probs`, `token_cross_entropy`) replay a kept vision
    graph too while the towers and the projector hold nothing trainable (eagerly the towers are thousands of small
    kernel launches per micro-batch); they free the decode graph and the KV cache (the update needs the memory).
    Every change to the modules (LoRA, compilation, a disabled adapter), which a replay would not see, frees all
    kept graphs.
    `graph_update` (default True with `cuda_graphs`; False for a quantized base, and `compile_layers` turns it off:
    those update eagerly): a teacher-forced forward at one batch and prompt length
    (`log_probs(pad_to=...)`, the update's micro-batches) replays the Llama stack and its backward from CUDA graphs
    kept for that shape (`cuda_graphs.KeptTrainingGraph`), same results, where gradient checkpointing is off,
    attention is sdpa and every trainable parameter is in the stack (LoRA on the Llama layers only); one without
    gradients (pi_old's) replays the same forward graph where training mode drops nothing out, so its log-probs are
    the gradient pass's bits. `sample` frees them for the rollout's memory.
    `carried_files`: the source checkpoint's tokenizer and remote-code files (name -> bytes), which exports write
    back verbatim; empty for a policy built in memory, whose exports get a tokenizer.json written from `tokenizer`.
    """

    def __init__(self, model: OpenVLAModel, tokenizer: PreTrainedTokenizerBase, *, config: dict, norm_stats: dict,
                 unnorm_key: str, is_oft: bool, num_images: int, uses_proprio: bool, preprocessor_config: dict,
                 carried_files: dict[str, bytes] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.carried_files = carried_files or {}
        self.config = config
        self.norm_stats = norm_stats
        self.unnorm_key, self.stats = find_stats(norm_stats, unnorm_key, "the policy's statistics")
        self.is_oft = is_oft
        self.num_images = num_images
        self.uses_proprio = uses_proprio
        self.preprocessor_config = preprocessor_config
        self.normalization = PixelNormalization.from_preprocessor_config(preprocessor_config)
        self.action_dim = self.stats.action_dim
        self.tokens_per_query = OFT_CHUNK * self.action_dim if is_oft else self.action_dim
        self._peft: PeftModel | None = None
        self.cuda_graphs = True
        self.graph_update = not any(is_quantized(p) for p in model.language_model.parameters())
        self._graph_decoder: GraphDecoder | None = None
        self._vision_graph: KeptGraph | None = None
        self._training_graph: KeptTrainingGraph | None = None
        self._checkpointing = False
        self._adapter_enabled = True
        self._parts: _ModelParts | None = None
        self.modules_changed()
        if uses_proprio and self.stats.proprio_q01 is None:
            raise ValueError(f"the checkpoint uses proprio but statistics {self.unnorm_key!r} have no proprio q01/q99")

    @property
    def device(self) -> torch.device:
        return self.model.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.get_input_embeddings().weight.dtype

    # ----------------------------------------------------------------------------------------------- inputs

    def _images(self, images: np.ndarray | torch.Tensor, name: str, batch: int) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or tuple(images.shape) != (batch, IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"{name} must be uint8 [B, 224, 224, 3] with B = {batch} (one per instruction), got "
                             f"{images.dtype} {list(images.shape)}")
        return self._on_device(images)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor copied to the policy's device without waiting: torch's blocking copy waits for all queued
        GPU work, so each input of an update micro-batch held the host until the GPU had finished the previous one,
        and the GPU then waited while the host prepared the next (CUDA stages a copy from pageable memory before
        the call returns, so the source may change right after)."""
        return tensor.to(self.device, non_blocking=True)

    def _check_batch(self, images, instructions: Sequence[str], wrist, proprio) -> int:
        if isinstance(instructions, str) or not all(isinstance(text, str) for text in instructions):
            raise ValueError("instructions must be a list of strings, one per image")
        if len(instructions) == 0:
            raise ValueError("instructions is empty: pass at least one observation")
        batch = len(instructions)
        if len(images) != batch:
            raise ValueError(f"got {len(images)} images but {batch} instructions; pass one instruction per image")
        if (wrist is not None) != (self.num_images == 2):
            raise ValueError(f"this policy uses {self.num_images} image(s) per observation: pass wrist images "
                             f"{'too' if self.num_images == 2 else 'as None'}")
        if (proprio is not None) != self.uses_proprio:
            raise ValueError(f"this policy {'needs' if self.uses_proprio else 'takes no'} proprio: pass "
                             f"{'proprio [B, 8]' if self.uses_proprio else 'proprio=None'}")
        return batch

    def _pixel_values(self, images, wrist, batch: int) -> torch.Tensor:
        views = [images] if wrist is None else [images, wrist]
        names = ["images", "wrist"]
        pixels = [self.normalization(self._images(view, name, batch)) for view, name in zip(views, names)]
        return (pixels[0] if len(pixels) == 1 else torch.cat(pixels, dim=1)).to(self.dtype)  # cat copies even one

    def _proprio(self, proprio, batch: int) -> torch.Tensor | None:
        if proprio is None:
            return None
        proprio = np.asarray(torch.as_tensor(proprio).cpu(), dtype=np.float64)
        if proprio.ndim != 2 or proprio.shape[0] != batch or not np.isfinite(proprio).all():
            raise ValueError(f"proprio must be finite float [B={batch}, 8], got shape {list(proprio.shape)}")
        return self._on_device(torch.as_tensor(self.stats.normalize_proprio(proprio), dtype=torch.float32))

    def prompt_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        """BOS + prompt + 29871 for each instruction (REF 3.1)."""
        ids = self.tokenizer([prompt_text(text) for text in instructions]).input_ids
        return [row if row[-1] == SPACE_PIECE_ID else [*row, SPACE_PIECE_ID] for row in ids]

    def longest_prompt(self, instructions: Sequence[str]) -> int:
        """Tokens of the longest of `instructions`' prompts: the `prompt_length` that gives every teacher-forced
        forward of their steps one shape (`log_probs`)."""
        return max(map(len, self.prompt_ids(instructions)))

    def _inputs(self, prefix: torch.Tensor, prompts: list[list[int]], suffix: torch.Tensor | None,
                zeroed_suffix: int = 0, prompt_length: int = 0) -> _Inputs:
        """Embed [BOS] prefix [prompt] [suffix] per sample, right-padded to the longest prompt or `prompt_length`
        (tokens of BOS + prompt) if that is more; the first `zeroed_suffix` suffix tokens get zero embeddings
        (OFT's empty action embeddings)."""
        batch, suffix_len = len(prompts), 0 if suffix is None else suffix.shape[1]
        lengths = torch.tensor([len(p) for p in prompts])
        text_len = max(int(lengths.max()), prompt_length) + suffix_len
        ids = torch.full((batch, text_len), PAD_ID, dtype=torch.long)
        suffix = None if suffix is None else suffix.cpu()
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
            if suffix is not None:
                ids[i, len(prompt): len(prompt) + suffix_len] = suffix[i]
        columns = torch.arange(text_len)
        text_valid = columns < (lengths + suffix_len)[:, None]
        zeroed = ((columns >= lengths[:, None]) & (columns < (lengths + zeroed_suffix)[:, None])) \
            if zeroed_suffix else None
        embeddings = self.model.multimodal_embeddings(prefix, self._on_device(ids),
                                                      None if zeroed is None else self._on_device(zeroed))
        valid = torch.cat([text_valid[:, :1], torch.ones(batch, prefix.shape[1], dtype=torch.bool),
                           text_valid[:, 1:]], dim=1)
        return _Inputs(embeddings, self._on_device(valid), self._on_device(lengths + prefix.shape[1]))

    def _hidden(self, inputs: _Inputs, graphed: bool = False) -> torch.Tensor:
        """Last hidden states of the whole padded batch: causal (OpenVLA) or bidirectional (OFT) over valid tokens;
        `graphed`: from the kept training graph (the caller checked `_graphs_update`)."""
        batch, length = inputs.valid.shape
        device = inputs.valid.device
        positions = torch.arange(length, device=device).expand(batch, length)
        if self.is_oft:
            blocked = torch.finfo(inputs.embeddings.dtype).min
            mask = torch.zeros(batch, 1, length, length, dtype=inputs.embeddings.dtype, device=device)
            mask = mask.masked_fill(~inputs.valid[:, None, None, :], blocked)
        elif self._sdpa:
            # the 4D mask that transformers builds for sdpa, built here: given a 2D one it checks on the host
            # whether the batch has padding at all (a capture cannot) and then runs another kernel (other last bits)
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask = (causal & inputs.valid[:, None, :])[:, None]
        else:
            mask = inputs.valid.long()
        if graphed:
            if self._training_graph is None:
                self._training_graph = KeptTrainingGraph(self.model.language_model.model, self._stack_with,
                                                         self.device, "UpdateGraph")
            return self._training_graph(inputs.embeddings, mask, positions)
        return self._llama(inputs.embeddings, mask, positions, None)

    @property
    def _sdpa(self) -> bool:
        return self.model.language_model.config._attn_implementation == "sdpa"

    @property
    def _graphs_update(self) -> bool:
        """Whether a teacher-forced forward may replay the kept training graph (see the class docstring)."""
        if not (self.graph_update and self._replays_graphs and self._sdpa and not self._checkpointing
                and self._adapter_enabled):
            return False
        parts = self._model_parts
        if not torch.is_grad_enabled() and parts.drops_out:
            return False
        return any(p.requires_grad for p in parts.stack) and not any(p.requires_grad for p in parts.outside_stack)

    @property
    def _model_parts(self) -> _ModelParts:
        if self._parts is None:
            self._parts = _ModelParts.of(self.model)
        return self._parts

    def modules_changed(self) -> None:
        """Call after changing the model's modules or parameters (not their values or requires_grad) other than
        through this policy's methods, which call it themselves: the parts are collected anew, and the modules take
        the model's mode (PEFT makes its layers in training mode), which `_mode` relies on."""
        self._parts = None
        self.model.train(self.model.training)

    def _llama(self, embeddings: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               cache: Cache | None) -> torch.Tensor:
        """The Llama decoder stack (no LM head) -> last hidden states; fills `cache` when one is given."""
        out = self.model.language_model.model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions,
                                              use_cache=cache is not None, **{CACHE_ARGUMENT: cache})
        return out.last_hidden_state

    def _stack_with(self, parameters: dict[str, torch.Tensor], embeddings: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """`_llama` without a cache, the stack's `parameters` (name -> tensor) in place of its own."""
        kwargs = {"inputs_embeds": embeddings, "attention_mask": mask, "position_ids": positions, "use_cache": False,
                  CACHE_ARGUMENT: None}
        return torch.func.functional_call(self.model.language_model.model, parameters, (), kwargs).last_hidden_state

    def _action_log_softmax(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """The one place where logits become action log-probs: LM head on the given positions only, the 256
        action columns [31744, 32000), float32, divided by the temperature (REF 4, 6.7)."""
        logits = self.model.action_logits(hidden, ACTION_TOKEN_BEGIN, ACTION_TOKEN_END)
        return torch.log_softmax(logits / temperature, dim=-1)

    def _readout(self, inputs: _Inputs, hidden: torch.Tensor, count: int, temperature: float) -> torch.Tensor:
        """Action log-probs [B, count, 256] from the `count` positions starting at each sample's last prompt
        token (29871), whose output scores the first action token."""
        return self._action_log_softmax(self._from_prompt_end(inputs, hidden, count), temperature)

    @staticmethod
    def _from_prompt_end(inputs: _Inputs, hidden: torch.Tensor, count: int) -> torch.Tensor:
        """hidden [B, count, D] of the `count` positions starting at each sample's last prompt token (29871)."""
        positions = inputs.prompt_end[:, None] - 1 + torch.arange(count, device=hidden.device)
        return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def _check_temperature(temperature: float) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (use greedy=True for argmax), "
                             f"got {temperature!r}")

    @contextmanager
    def _mode(self, training: bool, cache_casts: bool = True) -> Iterator[None]:
        """Train/eval mode for the block, and autocast for half-precision weights: PEFT keeps the adapters in
        float32 (exact optimizer updates) and would otherwise upcast every activation entering a LoRA layer to
        float32, which tripled the rollout time of the 7B model (BENCHMARKS.md). cache_casts=False makes autocast
        cast the adapters at every use instead of once per block, as a CUDA graph kept beyond the block must read
        the adapters themselves, not copies freed when the block ends. Every module is in the model's mode
        (`modules_changed`), so the switch, a walk over all modules, runs only where the mode changes."""
        with self._switched_to(training), torch.autocast(self.device.type, dtype=self.dtype,
                                                         enabled=self.dtype != torch.float32,
                                                         cache_enabled=cache_casts):
            yield

    @contextmanager
    def training_mode(self) -> Iterator[None]:
        """The model in training mode for the whole block, e.g. an update's micro-batches: each forward with
        gradients inside finds it there instead of switching to it and back (two walks over the 7B's modules, ~10 ms
        of host time a micro-batch); one without gradients still runs in eval mode."""
        with self._switched_to(True):
            yield

    @contextmanager
    def _switched_to(self, training: bool) -> Iterator[None]:
        """The model in `training` mode for the block and back to its mode after it, switched only if it differs."""
        previous = self.model.training
        if training != previous:
            self.model.train(training)
        try:
            yield
        finally:
            if training != previous:
                self.model.train(previous)

    def _adapters_follow_autocast(self) -> None:
        """Let LoRA layers take the activations in the compute dtype (see `_mode`)."""
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = self.dtype == torch.float32

    @property
    def _replays_graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    @property
    def fixed_batch(self) -> bool:
        """Whether rollouts should query with the same batch every round (idle envs included, their actions
        dropped): the kept CUDA graphs are per batch size, so a batch that shrank while an env resets would be
        captured anew, twice (trainer/rollout.play_episodes)."""
        return self._replays_graphs

    @property
    def graph_captures(self) -> dict[str, int]:
        """How many CUDA-graph captures this policy has made, per part (one per new shape)."""
        return {"vision": 0 if self._vision_graph is None else self._vision_graph.captures,
                "decode": 0 if self._graph_decoder is None else self._graph_decoder.captures,
                "update": 0 if self._training_graph is None else self._training_graph.captures}

    def release_graphs(self) -> None:
        """Free every kept CUDA graph and the KV cache (see the class docstring)."""
        for graphed in (self._vision_graph, self._graph_decoder, self._training_graph):
            if graphed is not None:
                graphed.release()
        self._training_graph = None  # it holds the trainable parameters, which LoRA changes replace

    @property
    def drops_out_in_training(self) -> bool:
        """Whether a forward with gradients (training mode) drops anything out (LoRA or other dropout, drop path,
        attention dropout), so that its log-probs differ from a forward without gradients."""
        return self._model_parts.drops_out

    @property
    def _vision_trains(self) -> bool:
        """Whether the vision towers or the projector hold trainable parameters (LoRA there, full fine-tuning)."""
        return any(p.requires_grad for p in self._model_parts.vision)

    @property
    def vision_frozen(self) -> bool:
        """Whether the vision towers and the projector hold nothing trainable, so that their output for an
        observation is the same before and after any optimizer step (`patches`)."""
        return not self._vision_trains

    def patches(self, images: np.ndarray | torch.Tensor, wrist=None, pad_to: int | None = None) -> torch.Tensor:
        """The vision towers' and the projector's output [B, 256n, D] for `images` (and `wrist`), without
        gradients, for teacher-forced forwards that share one vision pass (`log_probs(patches=...)`); computed at
        `pad_to` rows (copies of the last observation) where given, one shape, so that an observation's patches do
        not depend on the others beside it. Only while `vision_frozen`."""
        if not self.vision_frozen:
            raise RuntimeError("patches are computed once for several forwards only while the vision towers and "
                               "the projector train nothing")
        batch = len(images)
        if pad_to is not None and batch < pad_to:
            images, wrist = (None if rows is None else _pad_rows(rows, pad_to - batch) for rows in (images, wrist))
        with torch.no_grad():
            pixels = self._pixel_values(images, wrist, len(images))
            if not self._replays_graphs:
                with self._mode(False):
                    return self.model.patch_embeddings(pixels)[:batch]
            return self._vision_patches(pixels)[:batch].clone()  # the graph's output is overwritten by its next replay

    def _vision_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision towers and the projector replayed from the kept CUDA graph (its output buffer)."""
        if self._vision_graph is None:
            self._vision_graph = KeptGraph(self.model.patch_embeddings, self.device, "VisionGraph")
        # the graph must read the weights themselves, not autocast's cached copies, which the block frees (_mode)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                             enabled=self.dtype != torch.float32, cache_enabled=False):
            return self._vision_graph(pixels)

    def _prefix(self, images, wrist, proprio, batch: int, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The prefix embeddings: `patches` where given, else the vision towers and projector, replayed from a kept
        CUDA graph where `cuda_graphs` allows and no gradient has to flow through them (its output is overwritten
        by the next call; the prefix is copied into each call's embeddings before then)."""
        proprio = self._proprio(proprio, batch)
        if patches is not None:
            return self.model.append_proprio(patches.to(self.device, non_blocking=True), proprio)
        pixels = self._pixel_values(images, wrist, batch)
        if not self._replays_graphs or (torch.is_grad_enabled() and self._vision_trains):
            return self.model.prefix_embeddings(pixels, proprio)  # FSDP runs its root's hooks here (trainer/fsdp.py)
        return self.model.append_proprio(self._vision_patches(pixels), proprio)

    def _release_decoder(self) -> None:
        """Free the kept decode graph and its KV cache, keeping the vision graph (whose pool left the trainer's
        7B peaks unchanged, BENCHMARKS.md)."""
        if self._graph_decoder is not None:
            self._graph_decoder.release()

    # --------------------------------------------------------------------------------------- rollout and loss

    @torch.no_grad()
    def sample(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str], wrist=None, proprio=None,
               temperature: float = 1.0, greedy: bool = False,
               generator: torch.Generator | None = None) -> SampleOutput:
        """Action tokens for B observations (uint8 [B, 224, 224, 3] images, one instruction each).

        Each sample's result equals running it alone. `generator` (on the policy's device) makes the
        multinomial draws reproducible; greedy takes the argmax of the same 256 action logits. `temperature`
        divides the logits (1.0: the model's own distribution; GRPO passes its --temperature).
        """
        self._check_temperature(temperature)
        batch = self._check_batch(images, instructions, wrist, proprio)
        if self._training_graph is not None:
            self._training_graph.release()
        if self._replays_graphs and self._graph_decoder is not None:  # free another batch size's KV cache first
            self._graph_decoder.keep_only_batch(batch)
        with self._mode(False, cache_casts=not self._replays_graphs):
            prefix = self._prefix(images, wrist, proprio, batch)
            prompts = self.prompt_ids(instructions)

            def choose(log_probs: torch.Tensor) -> torch.Tensor:
                if greedy:
                    return log_probs.argmax(dim=-1)
                # torch.multinomial's one-draw path (argmax of p / q, q ~ Exp(1)), same draws from `generator`,
                # without its validity checks: they read the probabilities back to the host, which stalled the
                # launch queue once per token (non-finite values are caught below instead).
                probs = log_probs.exp()
                return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)

            if self.is_oft:
                log_probs = self._oft_log_probs(prefix, prompts, temperature)
                columns = choose(log_probs)
                chosen = log_probs.gather(-1, columns.unsqueeze(-1)).squeeze(-1)
            else:
                columns, chosen = self._decode_autoregressive(prefix, prompts, temperature, choose)
        token_ids, log_probs = (columns + ACTION_TOKEN_BEGIN).cpu(), chosen.cpu()
        if not torch.isfinite(log_probs).all():
            raise RuntimeError("the policy produced non-finite action log-probs (NaN or inf in the model's outputs); "
                               "check the weights, the adapter and the inputs")
        return SampleOutput(token_ids=token_ids, log_probs=log_probs, actions=self.decode(token_ids))

    def _decode_autoregressive(self, prefix, prompts, temperature, choose) -> tuple[torch.Tensor, torch.Tensor]:
        """7 tokens with a KV cache; every step feeds each sample's token at its own next position."""
        inputs = self._inputs(prefix, prompts, None)
        config = self.model.language_model.config
        if self._replays_graphs:
            if self._graph_decoder is None:
                self._graph_decoder = GraphDecoder(self._llama, config, self.device)
            # shorter prompts padded to the kept length replay the kept step instead of capturing their own
            inputs = inputs.padded_to(self._graph_decoder.kept_length(len(prompts)))
            decoder = self._graph_decoder.start(inputs.valid, inputs.prompt_end, self.tokens_per_query - 1)
        else:
            decoder = DynamicDecoder(self._llama, config, inputs.valid, inputs.prompt_end)
        columns, chosen = [], []
        with decoder:
            log_probs = self._readout(inputs, decoder.prefill(inputs.embeddings), 1, temperature)[:, 0]
            for step in range(self.tokens_per_query):
                column = choose(log_probs)
                columns.append(column)
                chosen.append(log_probs.gather(-1, column[:, None]).squeeze(-1))
                if step + 1 == self.tokens_per_query:
                    break
                hidden = decoder.step(self.model.embed_tokens(column[:, None] + ACTION_TOKEN_BEGIN))
                log_probs = self._action_log_softmax(hidden[:, 0], temperature)
        return torch.stack(columns, dim=1), torch.stack(chosen, dim=1)

    def _oft_log_probs(self, prefix, prompts, temperature, prompt_length: int = 0,
                       graphed: bool = False) -> torch.Tensor:
        """One bidirectional forward over prompt + 56 zero-embedded placeholders + STOP -> [B, 56, 256]."""
        batch, count = len(prompts), self.tokens_per_query
        suffix = torch.tensor([OFT_PLACEHOLDER_ID] * count + [STOP_ID]).expand(batch, count + 1)
        inputs = self._inputs(prefix, prompts, suffix, zeroed_suffix=count, prompt_length=prompt_length)
        return self._readout(inputs, self._hidden(inputs, graphed), count, temperature)

    def log_probs(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str], token_ids: torch.Tensor,
                  wrist=None, proprio=None, temperature: float = 1.0, pad_to: int | None = None,
                  prompt_length: int = 0, patches: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs float32 [B, T] of `token_ids` and the entropy [B, T] of the 256-way
        distributions, with the same slicing and temperature as `sample`. Differentiable w.r.t. the adapters;
        runs in training mode (LoRA dropout, gradient checkpointing) when gradients are enabled. `pad_to` rows and
        `prompt_length` prompt tokens (BOS and 29871 included): a smaller batch runs padded with copies of its last
        sample, shorter prompts padded on the right, so that every forward of the update runs at one shape, where a
        sample's numbers do not depend on the other samples (GEMMs and attention work row by row), and pi_old
        computed in one forward equals the update's in another (the trainer's recomputed pi_old); the vision graph
        the rollout kept (`cuda_graphs`) is replayed at that batch. A forward without gradients keeps the rollout's
        decode graph and KV cache (it needs little memory) unless it replays the training graph (`graph_update`);
        one with gradients frees them for its activations. `patches`: the observations' `patches` [B, ...], computed
        once for several forwards, instead of the vision towers here."""
        self._check_temperature(temperature)
        batch = self._check_batch(images, instructions, wrist, proprio)
        token_ids = self._check_tokens(token_ids, batch)
        if patches is not None:
            if not self.vision_frozen or len(patches) != batch:
                raise ValueError(f"patches must hold the {batch} observations' vision output, computed while the "
                                 f"vision towers train nothing (VLAPolicy.patches)")
        if pad_to is not None and batch < pad_to:
            images, wrist, proprio, token_ids, patches = (
                None if rows is None else _pad_rows(rows, pad_to - batch)
                for rows in (images, wrist, proprio, token_ids, patches))
            instructions = [*instructions, *[instructions[-1]] * (pad_to - batch)]
        graphed = pad_to is not None and self._graphs_update
        if torch.is_grad_enabled() or graphed:
            self._release_decoder()
        with self._mode(torch.is_grad_enabled(), cache_casts=not graphed):
            prefix = self._prefix(images, wrist, proprio, len(instructions), patches)
            prompts = self.prompt_ids(instructions)
            if self.is_oft:
                log_probs = self._oft_log_probs(prefix, prompts, temperature, prompt_length, graphed)
            else:
                inputs = self._inputs(prefix, prompts, token_ids, prompt_length=prompt_length)
                log_probs = self._readout(inputs, self._hidden(inputs, graphed), self.tokens_per_query,
                                          temperature)
        log_probs = log_probs[:batch]
        columns = (token_ids[:batch] - ACTION_TOKEN_BEGIN).unsqueeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(-1, columns).squeeze(-1), entropy

    def token_cross_entropy(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
                            token_ids: torch.Tensor, wrist=None, proprio=None) -> torch.Tensor:
        """OpenVLA's training loss (REF 3.1, 6.2): teacher-forced cross-entropy over the full vocabulary on the
        T action tokens and the stop token </s>, averaged over these T + 1 targets and over the batch (every
        sample has the same number of targets, so this is the mean over all targets, as the HF LM loss).

        OpenVLA reads the targets causally from the positions of 29871 and of the 7 action tokens (the </s>
        that training appends as input is never attended to by an earlier position, so it is left out). OFT
        feeds its 56 action tokens with zeroed embeddings and STOP, bidirectionally, as its training does.
        Differentiable w.r.t. the trainable parameters; training mode (dropout, checkpointing) with gradients."""
        batch = self._check_batch(images, instructions, wrist, proprio)
        token_ids = self._check_tokens(token_ids, batch)
        targets = torch.cat([token_ids, torch.full_like(token_ids[:, :1], STOP_ID)], dim=1)
        self._release_decoder()
        with self._mode(torch.is_grad_enabled()):
            prefix = self._prefix(images, wrist, proprio, batch)
            prompts = self.prompt_ids(instructions)
            if self.is_oft:
                inputs = self._inputs(prefix, prompts, targets, zeroed_suffix=self.tokens_per_query)
            else:
                inputs = self._inputs(prefix, prompts, token_ids)
            hidden = self._from_prompt_end(inputs, self._hidden(inputs), targets.shape[1])
            logits = self.model.language_model.get_output_embeddings()(hidden).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def _check_tokens(self, token_ids, batch: int) -> torch.Tensor:
        token_ids = torch.as_tensor(token_ids)
        shape = (batch, self.tokens_per_query)
        if token_ids.dtype != torch.long or tuple(token_ids.shape) != shape:
            raise ValueError(f"token_ids must be long {list(shape)}, got {token_ids.dtype} {list(token_ids.shape)}")
        if token_ids.numel() and (token_ids.min() < ACTION_TOKEN_BEGIN or token_ids.max() >= ACTION_TOKEN_END):
            raise ValueError(f"token_ids must be action tokens in [{ACTION_TOKEN_BEGIN}, {ACTION_TOKEN_END - 1}], "
                             f"got values in [{int(token_ids.min())}, {int(token_ids.max())}]")
        return self._on_device(token_ids)

    # ------------------------------------------------------------------------------------- action <-> tokens

    def decode(self, token_ids: torch.Tensor) -> np.ndarray:
        """Token ids [B, T] -> un-normalised actions float32 [B, 7] or [B, 8, 7] (REF 4, 5.1)."""
        normalized = detokenize(token_ids.cpu().numpy()).reshape(len(token_ids), -1, self.action_dim)
        actions = self.stats.unnormalize(normalized, eps=1e-8 if self.is_oft else 0.0).astype(np.float32)
        return actions if self.is_oft else actions[:, 0]

    def action_tokens(self, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Inverse of decoding: dataset-unit actions [B, 7] ([B, 8, 7] for OFT) -> long [B, T] token ids."""
        actions = np.asarray(torch.as_tensor(actions).cpu(), dtype=np.float64)
        expected = (OFT_CHUNK, self.action_dim) if self.is_oft else (self.action_dim,)
        if actions.ndim != len(expected) + 1 or actions.shape[1:] != expected or not np.isfinite(actions).all():
            raise ValueError(f"actions must be finite [B, {', '.join(map(str, expected))}], "
                             f"got shape {list(actions.shape)}")
        ids = tokenize_normalized(self.stats.normalize(actions))
        return torch.from_numpy(ids.reshape(len(actions), self.tokens_per_query))

    # ------------------------------------------------------------------------------------------------- LoRA

    def apply_lora(self, settings: LoraSettings) -> None:
        """Wrap the chosen linear layers with trainable PEFT LoRA adapters; everything else stays frozen."""
        if self._peft is not None:
            raise ValueError("LoRA is already applied; load another adapter with load_adapter instead")
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=lora_target_modules(self.model, settings),
                            init_lora_weights=True if settings.init == "default" else settings.init)
        self.release_graphs()
        with without_peft_requantize_warning():
            self._peft = get_peft_model(self.model, config)
        self._adapters_follow_autocast()
        self.modules_changed()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward (Llama layers and ViT blocks) to save memory."""
        self._checkpointing = enabled
        language_model = self.model.language_model
        # activation_checkpointing_* since transformers 5.2x; the GPU image's 5.17 has only gradient_checkpointing_*
        if hasattr(language_model, "activation_checkpointing_enable"):
            if enabled:
                language_model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                language_model.activation_checkpointing_disable()
        elif enabled:
            language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            language_model.gradient_checkpointing_disable()
        for vit in (self.model.vision_backbone.featurizer, self.model.vision_backbone.fused_featurizer):
            vit.set_grad_checkpointing(enabled)
        # without checkpointing every layer keeps its activations: the fused MLP's down adapter recomputes its input
        set_down_input_recomputation(language_model.model, not enabled)

    def compile_layers(self, backend: str = "inductor") -> None:
        """torch.compile (inductor, dynamic shapes) every block that holds no KV cache, in place: per Llama layer
        the two RMSNorms, the MLP and the q/k/v/o projections (with their LoRA adapters), and every ViT block, so
        that the element-wise work around the GEMMs (LoRA's scale-and-add, RMSNorm, SiLU, GELU) runs fused. The
        attention core stays eager: it indexes the KV cache by layer, which would compile once per layer.

        Call it after apply_lora / load_adapter (the projections it compiles are the adapters' wrappers). Module
        names, state dicts and parameters are unchanged; gradient checkpointing wraps the compiled blocks,
        adapter_disabled() and train/eval switch compiled variants (a few per block kind, not per call), and the
        CUDA-graph decoder captures their kernels after its eager warm-up step has compiled them. `backend`: the
        torch.compile backend; "aot_eager" traces the same graphs without generating kernels (fast, for checks).
        Compiled blocks update eagerly: it turns `graph_update` off."""
        vision = self.model.vision_backbone
        blocks = [*vision.featurizer.blocks, *vision.fused_featurizer.blocks]
        for layer in self.model.language_model.model.layers:
            attention = layer.self_attn
            blocks += [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, attention.q_proj,
                       attention.k_proj, attention.v_proj, attention.o_proj]
        self.release_graphs()
        self.graph_update = False
        for block in blocks:
            block.compile(backend=backend, dynamic=True)
        self.modules_changed()

    def fuse_kernels(self) -> None:
        """Liger-kernel's fused RMSNorm, RoPE and SwiGLU and LoRA's scale-and-add in one addmm_ in every Llama
        layer, in place (vla_actor.fused_kernels): the same parameters, adapters and state dict; CUDA only. Not
        together with `compile_layers`, which fuses the same element-wise work its own way."""
        if self.device.type != "cuda":
            raise ValueError(f"fused kernels run on CUDA only; this policy is on {self.device}")
        self.release_graphs()
        fuse_llama_kernels(self.model.language_model.model)
        set_down_input_recomputation(self.model.language_model.model, not self._checkpointing)
        self.modules_changed()

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The base model (adapters bypassed) inside the block, e.g. for a KL reference; no copy is made. The kept
        vision graph stays where the towers and the projector hold no adapter (their outputs do not change)."""
        release = self.release_graphs if self._vision_trains else self._release_decoder
        release()
        self._adapter_enabled = False
        try:
            with self._peft.disable_adapter() if self._peft is not None else nullcontext():
                yield
        finally:
            self._adapter_enabled = True
            release()

    def _require_lora(self, action: str) -> PeftModel:
        if self._peft is None:
            raise ValueError(f"cannot {action}: no LoRA adapter is applied (call apply_lora or load_adapter first)")
        return self._peft

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
        peft_model = self._require_lora("save an adapter")
        with atomic_directory(directory) as staging:
            peft_model.save_pretrained(staging)
        return Path(directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT adapter saved by `save_adapter` (or by PEFT for this model) as the trainable adapter."""
        directory = Path(directory)
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{name} not found in {directory}: expected a PEFT adapter directory")
        self._check_adapter_fits(directory)
        if self._peft is None:
            self.release_graphs()
            with without_peft_requantize_warning():
                self._peft = PeftModel.from_pretrained(self.model, directory, is_trainable=True)
            self._adapters_follow_autocast()
            self.modules_changed()
        else:
            saved = LoraConfig.from_pretrained(directory)
            current = self._peft.peft_config["default"]
            for field in ("r", "lora_alpha", "target_modules"):
                if getattr(saved, field) != getattr(current, field):
                    raise ValueError(f"adapter in {directory} has {field}={getattr(saved, field)!r} but the applied "
                                     f"adapter has {getattr(current, field)!r}")
            set_peft_model_state_dict(self._peft, load_peft_weights(str(directory)))
        expected = get_peft_model_state_dict(self._peft)
        found = load_peft_weights(str(directory))
        check_keys({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in found.items()},
                   f"adapter {directory}")

    def _check_adapter_fits(self, directory: Path) -> None:
        """Every lora_A [r, in] / lora_B [out, r] of the adapter file must sit on a Linear of this model with those
        in / out features; an adapter trained on another base model is refused here, naming the first misfit,
        instead of deep inside PEFT's loading."""
        weights = directory / ADAPTER_WEIGHTS_FILE
        with open_safetensors(weights) as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        for key, shape in sorted(shapes.items()):
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if match is None:
                continue
            try:
                layer = self.model.get_submodule(match[1])
            except AttributeError:
                layer = None
            fits = layer is not None and hasattr(layer, "in_features") and len(shape) == 2 and (
                shape[1] == layer.in_features if match[2] == "A" else shape[0] == layer.out_features)
            if not fits:
                found = "no such layer" if layer is None else (
                    f"the layer is [{getattr(layer, 'out_features', '?')}, {getattr(layer, 'in_features', '?')}]")
                raise ValueError(f"adapter {directory} does not fit this checkpoint: {key} is {list(shape)} but "
                                 f"{found}; it was trained on another base model, so pass the --checkpoint it was "
                                 f"trained from")

    def merge_and_export(self, directory: str | os.PathLike, max_shard_bytes: int = 5_000_000_000,
                         storage_dtype: torch.dtype | None = None) -> Path:
        """A full checkpoint (released layout) with the adapters merged into the weights, stored in
        `storage_dtype` (None: this policy's dtype), with this policy's dtype recorded as the one it was trained
        in (TRAINING_DTYPE_KEY); this policy keeps its separate adapters. `load_policy(directory)` in the recorded
        dtype reproduces this policy's outputs (exactly when nothing was rounded to a narrower storage dtype)."""
        storage_dtype = storage_dtype or self.dtype
        config = copy.deepcopy(self.config)
        config["torch_dtype"] = config["text_config"]["torch_dtype"] = dtype_name(storage_dtype)
        config[TRAINING_DTYPE_KEY] = dtype_name(self.dtype)
        tensors = ((key, tensor.to(storage_dtype) if tensor.is_floating_point() else tensor)
                   for key, tensor in merged_checkpoint_tensors(self.model))
        proprio = self.model.proprio_projector
        return write_checkpoint(directory, config, tensors, self.tokenizer,
                                self.norm_stats, self.preprocessor_config,
                                proprio_state=None if proprio is None else proprio.state_dict(),
                                max_shard_bytes=max_shard_bytes, carried_files=self.carried_files)


_VIT_BLOCK = re.compile(r"^vision_backbone\.(featurizer|fused_featurizer)\.blocks\.(\d+)\.")


def lora_target_modules(model: OpenVLAModel, settings: LoraSettings) -> list[str]:
    """Full module names of the nn.Linear layers selected by `settings`."""
    leaf_names = LLM_LINEAR_NAMES if settings.target == "all-linear" else settings.target
    if isinstance(leaf_names, str) or not leaf_names or set(leaf_names) - set(LLM_LINEAR_NAMES):
        raise ValueError(f"LoraSettings.target must be 'all-linear' or a tuple of names from {LLM_LINEAR_NAMES}, "
                         f"got {settings.target!r}")
    if settings.init not in ("gaussian", "default"):
        raise ValueError(f"LoraSettings.init must be 'gaussian' or 'default', got {settings.init!r}")
    used_blocks = {tower: len(getattr(model.vision_backbone, tower).blocks) - 1
                   for tower in ("featurizer", "fused_featurizer")}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        block = _VIT_BLOCK.match(name)
        if (name.startswith("language_model.model.layers.") and name.rsplit(".", 1)[-1] in leaf_names) \
                or (settings.include_projector and name.startswith("projector.")) \
                or (settings.include_vision and block is not None and int(block[2]) < used_blocks[block[1]]):
            names.append(name)
    return names


def merged_checkpoint_tensors(model: OpenVLAModel) -> Iterator[tuple[str, torch.Tensor]]:
    """File key -> tensor with every active LoRA delta added to its base weight, one tensor at a time; a quantized
    base weight (vla_actor.quant) is dequantized first, so the file has the released layout."""
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in model.state_dict().items():
        if name.startswith("proprio_projector.") or ".lora_" in name:
            continue
        tensor = dequantize(tensor)
        owner, _, parameter = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        if owner.endswith(".base_layer") and layer_name in lora_layers:
            layer = lora_layers[layer_name]
            if parameter == "weight" and not layer.disable_adapters:
                merged = tensor
                for adapter in layer.active_adapters:
                    merged = merged + layer.get_delta_weight(adapter)  # promoted, rounded once as PEFT's merge
                tensor = merged.to(tensor.dtype)
            name = f"{layer_name}.{parameter}"
        yield to_file_key(name), tensor


def load_policy(path_or_hub_id: str | os.PathLike, unnorm_key: str = "libero_spatial",
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                attn_implementation: str = "sdpa", oft: bool | None = None,
                num_images: int | None = None, use_proprio: bool | None = None,
                revision: str | None = None, base_quant: str = "none", base_quant_vision: bool = False) -> VLAPolicy:
    """Load a released (or exported, or look-alike) OpenVLA / OpenVLA-OFT checkpoint, strictly, tensor by tensor.

    base_quant / base_quant_vision: store the frozen base's LLM linear layers (and the ViTs') quantized
    (vla_actor.quant), each quantized on `device` as soon as it is read, so the unquantized base never exists whole.

    oft / num_images / use_proprio default to the checkpoint's hints: OFT when config.json has one of
    num_images_in_input / use_proprio / proprio_dim or a proprio_projector--*.pt file is present.
    Hub ids are downloaded with huggingface_hub only when the path is not a local directory.
    """
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_implementation!r}")
    directory = resolve_directory(path_or_hub_id, revision)
    config = read_json(directory / CONFIG_FILE)
    _check_config(config, directory)
    norm_stats, source = read_norm_stats(directory, config)
    find_stats(norm_stats, unnorm_key, source)
    if find_one(directory, L1_HEAD_PATTERN) is not None:
        raise ValueError(f"{directory} holds an {L1_HEAD_PATTERN} file: an L1-regression OFT checkpoint. Only "
                         f"token-based checkpoints (OpenVLA, or OFT with the discrete token head) are supported")
    proprio_path = find_one(directory, PROPRIO_PATTERN)
    is_oft = oft if oft is not None else (proprio_path is not None or any(k in config for k in OFT_CONFIG_HINTS))
    if not is_oft and (num_images not in (None, 1) or use_proprio):
        raise ValueError("an OpenVLA (non-OFT) policy takes one image and no proprio; pass oft=True for OFT")
    num_images = 1 if not is_oft else num_images or config.get("num_images_in_input", 1)
    if num_images not in (1, 2):
        raise ValueError(f"num_images must be 1 or 2 (agentview, optionally wrist), got {num_images}")
    uses_proprio = is_oft and (use_proprio if use_proprio is not None
                               else config.get("use_proprio", proprio_path is not None))
    if is_oft and attn_implementation == "flash_attention_2":
        raise ValueError("OFT needs bidirectional attention with an explicit mask: use attn_implementation "
                         "'sdpa' or 'eager'")
    proprio_state = None
    if uses_proprio:
        if proprio_path is None:
            raise FileNotFoundError(f"the checkpoint uses proprio but {directory} has no {PROPRIO_PATTERN} file")
        proprio_state = read_proprio_projector(proprio_path)
        if "fc1.weight" not in proprio_state:
            raise ValueError(f"{proprio_path.name} has no fc1.weight; keys: {sorted(proprio_state)}")
    spec = ModelSpec.from_config(config, None if proprio_state is None else proprio_state["fc1.weight"].shape[1])
    model = build_model(spec, device, dtype, attn_implementation, empty=EMPTY_PARTS)
    tensors = file_tensors(model, directory)
    if proprio_state is not None:
        targets = model.proprio_projector.state_dict()
        check_keys({k: v.shape for k, v in targets.items()}, {k: v.shape for k, v in proprio_state.items()},
                   str(proprio_path))
        tensors = itertools.chain(tensors, ((f"proprio_projector.{key}", value)
                                            for key, value in proprio_state.items()))
    fill(model, tensors, device, base_quant, base_quant_vision)
    model.requires_grad_(False)
    model.eval()
    preprocessor_path = directory / PREPROCESSOR_FILE
    preprocessor_config = read_json(preprocessor_path) if preprocessor_path.is_file() else PREPROCESSOR_CONFIG
    tokenizer = _load_tokenizer(directory, model.language_model.config)
    return VLAPolicy(model, tokenizer, config=config, norm_stats=norm_stats, unnorm_key=unnorm_key,
                     is_oft=is_oft, num_images=num_images, uses_proprio=uses_proprio,
                     preprocessor_config=preprocessor_config, carried_files=carried_files(directory))


def file_tensors(model: OpenVLAModel, directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's weights for `fill`: (module key, tensor) one at a time, after the strict check of every name
    and shape against `model`'s (which may be on the meta device)."""
    expected = {key: tensor.shape for key, tensor in checkpoint_tensors(model).items()}
    return ((to_module_key(key), tensor) for key, tensor in read_weights(expected, directory))


def checkpoint_dtype(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> torch.dtype:
    """The dtype a checkpoint was trained in (`trained_dtype_name` of its config.json)."""
    directory = resolve_directory(path_or_hub_id, revision)
    name = trained_dtype_name(read_json(directory / CONFIG_FILE))
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{directory / CONFIG_FILE}: {TRAINING_DTYPE_KEY} / torch_dtype is {name!r}; expected one "
                         f"of {', '.join(COMPUTE_DTYPES)} (or pass --dtype explicitly)")
    return COMPUTE_DTYPES[name]


def resolve_dtype(choice: str, path_or_hub_id: str | os.PathLike, device: torch.device) -> torch.dtype:
    """--dtype: bfloat16 / float32 as given; auto: on CUDA the dtype the checkpoint was trained in (the 7B
    bfloat16, the small from-scratch policies float32), on the CPU float32 (bfloat16 matmuls are slow there)."""
    if choice != "auto":
        return COMPUTE_DTYPES[choice]
    return checkpoint_dtype(path_or_hub_id) if device.type == "cuda" else torch.float32


def _check_config(config: dict, directory: Path) -> None:
    if config.get("model_type") != "openvla":
        raise ValueError(f"{directory / CONFIG_FILE}: model_type is {config.get('model_type')!r}, expected 'openvla'")
    if config.get("n_action_bins", N_BINS) != N_BINS:
        raise ValueError(f"{directory / CONFIG_FILE}: n_action_bins must be {N_BINS}, got {config['n_action_bins']}")
    vocab = config.get("text_config", {}).get("vocab_size", LLAMA_VOCAB_SIZE)
    if vocab - config.get("pad_to_multiple_of", 0) != LLAMA_VOCAB_SIZE:
        raise ValueError(f"{directory / CONFIG_FILE}: text_config.vocab_size - pad_to_multiple_of must be "
                         f"{LLAMA_VOCAB_SIZE} (32064 - 64), got {vocab} - {config.get('pad_to_multiple_of')}")


def _load_tokenizer(directory: Path, llama_config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, checked for the Llama-2 ids the prompt and action code rely on."""
    tokenizer = load_tokenizer(directory, llama_config)
    found = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.convert_ids_to_tokens(SPACE_PIECE_ID))
    if found != (BOS_ID, PAD_ID, "▁"):
        raise ValueError(f"tokenizer in {directory} has (bos id, pad id, piece 29871) = {found}; expected "
                         f"({BOS_ID}, {PAD_ID}, '▁') as in the Llama-2 tokenizer with <PAD> added")
    return tokenizer


def _pad_rows(rows: np.ndarray | torch.Tensor, extra: int) -> np.ndarray | torch.Tensor:
    """`rows` followed by `extra` copies of its last row."""
    if isinstance(rows, torch.Tensor):
        return torch.cat([rows, rows[-1:].expand(extra, *rows.shape[1:])])
    rows = np.asarray(rows)
    return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)])
