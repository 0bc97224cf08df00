"""Several seeds of the small-VLA experiment (scripts/libero_learning.py) as one record: each seed's held-out
success before and after GRPO on the same held-out episodes, the mean and smallest lift, and a 95 % interval of
the mean lift over seeds (Student's t on the per-seed lifts, which pairs each seed's before and after).

    lora='--lora-rank 32 --lora-alpha 32 --lora-vision --lora-projector --no-dynamic-sampling --max-seconds 1200'
    for s in 1 2 3; do python -m scripts.libero_learning --seed $s --num-heldout 25 --tasks 0 1 2 3 \\
        --demos-per-task 3 --sft-steps 1000 --workers 16 --group-size 8 --groups 16 --temperature 0.5 \\
        --grpo-lr 1e-4 --ppo-epochs 2 --mini-batch-size 256 --eval-every 10 --grpo-iterations 10 \\
        --no-train-evals --no-sampled-evals --grpo-finetune lora --heldout-evals grpo --no-eval-videos \\
        "--extra-grpo=$lora" --work-dir runs/ll_seed$s --result-json runs/ll_seed$s/record.json; done
    python -m scripts.libero_seeds runs/ll_seed1/record.json runs/ll_seed2/record.json runs/ll_seed3/record.json

writes bench/results/libero_learning.json and docs/media/libero_learning_curves.png (one line per seed). One
seed takes ~25 minutes of one H200 machine (16 simulators bound it: ~112 s per iteration of 128 episodes, ~95 s
per 100-episode eval), so each fits a 30-minute GPU session: that is why it evaluates only at iterations 0 and 10
and skips --min-start-success's sampled start check (~85 s; the iteration-0 eval shows the start strength), and
why --max-seconds ends GRPO early, with its eval, on a slower machine. With --heldout-evals grpo a seed's before
and after are GRPO's own held-out evals at its first and last iteration (100 episodes each, the same episodes,
float32, on the machine that trains), so each seed's command records itself where it runs.

Both ends of one seed ship: the SFT model (a 24 MB bfloat16 export) and the GRPO result as a LoRA adapter on it
(3.7 MB float32 with the ViTs and projector), which fit beside the LIBERO bundle in one 64 MiB transfer to the
GPU machine where two whole models would not. Whether LoRA lifts this model as far as full fine-tuning did
(+17.5 to +30 points, one seed) is what the first seed measures; all seeds take one recipe.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro
from scipy import stats

from trainer.checkpoint import write_json

SEED_KEYS = ("seed", "heldout_success_sft", "heldout_success_grpo", "episodes_eval", "grpo_iterations", "dtype")
RECIPE_KEYS = ("suite", "tasks", "num_heldout", "dtype", "grpo_finetune")
"""What every seed of one combined record must share."""


@dataclass
class Seeds:
    """Combine per-seed records into one."""

    records: tyro.conf.Positional[tuple[Path, ...]]
    """Each seed's record JSON (libero_learning's --result-json)."""
    output: Path = Path("bench/results/libero_learning.json")
    """The combined record."""
    curves: Path = Path("docs/media/libero_learning_curves.png")
    """Held-out success over GRPO iterations, one line per seed."""


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (n >= 2)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def combine(records: list[dict]) -> dict:
    """The combined record of per-seed records that share one recipe."""
    if len(records) < 2:
        raise ValueError(f"a lift interval needs at least 2 seeds, got {len(records)}")
    seeds = [record["seed"] for record in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}; each record must come from its own --seed")
    for key in RECIPE_KEYS:
        found = {json.dumps(record.get(key)) for record in records}
        if len(found) > 1:
            raise ValueError(f"the records differ in {key}: {sorted(found)}; one recipe per combined record")
    lifts = [record["heldout_success_grpo"] - record["heldout_success_sft"] for record in records]
    low, high = mean_interval(lifts)
    return {
        "seeds": [{key: record.get(key) for key in SEED_KEYS} for record in records],
        "mean_lift": sum(lifts) / len(lifts), "min_lift": min(lifts), "lift_ci95": [low, high],
        "suite": records[0]["suite"], "tasks": records[0]["tasks"], "num_heldout": records[0]["num_heldout"],
        "grpo_finetune": records[0].get("grpo_finetune"),
        "device": "; ".join(sorted({record["device"] for record in records})),
        "wall_seconds": round(sum(record["wall_seconds"] for record in records), 1),
        "commands": [record["command"] for record in records],
        "per_seed": records,
    }


def plot_seeds(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for record in records:
        curve = sorted((int(k), v) for k, v in record["heldout_success_by_iteration"].items())
        axes.plot([i for i, _ in curve], [v for _, v in curve], marker="o", label=f"seed {record['seed']}")
    axes.set(xlabel="GRPO iteration", ylabel="held-out greedy success", ylim=(0, 1))
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(args: Seeds) -> dict:
    records = []
    for path in args.records:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run scripts.libero_learning with --result-json {path}")
        records.append(json.loads(path.read_text()))
    result = combine(records)
    write_json(args.output, result)
    plot_seeds(records, args.curves)
    low, high = result["lift_ci95"]
    print(f"{len(records)} seeds: mean lift {result['mean_lift']:+.3f} (95 % interval {low:+.3f} to {high:+.3f}), "
          f"smallest {result['min_lift']:+.3f} -> {args.output}, {args.curves}")
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Seeds))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"libero_seeds: error: {error}")
