"""Full fine-tuning (`--finetune full`): in one process, and sharded with FSDP2 under torchrun on the CPU (gloo,
2 processes, a tiny look-alike OpenVLA and the toy env).

The torchrun tests launch this file; its `__main__` part is the per-rank program.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor

import grpo
from OpenVLA_GRPO import GRPOTrainer, main, parse_command
from saved_rollouts import load_rollouts, save_rollouts
from trainer import fsdp
from trainer.checkpoint import CHECKPOINTS
from trainer.metrics import UpdateStats, read_metrics
from trainer.rollout import Rollouts, collect_groups
from trainer.validation import check_train
from vla_actor import ACTION_TOKEN_BEGIN, load_policy, make_tiny_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
VOLATILE = ("time", "perf/")
SHARDED = {0: [0, 1, 2], 1: [3]}  # groups of each rank in the first step: rank 1 pads its missing micro-batches


def full_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train", "--finetune", "full", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--num-envs", "4",
            "--group-size", "4", "--groups-per-iteration", "2", "--mini-batch-size", "8", "--micro-batch-size", "4",
            "--lr", "1e-3", "--eval-every", "2", "--eval-episodes-per-task", "1", "--num-videos", "1",
            "--no-gradient-checkpointing", "--no-progress", "--output-dir", str(output_dir), *extra]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).resolve()), *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gradients(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {name: full(p.grad) for name, p in trainer.policy.model.named_parameters() if p.requires_grad}


def parameters(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return get_model_state_dict(trainer.policy.model, options=StateDictOptions(full_state_dict=True))


def groups(batch: Rollouts, chosen: list[int]) -> tuple[Rollouts, torch.Tensor]:
    """The episodes of the `chosen` groups (whole groups) and their advantages."""
    part = batch.select(np.isin(batch.group_ids, chosen))
    if not part.num_episodes:
        return part, torch.zeros(0)
    return part, grpo.group_advantages(torch.from_numpy(part.success), torch.from_numpy(part.group_ids))


@pytest.mark.parametrize("variant", ["openvla", "oft"])
def test_full_finetuning_trains_exactly_the_weights_the_policy_reads(variant, tmp_path):
    policy = load_policy(make_tiny_checkpoint(tmp_path / variant, variant=variant))
    policy.model.requires_grad_(True)
    image = np.zeros((2, 224, 224, 3), np.uint8)
    log_probs, _ = policy.log_probs(image, ["pick up the bowl"] * 2,
                                    torch.full((2, policy.tokens_per_query), ACTION_TOKEN_BEGIN),
                                    wrist=image if policy.num_images == 2 else None,
                                    proprio=np.zeros((2, 8), np.float32) if policy.uses_proprio else None)
    log_probs.sum().backward()
    read = {name for name, p in policy.model.named_parameters() if p.grad is not None}
    fsdp.make_trainable(policy)
    assert {name for name, p in policy.model.named_parameters() if p.requires_grad} == read
    vision = policy.model.vision_backbone
    unused = tuple(f"vision_backbone.{tower}.{part}." for tower in ("featurizer", "fused_featurizer")
                   for part in (f"blocks.{len(getattr(vision, tower).blocks) - 1}", "norm", "attn_pool"))
    assert {name for name, p in policy.model.named_parameters() if not p.requires_grad} == \
           {name for name, _ in policy.model.named_parameters() if name.startswith(unused)}


def test_kl_to_base_and_adapters_are_rejected_with_full_finetuning(checkpoint, tmp_path):
    config = parse_command([*full_args(checkpoint, tmp_path), "--kl-coef", "0.1"])
    with pytest.raises(ValueError, match="--kl-coef 0 or --finetune lora"):
        check_train(config)
    config = parse_command([*full_args(checkpoint, tmp_path), "--adapter", str(tmp_path)])
    with pytest.raises(ValueError, match="pass that as --checkpoint"):
        check_train(config)


def test_single_process_full_finetuning_resumes_exactly(checkpoint, tmp_path):
    trainer = GRPOTrainer(parse_command([*full_args(checkpoint, tmp_path, "--run-name", "one", "--iterations", "1",
                                                    "--eval-every", "0")]))
    trainer.train()
    trainer.close()
    saved = trainer.run_dir / CHECKPOINTS / "iter_000001"
    assert (saved / "model" / "config.json").is_file() and not (saved / "adapter").exists()
    resumed = GRPOTrainer(parse_command(["train", "--resume", str(trainer.run_dir)]))
    resumed.close()
    expected, got = parameters(trainer), parameters(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    states = [get_optimizer_state_dict(t.policy.model, t.optimizer, options=StateDictOptions(full_state_dict=True))
              for t in (trainer, resumed)]
    assert states[0]["state"].keys() == states[1]["state"].keys() and states[0]["state"]
    assert all(torch.equal(states[0]["state"][name][key], states[1]["state"][name][key])
               for name in states[0]["state"] for key in ("exp_avg", "exp_avg_sq", "step"))
    with pytest.raises(ValueError, match="resume it with --finetune full"):
        check_train(parse_command(["train", "--resume", str(trainer.run_dir), "--finetune", "lora"]))


def test_a_checkpoint_before_the_first_optimizer_step_leaves_the_optimizer_fresh(checkpoint, tmp_path):
    trainer = GRPOTrainer(parse_command([*full_args(checkpoint, tmp_path, "--run-name", "skipped", "--iterations",
                                                    "1", "--eval-every", "0", "--skip-grad-norm", "1e-12")]))
    trainer.train()
    trainer.close()
    assert not trainer.optimizer.state  # saving took no zero-lr step, which AdamW would count as its first
    assert not (trainer.run_dir / CHECKPOINTS / "iter_000001" / "optimizer.pt").exists()
    resumed = GRPOTrainer(parse_command(["train", "--resume", str(trainer.run_dir)]))
    resumed.close()
    assert not resumed.optimizer.state


@pytest.fixture(scope="module")
def sharded_run(checkpoint, tmp_path_factory) -> Path:
    """3 iterations of full fine-tuning on 2 ranks, checkpoints after the second and the third."""
    output = tmp_path_factory.mktemp("runs")
    result = torchrun("train", *full_args(checkpoint, output, "--run-name", "straight", "--iterations", "3",
                                          "--save-every", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    return output / "straight"


@pytest.mark.slow
def test_sharded_ranks_hold_the_same_model_and_rank0_writes_a_loadable_one(sharded_run, tmp_path):
    params = [torch.load(sharded_run / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = torch.load(sharded_run / "initial_params_rank0.pt", weights_only=True)
    assert params[0].keys() == params[1].keys() == initial.keys()
    assert all(torch.equal(params[0][name], params[1][name]) for name in params[0])
    changed = {name for name in initial if not torch.equal(initial[name], params[0][name])}
    assert changed and all(".blocks.2." not in name for name in changed)  # the unused ViT block stays frozen
    rows = read_metrics(sharded_run)
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3]  # rank 0 alone logs
    assert all(row["rollout/groups_played"] >= 4 for row in rows[1:]) and rows[2]["eval/success_rate"] is not None
    last = sharded_run / CHECKPOINTS / "iter_000003"
    assert sorted(p.name for p in last.iterdir()) == ["config.json", "model", "optimizer.pt", "rng_rank0.pt",
                                                      "rng_rank1.pt", "scheduler.pt", "trainer_state.json"]
    exported = load_policy(last / "model").model.state_dict()
    assert all(torch.equal(exported[name], params[0][name]) for name in params[0])
    main(["eval", "--checkpoint", str(last / "model"), "--task-suite", "toy", "--trials-per-task", "2",
          "--num-envs", "4", "--num-videos", "0", "--no-progress", "--output-dir", str(tmp_path), "--run-name", "ev"])
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["overall"]["episodes"] == 2 * 4


@pytest.mark.slow
def test_sharded_resume_restores_model_and_optimizer_exactly(sharded_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded_run, resumed)
    shutil.rmtree(resumed / CHECKPOINTS / "iter_000003")  # as if stopped after iteration 2
    result = torchrun("train", "train", "--resume", str(resumed))
    assert result.returncode == 0, result.stdout + result.stderr
    stable = [[{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in read_metrics(run)]
              for run in (sharded_run, resumed)]
    assert stable[0] == stable[1]
    for name in ("params_rank0.pt", "optimizer_rank0.pt"):
        assert_identical(*(torch.load(run / name, weights_only=True) for run in (sharded_run, resumed)))


def assert_identical(expected, got) -> None:
    """Nested state dicts with the same keys, values and bitwise-equal tensors (a loaded state dict may hold
    lists where the saved one had tuples)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(expected, got)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and expected.keys() == got.keys()
        for key in expected:
            assert_identical(expected[key], got[key])
    elif isinstance(expected, list | tuple):
        assert isinstance(got, list | tuple) and len(expected) == len(got)
        for a, b in zip(expected, got):
            assert_identical(a, b)
    else:
        assert expected == got


@pytest.mark.slow
def test_two_sharded_ranks_step_as_one_process_with_all_groups(checkpoint, tmp_path):
    trainer = GRPOTrainer(parse_command(full_args(checkpoint, tmp_path, "--run-name", "one", "--mini-batch-size",
                                                  "256", "--micro-batch-size", "8")))
    batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 4, 1.6,
                              dynamic_sampling=True, max_refill_rounds=10)
    assert batch.num_episodes == 16
    save_rollouts(batch, tmp_path / "batch.pt")
    everything, advantages = groups(batch, [0, 1, 2, 3])
    trainer.accumulate_gradients(everything, advantages, torch.arange(everything.num_steps), UpdateStats())
    norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, 1.0))
    reference = gradients(trainer)  # clipped
    trainer.optimizer.zero_grad(set_to_none=True)
    reference_metrics = [trainer.update(everything, advantages) for _ in range(2)]
    reference_params = parameters(trainer)
    trainer.close()

    result = torchrun("steps", str(checkpoint), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    sharded = torch.load(tmp_path / "grad_rank0.pt", weights_only=True)
    assert sharded.keys() == reference.keys() and max(g.abs().max() for g in reference.values()) > 0
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-4, atol=1e-7)
    norms = [torch.load(tmp_path / f"norm_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert norm > 1.0  # the gradients were clipped
    assert norms[0] == norms[1] and norms[0] == pytest.approx(norm, rel=1e-5)  # one global norm for the skip rule
    # AdamW's first steps hardly depend on the gradients' scale: the loss and gradient norm of each step do.
    # The second step starts from parameters that differ by summation order (below), so it gets 1e-4.
    for step, (expected, got) in enumerate(zip(reference_metrics,
                                               torch.load(tmp_path / "metrics_rank0.pt", weights_only=True))):
        assert expected["train/optimizer_steps"] == got["train/optimizer_steps"] == 1
        for key in ("train/loss", "train/grad_norm", "train/ratio_mean", "train/entropy"):
            # abs: the loss starts at ~0
            assert got[key] == pytest.approx(expected[key], rel=1e-5 if step == 0 else 1e-4, abs=1e-6), (step, key)
    sharded_params = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    # Steps of at most lr = 1e-3 per element; an element whose gradient is near zero moves by AdamW's
    # m / sqrt(v), which summation order changes slightly, so allow a tenth of a step.
    for name in reference_params:
        torch.testing.assert_close(sharded_params[name], reference_params[name], rtol=0, atol=1e-4)


@record
def worker(mode: str, *args: str) -> None:
    rank = int(os.environ["RANK"])
    if mode == "train":
        trainer = GRPOTrainer(parse_command(list(args)))
        initial = parameters(trainer)
        run_dir = trainer.train()
        options = StateDictOptions(full_state_dict=True)
        torch.save(initial, run_dir / f"initial_params_rank{rank}.pt")
        torch.save(parameters(trainer), run_dir / f"params_rank{rank}.pt")
        torch.save(get_optimizer_state_dict(trainer.policy.model, trainer.optimizer, options=options),
                   run_dir / f"optimizer_rank{rank}.pt")
        trainer.close()
    elif mode == "steps":
        checkpoint, output = Path(args[0]), Path(args[1])
        batch = load_rollouts(output / "batch.pt")
        trainer = GRPOTrainer(parse_command(full_args(checkpoint, output, "--run-name", "two", "--mini-batch-size",
                                                      "128", "--micro-batch-size", "4")))
        mine, advantages = groups(batch, SHARDED[rank])
        trainer.accumulate_gradients(mine, advantages, torch.arange(mine.num_steps), UpdateStats())
        norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, 1.0))
        grads = gradients(trainer)
        trainer.optimizer.zero_grad(set_to_none=True)
        metrics = [trainer.update(mine, advantages),
                   trainer.update(*groups(batch, [0, 1, 2, 3] if rank == 0 else []))]  # rank 1 has no step at all
        params = parameters(trainer)
        torch.save(norm, output / f"norm_rank{rank}.pt")
        if rank == 0:
            torch.save(grads, output / "grad_rank0.pt")
            torch.save(params, output / "params_rank0.pt")
            torch.save(metrics, output / "metrics_rank0.pt")
        trainer.close()


if __name__ == "__main__":
    worker(*sys.argv[1:])
