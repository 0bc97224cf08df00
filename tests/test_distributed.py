"""torchrun data parallel on the CPU: gloo, 2 processes, a tiny look-alike OpenVLA and the toy env.

The tests launch this file under torchrun; its `__main__` part is the per-rank program.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import record

import grpo
from OpenVLA_GRPO import GRPOTrainer, parse_command
from saved_rollouts import load_rollouts, save_rollouts
from trainer.checkpoint import CHECKPOINTS
from trainer.evaluation import EVALS_DIR, compare_evals
from trainer.metrics import UpdateStats, read_metrics
from trainer.rollout import Rollouts, collect_groups

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "constant")
pytestmark = pytest.mark.slow


def toy_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--num-envs", "4", "--group-size", "4",
            "--groups-per-iteration", "2", "--mini-batch-size", "8", "--micro-batch-size", "4", "--lora-rank", "4",
            "--lora-alpha", "4", "--lr", "3e-3", "--eval-every", "2", "--eval-episodes-per-task", "1",
            "--num-videos", "1", "--no-gradient-checkpointing", "--no-progress", "--output-dir", str(output_dir),
            *extra]


def torchrun(*args: str, nproc: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(Path(__file__).resolve()), *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def mini_batch_gradient(trainer: GRPOTrainer, batch: Rollouts) -> torch.Tensor:
    """The summed-over-ranks gradient of one mini-batch made of all of `batch`'s steps."""
    advantages = (grpo.group_advantages(torch.from_numpy(batch.success), torch.from_numpy(batch.group_ids))
                  if batch.num_episodes else torch.zeros(0))
    trainer.accumulate_gradients(batch, advantages, torch.arange(batch.num_steps), UpdateStats())
    return torch.cat([p.grad.flatten() for p in trainer.params])


@pytest.fixture(scope="module")
def straight_run(checkpoint, tmp_path_factory) -> Path:
    """3 iterations on 2 ranks, a checkpoint after each."""
    output = tmp_path_factory.mktemp("runs")
    result = torchrun("train", *toy_args(checkpoint, output, "--run-name", "straight", "--iterations", "3",
                                         "--save-every", "1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return output / "straight"


def test_ranks_keep_identical_adapters_and_rank0_alone_writes(straight_run):
    params = [torch.load(straight_run / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*params))
    initial = torch.load(straight_run / "initial_params_rank1.pt", weights_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(params[1], initial))  # they did train
    rows = read_metrics(straight_run)
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3]  # one line per iteration: rank 0 only logs
    assert all(row["rollout/groups_played"] >= 4 for row in rows[1:])  # 2 groups per rank, summed over ranks
    assert all(row["rollout/episodes"] == 4 * row["rollout/groups_played"] for row in rows[1:])
    assert rows[2]["eval/success_rate"] is not None
    # rank 0 wrote each eval with every rank's episodes; the first and the last pair up episode by episode
    evaluated = [row["iteration"] for row in rows if row.get("eval/success_rate") is not None]
    assert sorted(p.name for p in (straight_run / EVALS_DIR).iterdir()) == [f"iter_{i:06d}" for i in evaluated]
    first, final = (json.loads((straight_run / EVALS_DIR / f"iter_{i:06d}" / "results.json").read_text())
                    for i in (evaluated[0], evaluated[-1]))
    assert len(final["episodes"]) == rows[evaluated[-1]]["eval/episodes"] == final["overall"]["episodes"]
    assert final["overall"]["success_rate"] == rows[evaluated[-1]]["eval/success_rate"]
    assert final["config"]["iteration"] == evaluated[-1] and final["dtype"] == "float32"
    assert compare_evals(straight_run / EVALS_DIR / f"iter_{evaluated[0]:06d}",
                         straight_run / EVALS_DIR / f"iter_{evaluated[-1]:06d}").startswith(
        f"success {first['overall']['success_rate']:.3f} -> {final['overall']['success_rate']:.3f} on the same "
        f"{len(final['episodes'])} episodes")
    last = straight_run / CHECKPOINTS / "iter_000003"
    assert sorted(p.name for p in last.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    samplers = json.loads((last / "trainer_state.json").read_text())["samplers"]
    assert len(samplers) == 2 and samplers[0]["order"] != samplers[1]["order"]  # each rank draws its own groups


def test_resume_restores_every_rank(checkpoint, straight_run, tmp_path):
    first = torchrun("train", *toy_args(checkpoint, tmp_path, "--run-name", "resumed", "--iterations", "2",
                                        "--save-every", "1"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = torchrun("train", "train", "--resume", str(tmp_path / "resumed"), "--iterations", "3")
    assert second.returncode == 0, second.stdout + second.stderr
    volatile = ("time", "perf/")
    expected, got = read_metrics(straight_run), read_metrics(tmp_path / "resumed")
    assert [{k: v for k, v in row.items() if not k.startswith(volatile)} for row in got] == \
           [{k: v for k, v in row.items() if not k.startswith(volatile)} for row in expected]
    for rank in (0, 1):
        after = torch.load(tmp_path / "resumed" / f"params_rank{rank}.pt", weights_only=True)
        reference = torch.load(straight_run / f"params_rank{rank}.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(after, reference))


def test_two_ranks_with_half_the_groups_equal_one_rank_with_all(checkpoint, tmp_path):
    reference = {}
    for aggregation in AGGREGATIONS:
        # --mini-batch-size is per rank: one rank's mini-batch holds the two ranks' 2 x 8 steps (what "constant"
        # normalises by)
        trainer = GRPOTrainer(parse_command(toy_args(checkpoint, tmp_path, "--run-name", f"one-{aggregation}",
                                                     "--aggregation", aggregation, "--mini-batch-size", "16")))
        if aggregation == AGGREGATIONS[0]:
            batch, _ = collect_groups(trainer.env, trainer.policy, trainer.sampler, trainer.inputs, 4, 4, 1.6,
                                      dynamic_sampling=True, max_refill_rounds=10)
            assert batch.num_episodes == 16
            save_rollouts(batch, tmp_path / "batch.pt")
        reference[aggregation] = mini_batch_gradient(trainer, batch)
        trainer.close()
    result = torchrun("gradients", str(checkpoint), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for aggregation in AGGREGATIONS:
        summed = torch.load(tmp_path / f"grad-{aggregation}.pt", weights_only=True)
        assert reference[aggregation].abs().max() > 0
        torch.testing.assert_close(summed, reference[aggregation], rtol=1e-4, atol=1e-7)
    lopsided = torch.load(tmp_path / "grad-lopsided.pt", weights_only=True)  # rank 1 kept no group at all
    torch.testing.assert_close(lopsided, reference[AGGREGATIONS[0]], rtol=1e-4, atol=1e-7)


def test_a_failing_rank_stops_the_job_with_its_error(checkpoint, tmp_path):
    result = torchrun("fail", str(checkpoint), str(tmp_path), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 stops on purpose" in output and "ChildFailedError" in output


@record
def worker(mode: str, *args: str) -> None:
    rank = int(os.environ["RANK"])
    if mode == "train":
        trainer = GRPOTrainer(parse_command(list(args)))
        initial = [p.detach().clone() for p in trainer.params]
        run_dir = trainer.train()
        torch.save(initial, run_dir / f"initial_params_rank{rank}.pt")
        torch.save([p.detach().clone() for p in trainer.params], run_dir / f"params_rank{rank}.pt")
        trainer.close()
    elif mode == "gradients":
        checkpoint, output = Path(args[0]), Path(args[1])
        batch = load_rollouts(output / "batch.pt")
        mine = batch.select(np.isin(batch.group_ids, np.unique(batch.group_ids)[rank::2]))  # whole groups
        for aggregation in AGGREGATIONS:
            trainer = GRPOTrainer(parse_command(toy_args(checkpoint, output, "--run-name", f"two-{aggregation}",
                                                         "--aggregation", aggregation)))
            gradient = mini_batch_gradient(trainer, mine)
            if rank == 0:
                torch.save(gradient, output / f"grad-{aggregation}.pt")
            if aggregation == AGGREGATIONS[0]:
                trainer.optimizer.zero_grad(set_to_none=True)
                lopsided = mini_batch_gradient(trainer, batch.select(np.full(batch.num_episodes, rank == 0)))
                if rank == 0:
                    torch.save(lopsided, output / "grad-lopsided.pt")
            trainer.close()
    elif mode == "fail":
        checkpoint, output = Path(args[0]), Path(args[1])
        trainer = GRPOTrainer(parse_command(toy_args(checkpoint, output, "--run-name", "fail", "--iterations", "50")))
        if rank == 1:
            raise RuntimeError("rank 1 stops on purpose")
        trainer.train()  # rank 0 waits in the first collective until torchrun stops it


if __name__ == "__main__":
    worker(*sys.argv[1:])
