"""GRPO + LoRA (or full) fine-tuning of OpenVLA / OpenVLA-OFT policies in the LIBERO simulator. A failure prints
one line; add --traceback (or set OPENVLA_GRPO_TRACEBACK=1) for the full traceback.

    python OpenVLA_GRPO.py train --checkpoint openvla/openvla-7b-finetuned-libero-spatial --task-suite libero_spatial
    python OpenVLA_GRPO.py eval --checkpoint ... --adapter runs/<run>      # published protocol: 50 trials, seed 7
    python OpenVLA_GRPO.py demo                                            # `make train`: shipped small policy, CPU
    python OpenVLA_GRPO.py plot runs/<run>
    python OpenVLA_GRPO.py compare runs/<eval-a> runs/<eval-b>              # paired: same episodes, two models
    python OpenVLA_GRPO.py sft --demos demos/ --output-dir runs/sft --checkpoint ...  # supervised warm start
    torchrun --nproc-per-node 4 OpenVLA_GRPO.py train ...                  # data parallel, one process per GPU
    torchrun --nproc-per-node 8 OpenVLA_GRPO.py train ... --finetune full  # every weight, sharded with FSDP

The GRPO loop is `GRPOTrainer.train` (with `update`); the only module that knows libero_env (the simulator),
vla_actor (the model) and grpo (the math) together. DESIGN.md shows how they meet.
"""

import dataclasses
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import grpo
from libero_env import EpisodeSpec, init_state_split
from sft import run_sft
from trainer import distributed, fsdp
from trainer.checkpoint import (MODEL_DIR, checkpoint_dirs, latest_checkpoint, load_checkpoint,
                                new_run_directory, outermost_missing, remove_partial_checkpoints, rng_state,
                                save_checkpoint, set_rng_state, write_json)
from trainer.config import (CompareConfig, DemoConfig, EvaluateConfig, ModelConfig, PlotConfig, SftConfig, TrainConfig,
                            config_to_dict, defaults_from_files, demo_defaults)
from trainer.envs import TOY, make_env, suite_shape
from trainer.errors import UserError, one_line_errors, traceback_requested
from trainer.evaluation import compare_evals, evaluate, rank_share, run_eval_dir, write_results
from trainer.metrics import MetricsLogger, UpdateStats
from trainer.plot import plot_run
from trainer.policy_builder import build_policy
from trainer.rollout import PolicyInputs, Rollouts, collect_groups, env_halves, first_tasks
from trainer.sampler import GroupSampler
from trainer.validation import (EvalPlan, TrainPlan, check_eval, check_output_space, check_train,
                                checkpoint_bytes)
from vla_actor import VLAPolicy
from vla_actor.checkpoint import dtype_name

UPDATE_STATS = {"mean": ("entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl_k1",
                         "approx_kl_k3", "kl_to_base", "grad_norm", "rollout_logprob_mismatch"),
                "min": ("ratio_min",), "max": ("ratio_max", "grad_norm_max", "rollout_logprob_mismatch_max")}


class GRPOTrainer:
    """Turns an SFT checkpoint and a LIBERO suite into a better policy with GRPO + LoRA (or full fine-tuning)."""

    def __init__(self, config: TrainConfig, plan: TrainPlan | None = None) -> None:
        """`plan` is what main resolved from `config` (check_train); tests and benchmarks that build a trainer
        directly leave it out and it is resolved here. The run directory is written only once the model, the
        adapter and the checkpoint to resume have loaded, so a failure before leaves the disk as it was."""
        self.started, self.out_of_time = time.monotonic(), False  # for --max-seconds
        self.config, self.ctx = config, distributed.setup(config.model.device)
        plan = plan or check_train(config, self.ctx.rank)
        self.run_dir, self.task_ids, self.resumed = plan.run_dir, plan.task_ids, plan.resume_from is not None
        train_inits, self.heldout_inits = init_state_split(suite_shape(config.env.task_suite).num_init_states,
                                                           config.env.num_heldout, seed=0)
        seed_everything(config.seed)  # the same fresh adapter on every rank
        full = config.finetune == "full"
        self.policy = build_policy(config.model, None if full else config.lora,
                                   unnorm_key(config.model, config.env.task_suite), self.ctx.device, full=full)
        # FSDP units of a sharded model (full fine-tuning on several ranks); none otherwise
        self.units = fsdp.shard(self.policy) if full and self.ctx.enabled else []
        self.params = list(self.policy.trainable_parameters())
        if not full:  # every rank loaded the same checkpoint; only a fresh adapter differs
            distributed.broadcast_parameters(self.params, self.ctx)
        if self.ctx.is_main:  # before the first rollout: room for the checkpoint this model will write
            check_output_space(self.run_dir, checkpoint_bytes(sum(p.numel() for p in self.params),
                                                              self.params[0].element_size()), "run directory")
        seed_everything(config.seed + self.ctx.rank)  # each rank samples its own actions
        self.inputs = policy_inputs(self.policy)
        self.recompute_old_log_probs = config.grpo.recomputes_old_log_probs(
            self.policy.dtype == torch.bfloat16, self.policy.is_oft, config.model.base_quant)
        # the first mini-batch's gradient pass gives pi_old of its steps, unless training mode drops anything out
        self.pi_old_from_gradient_pass = self.recompute_old_log_probs and not self.policy.drops_out_in_training
        self.overlap = config.env.overlaps(self.policy.is_oft, self.policy.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_factor, warmup=config.optim.warmup_iterations))
        self.sampler = GroupSampler(self.task_ids, train_inits, seed=[config.seed, self.ctx.rank])
        self.iteration = self.env_steps = self.skipped_steps = self.skipped_in_a_row = 0
        self.env = make_env(config.env, wrist=self.inputs.wrist)
        self.env_tasks: list[int | None] = [None] * self.env.num_envs  # each env's last task (rollout.play_episodes)
        # every teacher-forced forward pads its prompts to the tasks' longest: one shape, so a step's log-probs do
        # not depend on the steps beside it and pi_old's forward equals the gradient pass's (VLAPolicy.log_probs)
        self.prompt_length = self.policy.longest_prompt([self.env.instruction(t) for t in self.task_ids])
        # steps whose vision output one pass computes for several update micro-batches: the rollout's batch (a
        # whole number of micro-batches), where the towers run faster a step than at a micro-batch of 4 and replay
        # the rollout's kept graph; None: each micro-batch runs its own (one per micro-batch, or the vision trains)
        micro, queried = config.optim.micro_batch_size, len(env_halves(self.env.num_envs, self.overlap)[0])
        shared = micro * -(-queried // micro)
        self.vision_chunk = shared if self.policy.vision_frozen and shared > micro else None
        if plan.resume_from is not None:  # after everything that draws random numbers before the first rollout
            state = load_checkpoint(plan.resume_from, self.policy, self.optimizer, self.scheduler, self.ctx.rank,
                                    self.ctx.world_size)
            self.iteration, self.env_steps = state["iteration"], state["env_steps"]
            self.skipped_steps, self.skipped_in_a_row = state["skipped_steps"], state.get("skipped_in_a_row", 0)
            self.sampler.load_state_dict(state["samplers"][self.ctx.rank])
            saved_tasks = state.get("env_tasks", [[]] * self.ctx.world_size)[self.ctx.rank]
            if len(saved_tasks) == self.env.num_envs:  # else --num-envs changed on resume: no env holds a task
                self.env_tasks = list(saved_tasks)
        restored_rng = rng_state()  # the logger's wandb.init must not move the restored generators
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=self.resumed)
            remove_partial_checkpoints(self.run_dir)
            write_json(self.run_dir / "config.json", config_to_dict(_as_saved(config)))
        self.logger = MetricsLogger(self.run_dir, config_to_dict(config), config.logging, self.ctx.is_main,
                                    resume_iteration=self.iteration if self.resumed else None)
        set_rng_state(restored_rng)

    def train(self) -> Path:
        """The GRPO loop (DESIGN.md "One GRPO iteration"); returns the run directory."""
        cfg, ctx = self.config, self.ctx
        if cfg.evaluation.eval_every > 0 and cfg.evaluation.eval_at_start and self.iteration == 0:
            self.logger.log({"iteration": 0, "env_steps": 0, **self.evaluate()})
        while not self.finished():
            started = time.perf_counter()
            # G rollouts of each (task, init state) group from the training split; binary success rewards;
            # groups with all-equal rewards dropped and refilled (dynamic sampling, REF 9.1.6).
            with fsdp.gathered(self.units):
                batch, counts = collect_groups(
                    self.env, self.policy, self.sampler, self.inputs, cfg.grpo.group_size,
                    cfg.grpo.groups_per_iteration, cfg.grpo.temperature, cfg.grpo.dynamic_sampling,
                    cfg.grpo.max_refill_rounds, progress=cfg.logging.progress and ctx.is_main,
                    overlap=self.overlap, fixed_batch=self.policy.fixed_batch, env_tasks=self.env_tasks)
            rollout_seconds = time.perf_counter() - started
            advantages = (grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids),
                                                scale_by_std=cfg.grpo.scale_by_std)
                          if batch.num_episodes else torch.zeros(0))
            counts = distributed.reduce_values({**counts, **advantage_sums(advantages)}, ctx)
            self.env_steps += int(counts["episode_length_sum"])
            # the simulators build the scenes of their next episodes while the update runs
            self.env.build_scenes(first_tasks(self.upcoming_episodes(), self.env_tasks))
            metrics = self.update(batch, advantages)
            self.scheduler.step()
            self.iteration += 1
            self.out_of_time = self.config.max_seconds > 0 and distributed.reduce_values(
                {"seconds": time.monotonic() - self.started}, ctx, op="max")["seconds"] > self.config.max_seconds
            trained = metrics["train/steps"] * cfg.optim.ppo_epochs
            metrics = {"iteration": self.iteration, "env_steps": self.env_steps, **metrics,
                       **rollout_metrics(counts, self.task_ids),
                       **perf_metrics(counts, trained, rollout_seconds, started, ctx, cfg.env.num_envs)}
            if self.evaluates_after(self.iteration, last=self.finished()):
                metrics.update(self.evaluate())
            self.logger.log(metrics)
            if self.iteration % cfg.checkpointing.save_every == 0 or self.finished():
                self.save()
            self.stop_if_diverged()
        return self.run_dir

    def stop_if_diverged(self) -> None:
        """--max-skipped-in-a-row skipped optimizer steps in a row end the run with what to restart from."""
        cfg = self.config
        if not 0 < cfg.optim.max_skipped_in_a_row <= self.skipped_in_a_row:
            return
        latest = latest_checkpoint(self.run_dir) if checkpoint_dirs(self.run_dir) else None
        restart = (f"--adapter {latest}" if cfg.finetune == "lora" else f"--checkpoint {latest / MODEL_DIR}") \
            if latest is not None else "the same --checkpoint"
        raise UserError(f"the last {self.skipped_in_a_row} optimizer steps in a row were skipped (gradient norm not "
                        f"finite or above --skip-grad-norm {cfg.optim.skip_grad_norm}, or the step made trained "
                        f"weights non-finite): the run diverged at iteration {self.iteration}. Start a new run from "
                        f"{restart} with a lower --lr (now {cfg.optim.lr}), or raise --max-skipped-in-a-row")

    def update(self, batch: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches of steps, one clipped optimizer step per mini-batch, skipped
        (and counted) when the gradient norm is not finite or above --skip-grad-norm, or undone (and counted the
        same way) when it made a trained weight non-finite."""
        cfg, ctx = self.config, self.ctx
        total_steps = int(distributed.reduce_values({"steps": batch.num_steps}, ctx)["steps"])
        if total_steps == 0:  # every group was dropped on every rank: nothing to learn from
            return {"train/steps": 0, "train/optimizer_steps": 0, "train/skipped_steps": 0,
                    "train/skipped_steps_total": self.skipped_steps}
        num_minibatches = max(1, total_steps // (cfg.optim.mini_batch_size * ctx.world_size))
        epochs = [shuffled_minibatches(batch.num_steps, num_minibatches, cfg.optim.micro_batch_size)
                  for _ in range(cfg.optim.ppo_epochs)]
        stats, loss, optimizer_steps, skipped = UpdateStats(), 0.0, 0, 0
        old_log_probs = self.old_log_probs(batch, epochs[0], stats)
        bar = tqdm(total=cfg.optim.ppo_epochs * num_minibatches, desc="update", unit="step", leave=False,
                   disable=None if cfg.logging.progress and ctx.is_main else True)
        for epoch, minibatches in enumerate(epochs):
            for index, rows in enumerate(minibatches):
                bar.update()
                loss += self.accumulate_gradients(batch, advantages, rows, stats, old_log_probs,
                                                  before_any_step=epoch == index == 0)
                # sharded (DTensor) gradients give the norm of the whole gradient, the same on every rank
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm))
                if np.isfinite(grad_norm) and grad_norm <= cfg.optim.skip_grad_norm and self.optimizer_step():
                    optimizer_steps += 1
                    self.skipped_in_a_row = 0
                    stats.mean("grad_norm", grad_norm, 1.0)
                    stats.maximum("grad_norm_max", grad_norm)
                else:
                    skipped += 1
                    self.skipped_in_a_row += 1
                self.optimizer.zero_grad(set_to_none=True)
        bar.close()
        self.skipped_steps += skipped
        loss = distributed.reduce_values({"loss": float(loss)}, ctx)["loss"] / (num_minibatches * cfg.optim.ppo_epochs)
        return {"train/loss": loss, **stats.reduce(ctx, UPDATE_STATS), "train/steps": total_steps,
                "train/optimizer_steps": optimizer_steps,
                "train/skipped_steps": skipped, "train/skipped_steps_total": self.skipped_steps,
                "train/lr": self.scheduler.get_last_lr()[0], "train/minibatches": num_minibatches}

    def old_log_probs(self, batch: Rollouts, first_epoch: list[torch.Tensor], stats: UpdateStats) -> torch.Tensor:
        """pi_old of the ratio (--old-log-probs): the rollout's log-probs, or the update's own forward over every
        step before any optimizer step (then the first ratio is exactly 1 and train/rollout_logprob_mismatch is
        measured over all steps): here the steps of the later mini-batches, in micro-batches of any steps (one
        shape, so the same numbers). The first mini-batch's gradient pass runs before any step too and fills in its
        own (NaN until then), so its forward is not run twice (the no-grad and the gradient forward are equal bit
        for bit, test_vla_gpu.py), unless training mode drops out (--lora-dropout): then this pass covers the first
        mini-batch too."""
        if not self.recompute_old_log_probs:
            return batch.log_probs
        recomputed = torch.full_like(batch.log_probs, float("nan"))
        covered = first_epoch[1:] if self.pi_old_from_gradient_pass else first_epoch
        rows = torch.cat(covered) if covered else torch.zeros(0, dtype=torch.long)
        size = self.config.optim.micro_batch_size
        with torch.no_grad(), fsdp.gathered(self.units):
            parts = [self.policy.log_probs(*self.step_inputs(batch, rows[part]), pad_to=size,
                                           prompt_length=self.prompt_length, patches=patches)[0].float()
                     for part, patches in self.micro_batches(batch, rows)]
        if len(rows):
            recomputed[rows] = torch.cat(parts).cpu()  # one copy back: each waits for the GPU to finish
            gap = (recomputed[rows] - batch.log_probs[rows]).abs()
            stats.mean("rollout_logprob_mismatch", gap.mean(), gap.numel())
            stats.maximum("rollout_logprob_mismatch_max", gap.max())
        return recomputed

    def micro_batches(self, batch: Rollouts, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """`rows` cut into micro-batches (positions in `rows`), each with its steps' vision output where one pass
        serves several micro-batches (`vision_chunk`), else None. Every pass runs at one shape, so a step's patches
        are the same in pi_old's forward and in its gradient pass."""
        size, positions = self.config.optim.micro_batch_size, torch.arange(len(rows))
        for chunk in positions.split(self.vision_chunk or size):
            patches = None
            if self.vision_chunk is not None:
                index = rows[chunk].numpy()
                patches = self.policy.patches(batch.agentview[index], batch.wrist[index] if self.inputs.wrist else None,
                                              pad_to=self.vision_chunk)
            for start in range(0, len(chunk), size):
                yield chunk[start:start + size], None if patches is None else patches[start:start + size]

    def step_inputs(self, batch: Rollouts, rows: torch.Tensor) -> tuple:
        """policy.log_probs arguments of some stored steps."""
        index = rows.numpy()
        return (batch.agentview[index], [batch.instructions[i] for i in index], batch.token_ids[rows],
                batch.wrist[index] if self.inputs.wrist else None,
                batch.proprio[index] if self.inputs.proprio else None, self.config.grpo.temperature)

    def optimizer_step(self) -> bool:
        """One AdamW step; False when it made a trained weight non-finite (a huge lr, an overflow) and was undone.

        With LoRA the trained values are a small part of the model (r=16 on the 7B: 40M values, 160 MB in fp32
        and 320 MB of AdamW moments), so a copy taken before each step is cheap on a 24 GB card, and restoring it
        undoes the step exactly (weights and optimizer state). Full fine-tuning would need a second copy of every
        weight and moment (84 GB for the 7B), so there a non-finite step stops the run instead; no checkpoint is
        written after it, so the last one holds the weights before the divergence."""
        if self.config.finetune == "full":
            self.optimizer.step()
            if not self.weights_finite():
                raise UserError(f"an optimizer step at iteration {self.iteration + 1} made trained weights "
                                f"non-finite (--lr {self.config.optim.lr}); start a new run from the last checkpoint "
                                f"of {self.run_dir} (--checkpoint .../model) with a lower --lr")
            return True
        before = [(p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
                   if (state := self.optimizer.state.get(p)) is not None else None) for p in self.params]
        self.optimizer.step()
        if self.weights_finite():
            return True
        with torch.no_grad():
            for p, (weights, state) in zip(self.params, before):
                p.copy_(weights)
                if state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = state
        return False

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite, on every rank (each checks its shard under FSDP)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in local]).all()) if local else True
        return distributed.reduce_values({"bad": float(not finite)}, self.ctx, "max")["bad"] == 0

    def accumulate_gradients(self, batch: Rollouts, advantages: torch.Tensor, rows: torch.Tensor, stats: UpdateStats,
                             old_log_probs: torch.Tensor | None = None,
                             before_any_step: bool = False) -> torch.Tensor | float:
        """Gradients of one mini-batch (`rows` of this rank's steps; together with the other ranks' rows it is
        the global mini-batch) summed over ranks, through micro-batches whose losses add up to the mini-batch
        loss; returns this rank's share of that loss (on the GPU, read back once per update: a read waits for the
        queued work). A sharded model (FSDP) sums them in its backward passes.
        `old_log_probs`: pi_old of every step (None: the rollout's). `before_any_step`: these forwards precede every
        optimizer step, so they measure how far the rollout's log-probs are from the update's, and with pi_old
        recomputed they are pi_old of their steps (filled into `old_log_probs`), unless training mode drops out."""
        traj_ids = torch.from_numpy(batch.step_episode[rows.numpy()])
        tokens, aggregation = batch.token_ids.shape[1], self.config.grpo.aggregation
        # Dr. GRPO's constant is the configured mini-batch's token slots, whatever this mini-batch holds.
        constant = (self.config.optim.mini_batch_size * self.ctx.world_size * tokens
                    if aggregation == "constant" else None)
        weights = distributed.token_weights(traj_ids, tokens, aggregation, self.ctx, constant)
        step_advantages = advantages[traj_ids]  # A_i on every step of episode i (REF 9.1.5)
        loss = 0.0
        parts = -(-len(rows) // self.config.optim.micro_batch_size)
        passes = parts
        if self.units:  # a sharded model's passes are collectives: every rank makes as many as the busiest one
            passes = int(distributed.reduce_values({"passes": passes}, self.ctx, "max")["passes"])
        with self.policy.training_mode():  # once for the mini-batch, not twice per micro-batch
            for part, patches in self.micro_batches(batch, rows):
                micro_loss = self.micro_batch_loss(batch, rows[part], step_advantages[part], weights[part], stats,
                                                   old_log_probs, before_any_step, patches)
                micro_loss.backward()
                loss = loss + micro_loss.detach()
            for _ in range(passes - parts):
                fsdp.padding_pass(self.policy, self.inputs, self.config.grpo.temperature)
        if not self.units:
            distributed.sum_gradients(self.params, self.ctx)
        return loss

    def micro_batch_loss(self, batch: Rollouts, rows: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                         stats: UpdateStats, old_log_probs: torch.Tensor | None = None,
                         before_any_step: bool = False, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of some steps (`rows`, with their advantages and the mini-batch's aggregation weights) against
        pi_old `old_log_probs` (None: the rollout's log-probs; `before_any_step`: see accumulate_gradients), from
        their vision output `patches` where given (micro_batches)."""
        cfg = self.config.grpo
        inputs = self.step_inputs(batch, rows)
        shape = {"pad_to": self.config.optim.micro_batch_size, "prompt_length": self.prompt_length,
                 "patches": patches}
        logp, entropy = self.policy.log_probs(*inputs, **shape)
        device = logp.device
        weights = weights.to(device, non_blocking=True)  # see VLAPolicy._on_device
        if before_any_step and (self.pi_old_from_gradient_pass or not self.recompute_old_log_probs):
            own = logp.detach().float().cpu()
            gap = (own - batch.log_probs[rows]).abs()
            stats.mean("rollout_logprob_mismatch", gap.mean(), float(logp.numel()))
            stats.maximum("rollout_logprob_mismatch_max", gap.max())
            if self.pi_old_from_gradient_pass:
                old_log_probs[rows] = own
        loss, loss_stats = grpo.policy_loss(
            logp, (batch.log_probs if old_log_probs is None else old_log_probs)[rows].to(device, non_blocking=True),
            advantages.to(device, non_blocking=True), weights,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, log_ratio_clamp=cfg.log_ratio_clamp,
            advantage_clamp=cfg.advantage_clamp)
        tokens = float(logp.numel())  # stored steps have no padding
        if cfg.kl_coef > 0:
            with torch.no_grad(), self.policy.adapter_disabled():
                base_logp, _ = self.policy.log_probs(*inputs, **shape)
            kl = grpo.kl_k3(logp, base_logp)
            loss = loss + cfg.kl_coef * grpo.aggregate(kl, weights)
            stats.mean("kl_to_base", grpo.masked_mean(kl.detach()), tokens)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * grpo.aggregate(entropy, weights)
        stats.mean("entropy", grpo.masked_mean(entropy.detach()), tokens)
        for name in ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl_k1", "approx_kl_k3"):
            stats.mean(name, loss_stats[name], tokens)
        stats.minimum("ratio_min", loss_stats["ratio_min"])
        stats.maximum("ratio_max", loss_stats["ratio_max"])
        return loss

    def evaluates_after(self, iteration: int, last: bool) -> bool:
        """Whether the held-out eval runs after `iteration`: every --eval-every iterations and after the last."""
        every = self.config.evaluation.eval_every
        return every > 0 and (iteration % every == 0 or last)

    def eval_episodes(self) -> list[EpisodeSpec]:
        """The held-out init states of the training tasks, in one scene."""
        per_task = self.config.evaluation.eval_episodes_per_task or len(self.heldout_inits)
        return [EpisodeSpec(t, i, scene=self.config.seed) for t in self.task_ids for i in self.heldout_inits[:per_task]]

    def upcoming_episodes(self) -> list[EpisodeSpec]:
        """The episodes this rank's envs play after the current iteration's update (its rollout's env steps
        counted): the eval's where the iteration evaluates, else the next iteration's first groups (sampler.peek),
        none after the last iteration (by --iterations or --timesteps; --max-seconds is not known before the update
        ends, so such a run builds the scenes of a rollout it does not play)."""
        cfg, following = self.config, self.iteration + 1
        last = self.ends_after(following)
        if self.evaluates_after(following, last):
            return rank_share(self.eval_episodes(), self.ctx)
        if last:
            return []
        return [spec for spec in self.sampler.peek(cfg.grpo.groups_per_iteration) for _ in range(cfg.grpo.group_size)]

    def evaluate(self) -> dict[str, float]:
        """Greedy success on the held-out init states of the training tasks, with videos; rank 0 also writes the
        eval's results (each episode's outcome among them) to <run>/evals/iter_NNNNNN/ for `compare`."""
        episodes = self.eval_episodes()
        with fsdp.gathered(self.units):
            results = evaluate(self.env, self.policy, episodes, self.inputs, self.ctx, self.run_dir / "videos",
                               f"iter{self.iteration:06d}", self.config.evaluation.num_videos,
                               progress=self.config.logging.progress, overlap=self.overlap,
                               fixed_batch=self.policy.fixed_batch, env_tasks=self.env_tasks)
        if self.ctx.is_main:
            config = config_to_dict(_as_saved(self.config)) | {"protocol": "heldout", "temperature": None,
                                                                "iteration": self.iteration}
            results_dir = run_eval_dir(self.run_dir, self.iteration)
            results_dir.mkdir(parents=True, exist_ok=True)
            write_results(results_dir, results,
                          {t: self.env.instruction(t) for t in self.task_ids}, config, dtype_name(self.policy.dtype),
                          f"run `{self.run_dir}` at iteration {self.iteration} (from checkpoint "
                          f"`{self.config.model.checkpoint}`)")
        return results.metrics("eval")

    def save(self) -> None:
        """Rank 0 writes one checkpoint holding every rank's random generators, group sampler and envs' tasks (and,
        with full fine-tuning, the model and optimizer state gathered from every rank)."""
        rank_rng = distributed.gather_objects(rng_state(), self.ctx)
        samplers = distributed.gather_objects(self.sampler.state_dict(), self.ctx)
        env_tasks = distributed.gather_objects(self.env_tasks, self.ctx)
        full_state = fsdp.full_state(self.policy.model, self.optimizer) if self.config.finetune == "full" else None
        if self.ctx.is_main:
            state = {"iteration": self.iteration, "env_steps": self.env_steps, "skipped_steps": self.skipped_steps,
                     "skipped_in_a_row": self.skipped_in_a_row, "world_size": self.ctx.world_size, "samplers": samplers,
                     "env_tasks": env_tasks}
            save_checkpoint(self.run_dir, self.iteration, self.policy, self.optimizer, self.scheduler, state,
                            rank_rng, config_to_dict(_as_saved(self.config)), self.config.checkpointing.keep_last,
                            full_state)
        distributed.barrier(self.ctx)

    def ends_after(self, iteration: int) -> bool:
        """Whether the run ends after `iteration` by --iterations or --timesteps (env steps as counted now)."""
        limit = self.config.iterations
        return self.env_steps >= self.config.timesteps or (limit is not None and iteration >= limit)

    def finished(self) -> bool:
        return self.ends_after(self.iteration) or self.out_of_time

    def close(self) -> None:
        """Stops the env workers and the logger; the process group stays up for the rest of the process."""
        self.env.close()
        self.logger.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shuffled_minibatches(num_steps: int, parts: int, micro_batch: int) -> list[torch.Tensor]:
    """The steps in random order, cut into `parts` mini-batches of about equal size whose cuts fall on multiples
    of the micro-batch where there are at least `micro_batch` steps per part, so that at most the epoch's last
    micro-batch is smaller than the others (and padded to their shape, VLAPolicy.log_probs)."""
    order = torch.randperm(num_steps)
    if num_steps < parts * micro_batch:
        return list(order.tensor_split(parts))
    cuts = [round(i * num_steps / (parts * micro_batch)) * micro_batch for i in range(1, parts)]
    return list(order.tensor_split(cuts))


def warmup_factor(iteration: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` iterations, then 1."""
    return min(1.0, (iteration + 1) / warmup) if warmup > 0 else 1.0


def unnorm_key(model: ModelConfig, suite: str) -> str:
    """The action statistics of `suite` (REF 1.3), unless --unnorm-key names others; the toy task decodes with
    libero_spatial's."""
    return model.unnorm_key or ("libero_spatial" if suite == TOY else suite)


def policy_inputs(policy: VLAPolicy) -> PolicyInputs:
    """OpenVLA sees the agentview only; OFT checkpoints may add the wrist camera and proprio (REF 6)."""
    return PolicyInputs(wrist=policy.num_images == 2, proprio=policy.uses_proprio)


def advantage_sums(advantages: torch.Tensor) -> dict[str, float]:
    return {"advantage_abs_sum": float(advantages.abs().sum()), "advantage_count": float(advantages.numel())}


def rollout_metrics(counts: dict[str, float], task_ids: list[int]) -> dict[str, float]:
    """Success over all played episodes (dropped groups included), also per task among the tasks drawn."""
    episodes, groups = max(1.0, counts["episodes"]), max(1.0, counts["groups_played"])
    per_task = {f"rollout/task_{t}/success_rate": counts[f"successes_task_{t}"] / counts[f"episodes_task_{t}"]
                for t in task_ids if counts[f"episodes_task_{t}"]}
    return {
        "rollout/success_rate": counts["successes"] / episodes,
        "rollout/episode_length": counts["episode_length_sum"] / episodes,
        "rollout/episodes": counts["episodes"], "rollout/policy_queries": counts["policy_queries"],
        "rollout/lost_episodes": counts["lost_episodes"], "rollout/lost_resets": counts["lost_resets"],
        "rollout/groups_played": counts["groups_played"], "rollout/groups_kept": counts["groups_kept"],
        "rollout/groups_dropped_fraction": counts["groups_uninformative"] / groups,
        "rollout/groups_lost": counts["groups_lost"], "rollout/refill_rounds": counts["refill_rounds"],
        "rollout/advantage_abs_mean": counts["advantage_abs_sum"] / max(1.0, counts["advantage_count"]),
        **per_task,
    }


def perf_metrics(counts: dict[str, float], trained_steps: float, rollout_seconds: float, started: float,
                 ctx: distributed.DistContext, num_envs: int) -> dict[str, float]:
    """Throughput over all ranks: env actions per second of rollout, policy steps per second of update; where
    a rank's rollout time went (mean over ranks): sampling actions, waiting for the simulators (of which the first
    blocking reset of each round: scene builds), the rest on the host (batching observations, storing steps); and
    where a simulator worker's time went (mean over all ranks' envs; libero_env._worker.WORKER_TIMES), to set
    against the wait."""
    seconds = time.perf_counter() - started
    workers = num_envs * ctx.world_size
    model, env, reset = (counts[k] / ctx.world_size
                         for k in ("rollout_model_seconds", "rollout_env_seconds", "rollout_reset_seconds"))
    metrics = {"perf/iteration_seconds": seconds, "perf/rollout_seconds": rollout_seconds,
               "perf/rollout_model_seconds": model, "perf/rollout_env_wait_seconds": env,
               "perf/rollout_first_reset_seconds": reset,
               "perf/rollout_host_seconds": rollout_seconds - model - env,
               "perf/actions_per_second": counts["episode_length_sum"] / rollout_seconds,
               "perf/samples_per_second": trained_steps / max(1e-9, seconds - rollout_seconds),
               **{f"perf/{key}": value / workers for key, value in counts.items() if key.startswith("env_worker_")}}
    if ctx.device.type == "cuda":
        memory = {"gpu": torch.cuda.max_memory_allocated(ctx.device) / 2**30}
        metrics["perf/gpu_memory_gib"] = distributed.reduce_values(memory, ctx, "max")["gpu"]
        torch.cuda.reset_peak_memory_stats(ctx.device)
    return metrics


def _as_saved(config: TrainConfig) -> TrainConfig:
    """The config as a run directory records it: what to resume with, not how this process was started."""
    return dataclasses.replace(config, resume=None, dry_run=False)


def run_evaluation(config: EvaluateConfig, plan: EvalPlan | None = None) -> Path:
    """The eval subcommand: greedy (or sampled) episodes, per-task success table (JSON + markdown) and videos. The
    results directory is created once the model has loaded, and removed again if the eval does not finish."""
    ctx = distributed.setup(config.model.device)
    plan = plan or check_eval(config, ctx.rank)
    results_dir, task_ids = plan.results_dir, plan.task_ids
    seed_everything(config.seed)
    policy = build_policy(config.model, None, unnorm_key(config.model, config.env.task_suite), ctx.device)
    train_inits, heldout_inits = init_state_split(suite_shape(config.env.task_suite).num_init_states,
                                                  config.env.num_heldout, 0)
    inits = {"reference": list(range(config.trials_per_task)), "heldout": heldout_inits[:config.trials_per_task],
             "train": train_inits[:config.trials_per_task]}[config.protocol]
    inputs = policy_inputs(policy)
    env = make_env(config.env, wrist=inputs.wrist)
    created = outermost_missing(results_dir)  # what a failed eval removes
    if ctx.is_main:
        results_dir.mkdir(parents=True)
    try:
        results = evaluate(env, policy, [EpisodeSpec(t, i, scene=config.seed) for t in task_ids for i in inits],
                           inputs, ctx, results_dir / "videos", "eval", config.num_videos, progress=config.progress,
                           temperature=config.temperature,
                           overlap=config.env.overlaps(policy.is_oft, policy.device.type == "cuda"),
                           fixed_batch=policy.fixed_batch)
        instructions = {t: env.instruction(t) for t in task_ids}
        if ctx.is_main:
            write_results(results_dir, results, instructions, config_to_dict(config), dtype_name(policy.dtype))
    except BaseException:  # a results directory without results would only block its --run-name
        if ctx.is_main:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        env.close()
        distributed.cleanup(ctx)
    if ctx.is_main:
        low, high = results.interval
        print(f"success rate {results.success_rate:.3f} (95 % interval {low:.3f}-{high:.3f}) over "
              f"{sum(results.episodes.values())} episodes in {dtype_name(policy.dtype)}; table and videos in "
              f"{results_dir}")
    return results_dir


def parse_command(argv: Sequence[str]) -> TrainConfig | EvaluateConfig | PlotConfig | CompareConfig | SftConfig:
    """The subcommand's config: dataclass defaults, then --resume's saved config and --config's file, then flags."""
    defaults = {"train": TrainConfig(), "demo": demo_defaults(), "eval": EvaluateConfig()}
    if argv and argv[0] in defaults:
        defaults[argv[0]] = defaults_from_files(defaults[argv[0]], argv[1:])
    command = (Annotated[TrainConfig, tyro.conf.subcommand("train", default=defaults["train"])]
               | Annotated[EvaluateConfig, tyro.conf.subcommand("eval", default=defaults["eval"])]
               | Annotated[DemoConfig, tyro.conf.subcommand("demo", default=defaults["demo"])]
               | Annotated[PlotConfig, tyro.conf.subcommand("plot")]
               | Annotated[CompareConfig, tyro.conf.subcommand("compare")]
               | Annotated[SftConfig, tyro.conf.subcommand("sft")])
    return tyro.cli(command, args=list(argv), description=__doc__.split("\n\n")[0])


@record
def main(argv: Sequence[str] | None = None) -> None:
    """Every failure a user can cause ends here as one line and exit status 1 (trainer/errors.py); --traceback
    or OPENVLA_GRPO_TRACEBACK=1 shows the full traceback instead."""
    show_traceback, args = traceback_requested(sys.argv[1:] if argv is None else argv)
    with one_line_errors("OpenVLA_GRPO.py", show_traceback):
        run_command(parse_command(args))


def run_command(command: TrainConfig | EvaluateConfig | PlotConfig | CompareConfig | SftConfig) -> None:
    """Resolves the command's config once (checks, run directory, task ids), then runs it."""
    rank = distributed.launched_rank()
    if isinstance(command, PlotConfig):
        print(plot_run(command.run_dir, command.output))
    elif isinstance(command, CompareConfig):
        print(compare_evals(command.before, command.after))
    elif isinstance(command, SftConfig):
        print(run_sft(command))  # it checks its config before anything else
    elif isinstance(command, EvaluateConfig):
        plan = check_eval(command, rank)
        run_evaluation(dataclasses.replace(command, run_name=plan.results_dir.name), plan)
    else:
        plan = check_train(command, rank)
        if command.resume is None:  # the default run name holds the time: record the one resolved
            command = dataclasses.replace(command, logging=dataclasses.replace(command.logging,
                                                                               run_name=plan.run_dir.name))
        if command.dry_run:
            print(plan.run_dir)
            if plan.prediction is not None:
                print(plan.prediction.summary())
            return
        with new_run_directory(plan.run_dir, remove_on_failure=command.resume is None and rank == 0):
            trainer = GRPOTrainer(command, plan)
            try:
                trainer.train()
            finally:
                trainer.close()
                distributed.cleanup(trainer.ctx)
        if trainer.ctx.is_main:
            print(f"run finished: {plan.run_dir} (metrics.jsonl, checkpoints/, videos/); curves: "
                  f"{plot_run(plan.run_dir)}")


if __name__ == "__main__":
    main()
