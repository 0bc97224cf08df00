"""Arithmetic ceilings of the 7B rollout, update and whole iteration: the least time their matrix products and
weight reads take at a given GEMM rate and memory bandwidth, for the prompts the benchmarks run, set against the
rates measured on the GPU (BENCHMARKS.md, "How far from the arithmetic").

Counted: every product of the Llama decoder's linear layers (2 x weights x tokens per forward pass), the causal
attention products, the two ViTs' block linears over their patches and the projector; the LoRA products (r16: under
1 % of the flops), norms and element-wise work are left out, so the ceilings are upper bounds. A rollout query runs
the towers once, the prefill over BOS + patches + prompt, then one decode step per further action token, each
reading every decoder weight once for the whole batch (memory-bound at these batches). An update sample runs the
decoder three times (forward, the checkpointed recomputation, the input-gradient backward, which costs a forward's
products: the frozen base needs no weight gradients) and once more for pi_old; the towers once per pass that needs
them (no gradient flows into them).

    python -m bench.ceiling --output bench/results/ceiling_7b.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch import nn

from bench.bench_gpu import INSTRUCTIONS
from trainer.checkpoint import write_json
from vla_actor.model import ModelSpec, build_model
from vla_actor.openvla_7b import openvla_7b_config
from vla_actor.policy import prompt_text
from vla_actor.tiny import build_llama_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = {  # what the ceilings are set against: H100, 24 GiB cap, fused kernels, bf16
    "rollout": ("gpu_7b_fp8_dynamic.json", ("modes", "bf16", "rollout_curve", "16", "actions_per_s")),
    "update": ("gpu_7b_fp8_dynamic.json", ("modes", "bf16", "update_curve", "16", "samples_per_s")),
    "update_with_pi_old": ("gpu_7b_fp8_dynamic.json", ("modes", "bf16", "update_curve_with_pi_old", "16",
                                                       "samples_per_s")),
}


@dataclass
class CeilingConfig:
    """Rates of the card and the shapes of the run; the defaults are an H100 SXM and bench_e2e's OpenVLA run."""

    gemm_tflops: float = 700.0
    """bf16 GEMM rate, TFLOP/s: ~700 is what the update's products reached on an H100 (profile_7b_fused.txt:
    aten::mm ran 276 ms per micro-batch of 16, whose decoder products are 185 TFLOP: 670 TFLOP/s with LoRA's small
    products in the same 276 ms); 989 is its dense peak. An H200 has the same tensor cores."""
    bandwidth_tbs: float = 3.35
    """Memory bandwidth, TB/s: an H100 SXM's 3.35 (an H200's 4.8), for the decode steps' weight reads."""
    rollout_batch: int = 16
    """Observations per rollout query (one per env)."""
    env_steps: int = 3520
    """Policy steps of the iteration (bench_e2e: 16 episodes of 220)."""
    env_wait_seconds: float = 16.4
    """The simulators' time in an iteration that the GPU waits for, not hidden: bench_e2e's OpenVLA env wait less
    its first reset (gpu_7b_e2e_openvla220.json: 54.2 - 37.8 s)."""
    output: Path | None = None
    """Where the JSON goes; None prints it only."""


def linear_weights(module: nn.Module) -> int:
    """Weights of every nn.Linear under `module`."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def prompt_tokens(instructions: tuple[str, ...] = INSTRUCTIONS) -> float:
    """Mean text tokens of a query (BOS, the prompt and the 29871 before the actions) with the look-alike
    tokenizer the 7B benchmarks use."""
    tokenizer = build_llama_tokenizer()
    lengths = [len(tokenizer(prompt_text(text)).input_ids) for text in instructions]
    return sum(lengths) / len(lengths)


@dataclass
class Shape:
    """The counts the ceilings need, from the model built on the meta device."""

    decoder_weights: int
    hidden: int
    layers: int
    vision_weights: int
    patches: int
    text_tokens: float
    action_tokens: int

    @classmethod
    def openvla_7b(cls) -> Shape:
        config = openvla_7b_config("openvla")
        model = build_model(ModelSpec.from_config(config), "meta", torch.bfloat16)
        llama = model.language_model.model
        vision = linear_weights(model.vision_backbone) + linear_weights(model.projector)
        return cls(decoder_weights=linear_weights(llama.layers), hidden=llama.config.hidden_size,
                   layers=llama.config.num_hidden_layers, vision_weights=vision,
                   patches=model.vision_backbone.featurizer.patch_embed.num_patches, text_tokens=prompt_tokens(),
                   action_tokens=7)


def forward_flops(shape: Shape, tokens: float) -> float:
    """One decoder pass over `tokens` positions: 2 x weights x tokens, plus causal attention's QK^T and PV
    (2 x 2 x tokens^2 x hidden per layer, halved by the mask)."""
    return 2 * shape.decoder_weights * tokens + 2 * tokens**2 * shape.hidden * shape.layers


def ceilings(shape: Shape, config: CeilingConfig) -> dict[str, float]:
    """Actions/s, samples/s and env steps/s that the arithmetic alone allows."""
    gemm, bandwidth = config.gemm_tflops * 1e12, config.bandwidth_tbs * 1e12
    prompt = shape.patches + shape.text_tokens
    vision = 2 * shape.vision_weights * shape.patches
    decode_read = (shape.action_tokens - 1) * 2 * shape.decoder_weights / bandwidth  # bf16 weights, per batch
    rollout_flops = forward_flops(shape, prompt) + vision
    rollout_seconds = rollout_flops / gemm + decode_read / config.rollout_batch
    sample = forward_flops(shape, prompt + shape.action_tokens)
    update_seconds = (3 * sample + vision) / gemm
    update_pi_old_flops = 4 * sample + 2 * vision
    update_pi_old_seconds = update_pi_old_flops / gemm
    iteration = config.env_steps * (rollout_seconds + update_pi_old_seconds) + config.env_wait_seconds
    return {"tokens_per_sample": prompt + shape.action_tokens,
            "rollout_tflop_per_action": rollout_flops / 1e12,
            "update_tflop_per_sample_with_pi_old": update_pi_old_flops / 1e12,
            "rollout_actions_per_s": 1 / rollout_seconds, "update_samples_per_s": 1 / update_seconds,
            "update_samples_per_s_with_pi_old": 1 / update_pi_old_seconds,
            "iteration_env_steps_per_s": config.env_steps / iteration,
            "iteration_env_steps_per_s_simulators_hidden": config.env_steps / (iteration - config.env_wait_seconds)}


def measured() -> dict[str, float]:
    """The bf16 rates of MEASURED, read from their result files."""
    rates = {}
    for name, (file, keys) in MEASURED.items():
        value = json.loads((RESULTS / file).read_text())
        for key in keys:
            value = value[key]
        rates[name] = value
    return rates


def main(config: CeilingConfig) -> dict:
    shape = Shape.openvla_7b()
    bounds = ceilings(shape, config)
    rates = measured()
    result = {"gemm_tflops": config.gemm_tflops, "bandwidth_tbs": config.bandwidth_tbs,
              "rollout_batch": config.rollout_batch, "env_steps": config.env_steps,
              "env_wait_seconds": config.env_wait_seconds, "decoder_weights": shape.decoder_weights,
              "vision_weights": shape.vision_weights, "ceiling": bounds,
              "measured_h100": rates, "measured_sources": {name: file for name, (file, _) in MEASURED.items()},
              "share_of_ceiling": {"rollout": rates["rollout"] / bounds["rollout_actions_per_s"],
                                   "update": rates["update"] / bounds["update_samples_per_s"],
                                   "update_with_pi_old": rates["update_with_pi_old"]
                                   / bounds["update_samples_per_s_with_pi_old"]}}
    print(json.dumps(result, indent=1))
    if config.output is not None:
        write_json(config.output, result)
    return result


if __name__ == "__main__":
    main(tyro.cli(CeilingConfig))
