"""Config dataclasses (a docstring per field: that is the CLI help), config files, and their merging.

Every field becomes a flat flag (`--task-suite`, `--lr`, ...): the nested classes only group the help. Where a
default comes from is said in its docstring: REF x.y is section x.y of docs/reference.md (9.8: the defaults of
this trainer's specification). Precedence: dataclass defaults < a resumed run's config.json < `--config`
file < command-line flags.
"""

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import tyro
import yaml

from grpo import Aggregation

ASSETS = Path(__file__).resolve().parent.parent / "assets"
"""The models the repository ships."""
SHIPPED_SFT = ASSETS / "small-oft-libero-spatial-sft"
"""Both ends of one seed of the small-VLA experiment ship (BENCHMARKS.md, "Several seeds"): this is its start, a small
OFT policy trained from scratch by SFT on 12 scripted demos of libero_spatial tasks 0-3."""
SHIPPED_GRPO_ADAPTER = ASSETS / "small-oft-libero-spatial-grpo-lora"
"""The same seed's GRPO result: a LoRA adapter (rank 32 on the LLM, ViTs and projector) for SHIPPED_SFT."""
SHIPPED_LORA = dict(lora_rank=32, lora_alpha=32, lora_projector=True, lora_vision=True)
"""The LoRA settings SHIPPED_GRPO_ADAPTER was trained with (a run that continues it needs the same)."""

DataclassT = TypeVar("DataclassT")
OmitPrefix = tyro.conf.OmitArgPrefixes


@dataclass
class ModelConfig:
    """The policy checkpoint to start from."""

    checkpoint: str = "openvla/openvla-7b-finetuned-libero-spatial"
    """Local directory or hub id of the checkpoint (REF 1.1): for train and eval an SFT checkpoint; for OFT the
    token-head one, not the L1-regression one (REF 9.6). sft may also start from a base or a randomly initialised
    one (scripts/make_small_vla.py trains a small VLA from scratch)."""
    adapter: Path | None = None
    """Start from a saved LoRA adapter: an adapter directory, a checkpoint directory, or a run directory (its
    latest checkpoint). None: a fresh adapter."""
    unnorm_key: str | None = None
    """Action statistics to un-normalise with (REF 1.3); None: the task suite's name (libero_spatial for toy). sft:
    the key of the demos' dataset_statistics.json whose statistics replace the checkpoint's under that key (and its
    _no_noops twin); None: the file's only key."""
    device: str = "auto"
    """Torch device; auto: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype of the weights; auto: on CUDA the dtype the checkpoint was trained in (its config.json's
    training_dtype, else torch_dtype: bfloat16 for the released 7B, whose 15.1 GB then fit a 24 GB card; float32
    for the shipped small policy), float32 on the CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Llama attention kernel; flash_attention_2 needs flash-attn installed and OpenVLA (OFT's bidirectional mask
    needs sdpa or eager)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (a micro-batch of 8-16 steps in ~1-2 GB on a 7B). Off, every layer
    keeps its activations (with the fused kernels ~0.8 GiB a 7B token-head step), so micro-batches up to 4 fit 24 GB:
    replayed from CUDA graphs (--graph-update) the token head's micro-batch of 4 updated 1.36x faster than
    checkpointed 16 in the real trainer on an H100 (34.3 against 25.3 samples/s, the whole iteration 1.22x) and
    peaked at 18.95 GiB (BENCHMARKS.md); at 2 it is slower than checkpointed 16. On by default until OFT's 2 images,
    predicted at 23.5 GiB for micro-batch 4, have run without it; `train --dry-run` predicts the peak."""
    base_quant: Literal["none", "int8", "nf4", "fp8", "fp8-dynamic"] = "none"
    """Store the frozen base's LLM linear weights quantized at load time (QLoRA; torchao, pip install torchao): int8
    (8-bit per-row, CPU and CUDA), nf4 (QLoRA's 4-bit NormalFloat, CPU and CUDA) or fp8 (e4m3, CUDA compute
    capability 8.9+). int8 fits the 7B's iteration in 12 GiB at 0.75x bf16's rollout rate, faster and closer to
    bf16 than fp8 (BENCHMARKS.md); nf4 in 9.2 GiB at 0.40x. fp8-dynamic stores fp8's e4m3 weights and multiplies
    them on FP8 tensor cores by each token's activations rounded to e4m3 too (compute capability 8.9+): the same
    memory as int8, rollouts 1.12-1.15x bf16's, updates 0.90x, log-probs 0.15 nats from bf16's on an H100. The LoRA
    adapters stay in the compute dtype;
    rollout, update and the adapter-disabled KL reference all use the same quantized base; a merged export is
    dequantized into the released layout. LoRA only (not --finetune full)."""
    base_quant_vision: bool = False
    """With --base-quant: also quantize the linear layers of the two ViTs' blocks."""
    cuda_graphs: bool = True
    """On CUDA, replay the vision towers and OpenVLA's decode steps from CUDA graphs kept from one rollout query to
    the next of the same batch and prompt length (VLAPolicy.cuda_graphs; same results): 1.18-1.26x the 7B's eager
    rollout rate on an H100 (BENCHMARKS.md). --no-cuda-graphs runs them eagerly (profiling, a driver without graph
    support). Sharded (--finetune full on several GPUs) policies always run eagerly."""
    graph_update: bool = True
    """With --no-gradient-checkpointing on CUDA: replay the update's Llama forward and backward, and pi_old's
    forward, from CUDA graphs kept for the update's one micro-batch shape (VLAPolicy.graph_update; same results),
    where the eager layers launch their kernels slower than the GPU runs them. Needs --cuda-graphs, sdpa attention
    and LoRA on the Llama layers only (not with --lora-projector / --lora-vision, --base-quant, --compile-layers or
    --finetune full, which run eagerly): the 7B's micro-batch of 4 updates 1.96x faster than eagerly on an H100
    (31.5 against 16.1 samples/s with pi_old, BENCHMARKS.md). --no-graph-update runs the update eagerly."""
    compile_layers: bool = False
    """torch.compile (inductor, dynamic shapes) the blocks without a KV cache: per Llama layer the RMSNorms, the MLP
    and the q/k/v/o projections with their LoRA adapters, and every ViT block (VLAPolicy.compile_layers), so the
    element-wise work around the matrix products runs fused; the first calls compile (85 s for the 7B). Off by
    default: on an H100 it rolls out 1.16x and updates 1.10x faster than eager and needs 2.6 GiB more (counted by
    the memory check), but no whole-iteration run has measured it yet (BENCHMARKS.md). Not with --finetune full."""
    fused_kernels: bool = True
    """On CUDA with liger-kernel installed (pip install liger-kernel), Liger's fused RMSNorm, RoPE and SwiGLU in
    every Llama layer and LoRA's scale-and-add folded into one addmm_ (VLAPolicy.fuse_kernels: one kernel where
    transformers and PEFT run several element-wise ones, same parameters and adapters): 7B update 1.41x, rollout
    1.31x on an H100 (BENCHMARKS.md). Not applied on the CPU, under --compile-layers (which fuses the same work) or
    --finetune full; a CUDA run without the package says so in one line and runs unfused. --no-fused-kernels turns
    them off."""


@dataclass
class LoraConfig:
    """The LoRA adapter (PEFT); only its parameters train."""

    lora_rank: int = 16
    """LoRA rank r (REF 9.8: 16; the released LIBERO SFT adapters used 32, REF 5.4)."""
    lora_alpha: int = 16
    """LoRA alpha (REF 9.8: 16, so the scale alpha/r is 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in the update's forwards only; 0 keeps rollout and update log-probs identical
    (ratio 1 on the first step). Above 0 a recomputed pi_old is a forward without dropout for every step (the
    first mini-batch's gradient pass, which drops out, no longer gives it)."""
    lora_target: tuple[str, ...] = ("all-linear",)
    """LLM layers to adapt: all-linear (every Linear of the Llama decoder, REF 5.4) or names among q_proj k_proj
    v_proj o_proj gate_proj up_proj down_proj."""
    lora_projector: bool = False
    """Also adapt the vision-to-LLM projector."""
    lora_vision: bool = False
    """Also adapt the two ViTs (the blocks whose output is used)."""


@dataclass
class EnvConfig:
    """Which episodes to play."""

    task_suite: str = "libero_spatial"
    """libero_spatial, libero_object, libero_goal, libero_10, libero_90, or toy (a cheap CPU task that proves
    learning, libero_env/toy.py)."""
    task_ids: Annotated[tuple[int, ...], tyro.conf.arg(aliases=("--task-id",))] = ()
    """Tasks to use (--task-id 3 or --task-ids 0 1 2); empty: every task of the suite."""
    num_envs: int = 8
    """Episodes stepped together by the vector env (per rank under torchrun)."""
    overlap_rollouts: Literal["auto", "on", "off"] = "auto"
    """Play the envs as two fixed halves, one half's simulators stepping while the policy computes the other half's
    actions (trainer.rollout.play_episodes), in rollouts and evals. Helps where the policy and the simulators take
    similar time per round: the OFT 7B's chunks of 8 on an H100, +8 % env steps/s in whole iterations (BENCHMARKS.md);
    costs where one dominates (half batches per query). auto: on for an OFT head on CUDA with 2+ envs; off for
    OpenVLA's token head, whose model time is ~3x the simulators', and on the CPU, where both share the cores."""
    max_steps: int | None = None
    """Override the policy-step horizon; None keeps the suite's (REF 5.4: libero_spatial 220, ..., toy 4)."""
    num_heldout: int = 10
    """Init states per task held out of training for the periodic eval (libero_env.init_state_split, seed 0)."""

    def overlaps(self, oft: bool, cuda: bool) -> bool:
        """Whether rollouts and evals play two overlapped halves (`overlap_rollouts`, auto resolved for the policy's
        head and device)."""
        if self.overlap_rollouts != "auto":
            return self.overlap_rollouts == "on"
        return oft and cuda and self.num_envs >= 2


@dataclass
class GrpoConfig:
    """The algorithm (REF 9). The reward is binary task success, one per episode (REF 9.1.2)."""

    group_size: int = 8
    """G: rollouts from the same (task, init state) that form one advantage group (G=8 in SVR and RLinf)."""
    groups_per_iteration: int = 8
    """Groups in one iteration's update (per rank); with dynamic sampling, informative groups."""
    temperature: float = 1.6
    """Sampling temperature of the rollouts and of the update's log-probs (1.6 in the LIBERO anchors)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (they have zero advantage, REF 9.1.6) and refill with new groups."""
    max_refill_rounds: int = 4
    """Extra rollout rounds per iteration to refill dropped groups; past it the update uses the groups it has."""
    scale_by_std: bool = True
    """Divide by the group's unbiased std (GRPO); False: the Dr. GRPO advantage R - mean (REF 9.1.7)."""
    aggregation: Aggregation = "token-mean"
    """Loss aggregation over a mini-batch (REF 9.2.4): token-mean (DAPO), seq-mean-token-mean (GRPO), constant
    (Dr. GRPO: the token sum over mini_batch_size x ranks x action tokens per step, a fixed normaliser). Steps have
    no padding, so constant differs from token-mean only where a mini-batch holds other than mini_batch_size
    steps per rank (an iteration's steps split into max(1, steps // mini_batch_size) parts): fewer steps weigh
    less, more weigh more."""
    clip_low: float = 0.2
    """PPO ratio clip eps_low (REF 9.3, 9.8)."""
    clip_high: float = 0.28
    """Clip-higher eps_high (DAPO; REF 9.3, 9.8)."""
    log_ratio_clamp: float = 5.0
    """Clamp of log(pi / pi_old) before exp (REF 9.8)."""
    advantage_clamp: float = 10.0
    """Clamp of |advantage| (REF 9.8)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the base model (the same model with the adapter disabled, REF 9.4); 0 as in every
    surveyed VLA recipe."""
    old_log_probs: Literal["auto", "rollout", "recompute"] = "auto"
    """pi_old of the PPO ratio. rollout: the log-probs the rollout sampled with; recompute: the update's own
    forward over the iteration's steps, in the first epoch's micro-batches, before any optimizer step, so the first
    ratio is exactly 1 (bfloat16 decoding with a KV cache and the teacher-forced forward round differently: 0.016
    mean, 0.06 max |log-prob| apart on the 7B): one gradient-free pass over the later mini-batches, while the
    first mini-batch's steps take their gradient pass's own log-probs, the same numbers (so an iteration of one
    mini-batch and one epoch pays nothing for it); auto: recompute where the rollout computes its log-probs
    differently from the update, i.e. the token head in bfloat16 (and OFT on an fp8-dynamic base), rollout for OFT
    in bfloat16 (its rollout is the update's own forward, batch shape aside) and in float32 (the paths agree to
    ~1e-5). Either way train/rollout_logprob_mismatch (and _max) logs the mean (largest) |rollout - update|
    log-prob before the first step."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss subtracts entropy_coef x the aggregated per-token entropy of the 256
    action bins (verl's entropy_coeff). It slows the collapse of action tokens no reward depends on yet; 0 is
    plain GRPO (REF 9.8)."""

    def recomputes_old_log_probs(self, bfloat16: bool, oft: bool, base_quant: str) -> bool:
        """Whether pi_old is the update's own forward, with `old_log_probs` auto resolved for a policy computing in
        bfloat16 or not, with an OFT head or the token head, on `base_quant`: recompute where the rollout computes
        its log-probs other than the update does. The token head in bf16 decodes with a KV cache, a token at a time,
        which rounds differently from the update's one teacher-forced forward (0.016 mean, 0.06 max on the 7B);
        OFT's rollout runs the update's own function in one parallel forward (batch shapes aside: float rounding,
        `train/rollout_logprob_mismatch` and `_max`), unless fp8-dynamic rounds each token to e4m3, where another
        batch shape can flip a rounding; in float32 the paths agree to ~1e-5."""
        if self.old_log_probs != "auto":
            return self.old_log_probs == "recompute"
        return bfloat16 and (not oft or base_quant == "fp8-dynamic")


@dataclass
class AdamWConfig:
    """The optimizer (GRPO and SFT)."""

    lr: float = 1e-5
    """AdamW learning rate of the trained parameters (REF 9.8: AdamW; sft: peak lr, OpenVLA's LIBERO LoRA recipe
    5e-4 constant, REF 5.4)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, on every trained parameter."""


@dataclass
class OptimConfig(AdamWConfig):
    """The update."""

    warmup_iterations: int = 0
    """Linear learning-rate warm-up over this many iterations, constant afterwards."""
    ppo_epochs: int = 1
    """Passes over an iteration's rollouts (1: on-policy, the ratio is 1 on the first mini-batch, REF 9.5)."""
    mini_batch_size: int = 512
    """Policy steps per optimizer step (per rank). An iteration's steps are shuffled and split into
    max(1, steps // mini_batch_size) mini-batches."""
    micro_batch_size: int = 16
    """Steps per forward/backward, gradients accumulate over the mini-batch; 1 is the per-sample
    backward mode (REF 9.8). Must divide mini_batch_size."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (REF 9.8)."""
    skip_grad_norm: float = 100.0
    """Skip the optimizer step (and count it) when the gradient norm before clipping is above this or not finite
    (REF 9.8)."""
    max_skipped_in_a_row: int = 20
    """Stop the run with an error after this many skipped optimizer steps in a row (gradient norm not finite or
    above skip_grad_norm, or a step that made a trained weight non-finite and was undone): the run has diverged
    and its last checkpoint is the state to resume from with a lower lr. 0: never stop."""


@dataclass
class EvalConfig:
    """The periodic greedy eval on held-out init states."""

    eval_every: int = 10
    """Iterations between evals (0: never)."""
    eval_at_start: bool = True
    """Also evaluate before the first update, the baseline to compare with."""
    eval_episodes_per_task: int | None = None
    """Held-out episodes per task in each eval; None: every held-out init state (num_heldout)."""
    num_videos: int = 2
    """Eval episodes per eval written as MP4 to videos/ in the run directory."""


@dataclass
class LogConfig:
    """Where outputs go."""

    output_dir: Path = Path("runs")
    """Parent directory of run directories."""
    run_name: str | None = None
    """Run directory name under output_dir; None: <suite>-<date>-<time> (demo-<date>-<time> for the demo). An
    existing run directory is only reused by --resume."""
    use_wandb: Annotated[bool, tyro.conf.arg(aliases=("--wandb",))] = False
    """Also log to Weights & Biases (metrics.jsonl is always written)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """wandb mode when --use-wandb is on (offline: sync later with `wandb sync`)."""
    wandb_project: str = "openvla-grpo"
    """wandb project."""
    progress: bool = True
    """Progress bars for rollouts and updates (shown on a terminal only)."""


@dataclass
class CheckpointConfig:
    """Checkpoints (adapter or full model, optimizer, scheduler, RNG, sampler, step, config), written atomically."""

    save_every: int = 10
    """Iterations between checkpoints; the last iteration is always saved."""
    keep_last: int = 3
    """Newest checkpoints kept on disk; 0 keeps all."""


@dataclass
class TrainConfig:
    """GRPO + LoRA (or full) fine-tuning of an OpenVLA / OpenVLA-OFT checkpoint on a LIBERO suite."""

    finetune: Literal["lora", "full"] = "lora"
    """lora: train a PEFT LoRA adapter (the --lora-* flags), the rest frozen; full: train every weight the policy
    uses, sharded with FSDP under torchrun (no --kl-coef; the 7B needs several 80 GB GPUs, README "Hardware")."""
    model: OmitPrefix[ModelConfig] = field(default_factory=ModelConfig)
    lora: OmitPrefix[LoraConfig] = field(default_factory=LoraConfig)
    env: OmitPrefix[EnvConfig] = field(default_factory=EnvConfig)
    grpo: OmitPrefix[GrpoConfig] = field(default_factory=GrpoConfig)
    optim: OmitPrefix[OptimConfig] = field(default_factory=OptimConfig)
    evaluation: OmitPrefix[EvalConfig] = field(default_factory=EvalConfig)
    logging: OmitPrefix[LogConfig] = field(default_factory=LogConfig)
    checkpointing: OmitPrefix[CheckpointConfig] = field(default_factory=CheckpointConfig)
    seed: int = 0
    """Seed of model init, group sampling (scenes included) and action sampling (rank r samples with seed + r); the
    periodic held-out eval plays scene `seed` of each held-out init state, the same scenes in every eval."""
    timesteps: int = 2_000_000
    """Budget of policy steps collected over all ranks; the run stops once it is spent."""
    iterations: int | None = None
    """Stop after this many iterations (updates) even if timesteps remain; None: timesteps alone decide."""
    max_seconds: float = 0.0
    """Stop after the first iteration that ends this many seconds after the process started (with its eval and a
    checkpoint), e.g. to fit a machine lent for a fixed time; --resume continues. 0: no limit."""
    config: Path | None = None
    """YAML or JSON file of defaults, nested like a run's config.json or flat like the flags; flags override it."""
    resume: Path | None = None
    """Continue the run in this directory from its latest checkpoint, with its saved config (flags override)."""
    dry_run: bool = False
    """Check the config, print the run directory and exit without starting anything."""


@dataclass
class DemoConfig(TrainConfig):
    """`make train`: the shipped small OFT policy (assets/: the SFT start of one seed, and its GRPO LoRA adapter)
    evaluated on held-out init states and trained with GRPO for a few iterations on real LIBERO libero_spatial on
    the CPU with 2 envs; writes logs, a checkpoint, a plot and videos in minutes. Any train flag can be added."""


@dataclass
class EvaluateConfig:
    """Greedy (or sampled) evaluation of a checkpoint (+ adapter): a per-task success table (JSON and markdown)
    and videos."""

    model: OmitPrefix[ModelConfig] = field(default_factory=ModelConfig)
    env: OmitPrefix[EnvConfig] = field(default_factory=EnvConfig)
    protocol: Literal["reference", "heldout", "train"] = "reference"
    """reference: init states 0..trials_per_task-1 of every task, as the published numbers (REF 5.4); heldout:
    the num_heldout init states that training never sees; train: init states of the training split (what GRPO
    trains on), to compare with held-out success."""
    trials_per_task: int = 50
    """Episodes per task (REF 5.4: 50); heldout and train take the first trials_per_task init states of their
    split, or all of them when the split has fewer."""
    temperature: float | None = None
    """None: greedy actions (the published protocol). A value: sample the action tokens at this temperature, as
    GRPO's rollouts do; the sampled success is the signal GRPO starts from."""
    seed: int = 7
    """Seed of everything (REF 5.4: 7), also of the scenes: each episode is played in scene `seed` of its (task,
    init state) (libero_env.EpisodeSpec.scene), so evals of two models with one seed play the same episodes and
    their difference is paired."""
    num_videos: int = 10
    """Episodes written as MP4: the first episode of each task, up to this many."""
    output_dir: Path = Path("runs")
    """Parent directory of the results directory."""
    run_name: str | None = None
    """Results directory name under output_dir; None: eval-<suite>-<date>-<time>. Never overwritten."""
    progress: bool = True
    """Progress bar over episodes (shown on a terminal only)."""
    config: Path | None = None
    """YAML or JSON file of defaults; flags override it."""


@dataclass
class SftConfig:
    """Supervised fine-tuning (SFT) of an OpenVLA / OpenVLA-OFT checkpoint on expert demos, LoRA or full: the warm
    start GRPO improves on."""

    demos: Path
    """Demo directory in the libero_env.demos format: episodes/task*_init*.npz and dataset_statistics.json."""
    output_dir: Path
    """Run directory this run creates (config.json, metrics.jsonl, checkpoints/, adapter/, model/); an existing one
    is an error unless `resume` is set."""
    finetune: Literal["lora", "full"] = "lora"
    """lora: train a PEFT LoRA adapter (the --lora-* flags), the rest frozen; full: train every weight the policy
    uses (for small models; the 7B needs far more than 24 GB for it)."""
    model: OmitPrefix[ModelConfig] = field(default_factory=lambda: ModelConfig(checkpoint="openvla/openvla-7b"))
    lora: OmitPrefix[LoraConfig] = field(default_factory=lambda: LoraConfig(lora_rank=32))
    optim: OmitPrefix[AdamWConfig] = field(default_factory=lambda: AdamWConfig(lr=5e-4))
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: constant (OpenVLA's LIBERO recipe) or a cosine decay from lr to 0 at the last step."""
    warmup_steps: int = 0
    """Steps of linear warmup: step k (1-based) of the warmup uses lr * k / (warmup_steps + 1)."""
    batch_size: int = 8
    """Samples (demo steps) per optimizer step, drawn without replacement from a fresh shuffle every epoch."""
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run may raise it; the cosine then spreads over the new total)."""
    seed: int = 0
    """Seed of the LoRA initialisation, of the shuffling and of the image augmentation."""
    image_aug: bool = False
    """Augment every training image on its own as OpenVLA's LIBERO fine-tunes did (all released LIBERO models were
    trained with it, REF 5.3): a random position of the 0.9-area crop, then brightness, contrast, saturation and
    hue jitter. The demos hold the evaluation's centre crop, so the crop is a shift of up to 6 pixels (edges
    repeated): the random 0.9-area crop expressed around that centre crop, at the same scale."""
    log_every: int = 10
    """Steps between metrics lines (the loss is the mean over these steps)."""
    save_every: int = 500
    """Steps between resumable checkpoints (checkpoints/iter_<step>); the last step always saves and exports."""
    resume: bool = False
    """Continue an existing output_dir from its last checkpoint exactly: weights, AdamW and scheduler states, step,
    the batch sequence and metrics.jsonl (lines past the checkpoint are dropped). Its config must be equal except
    for sft.RESUME_MAY_CHANGE. Without a checkpoint yet (or without output_dir) the run starts from step 0."""
    max_seconds: float = 0.0
    """Save a checkpoint and return after this many seconds of wall time (model loading included), even before
    `steps`; a later run with resume continues. For machines lent in fixed slices of time. 0: no limit."""
    loader_workers: int = 0
    """Processes that decode (and augment) batches ahead of the training step; 0 does it in the main process.
    JPEG decoding costs about 1 ms an image and the augmentation 4-8 ms (one core, 224x224)."""


@dataclass
class PlotConfig:
    """Draw success-rate and loss curves of a run from its metrics.jsonl to a PNG."""

    run_dir: tyro.conf.Positional[Path]
    """The run directory (holding metrics.jsonl)."""
    output: Path | None = None
    """PNG to write; None: <run_dir>/curves.png."""


@dataclass
class CompareConfig:
    """Compare two evals of the same episodes (e.g. a checkpoint without and with its adapter, one --seed) episode
    by episode: the change in success with a paired 95 % interval and McNemar's exact p-value."""

    before: tyro.conf.Positional[Path]
    """The first eval's results directory (runs/eval-...) or its results.json."""
    after: tyro.conf.Positional[Path]
    """The second eval's results directory or results.json."""


def demo_defaults() -> DemoConfig:
    """What `make train` runs: the shipped seed's SFT end (SHIPPED_SFT) is evaluated and trained with GRPO and a fresh
    LoRA adapter on real LIBERO on the CPU, with every output of a real run, in minutes; `--adapter
    assets/small-oft-libero-spatial-grpo-lora` continues the seed's GRPO end instead. Task 0 with the seed's held-out
    split and the seed recipe's LoRA settings, temperature and learning rate. Both ends measured (docs/experiments.md,
    "make train demo defaults"): from the SFT end all 6 groups of 4 rollouts in two runs mixed successes and failures,
    so every update had a signal; from the GRPO end 2 of 6 were all-success or all-fail."""
    return DemoConfig(
        finetune="lora",
        model=ModelConfig(checkpoint=str(SHIPPED_SFT), dtype="float32", gradient_checkpointing=False),
        lora=LoraConfig(**SHIPPED_LORA),
        env=EnvConfig(task_suite="libero_spatial", task_ids=(0,), num_envs=2, num_heldout=25),
        grpo=GrpoConfig(group_size=4, groups_per_iteration=1, temperature=0.5, dynamic_sampling=False),
        optim=OptimConfig(lr=1.5e-4, mini_batch_size=32, micro_batch_size=16),
        evaluation=EvalConfig(eval_every=3, eval_at_start=True, eval_episodes_per_task=2, num_videos=1),
        logging=LogConfig(progress=True),
        checkpointing=CheckpointConfig(save_every=3, keep_last=1),
        iterations=3,
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (Paths as strings, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def load_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json config file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()} "
                         f"({' '.join(str(error).split())}); fix or replace it") from error
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path} must hold a mapping of field names to values, got {type(data).__name__}")
    return dict(data)


def apply_overrides(base: DataclassT, data: Mapping[str, Any], where: str) -> DataclassT:
    """A copy of the dataclass `base` with the values in `data`: nested mappings for nested configs, or flat keys
    (as the flags are) that name a field of exactly one nested config. Unknown keys and wrong types raise."""
    hints = typing.get_type_hints(type(base), include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(base)}
    nested = {name for name in fields if dataclasses.is_dataclass(getattr(base, name))}
    changes: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in nested:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: {key} must be a mapping of its fields, got {value!r}")
            changes[key] = apply_overrides(changes.get(key, getattr(base, key)), value, f"{where}.{key}")
        elif key in fields:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
        else:
            owners = [n for n in nested if key in {f.name for f in dataclasses.fields(getattr(base, n))}]
            if len(owners) != 1:
                valid = sorted(set(fields) - nested | {f"{n}.{f.name}" for n in nested
                                                       for f in dataclasses.fields(getattr(base, n))})
                raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
            owner = owners[0]
            changes[owner] = apply_overrides(changes.get(owner, getattr(base, owner)), {key: value}, f"{where}")
    return dataclasses.replace(base, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` from a JSON/YAML file as the type `hint`, or a ValueError naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _coerce(value, args[0], where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # a run saved when the field was a flag
            return "on" if value else "off"
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Path:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


RETIRED_SPEED_SETTINGS = {"grpo": ("pi_old_while_simulating",)}
"""Fields of earlier versions that set only where work ran, never the results: a run saved with them resumes
without them (--pi-old-while-simulating computed pi_old during the rollout, the same numbers)."""


def without_retired_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run config without RETIRED_SPEED_SETTINGS."""
    kept = dict(saved)
    for section, names in RETIRED_SPEED_SETTINGS.items():
        if isinstance(kept.get(section), Mapping):
            kept[section] = {k: v for k, v in kept[section].items() if k not in names}
    return kept


def defaults_from_files(base: DataclassT, args: Sequence[str]) -> DataclassT:
    """`base` updated with the run config named by --resume (if the dataclass has that field) and then the file
    named by --config, both read from `args` before the full parse so that flags override them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--resume", type=Path)
    known, _ = parser.parse_known_args(args)
    if known.resume is not None and hasattr(base, "resume"):
        saved = known.resume / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {known.resume}: no config.json there; pass a run directory that "
                                    f"this trainer created (it holds config.json and checkpoints/)")
        base = apply_overrides(base, without_retired_settings(load_config_file(saved)), str(saved))
    if known.config is not None:
        base = apply_overrides(base, load_config_file(known.config), str(known.config))
    return base
