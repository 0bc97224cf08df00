"""Metrics: one JSON line per iteration (SFT: per logged step) in <run>/metrics.jsonl (always), optionally wandb,
and a console line.

GRPO's keys are namespaced rollout/, train/, eval/ and perf/, and every line has "iteration" and "env_steps"; SFT's
are sft/ with "step".
"""

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import write_text
from trainer.config import LogConfig
from trainer.distributed import DistContext, reduce_values

METRICS_FILE = "metrics.jsonl"
CONSOLE_KEYS = {
    "iteration": "iter", "env_steps": "env steps", "rollout/success_rate": "success", "eval/success_rate": "eval",
    "train/loss": "loss", "train/grad_norm": "grad", "rollout/groups_dropped_fraction": "dropped",
    "train/entropy": "entropy", "perf/iteration_seconds": "s",
}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by `OpenVLA_GRPO.py train`")
    return parse_metrics(path)[0]


def parse_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a metrics.jsonl and whether its last line was torn (a write cut short by a kill, a power loss
    or a full disk) and left out. A damaged line before the last is an error naming it."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                return rows, True
            raise ValueError(f"{path} line {number} is not JSON ({error}); delete or repair that line") from error
    return rows, False


class MetricsLogger:
    """Appends metrics of rank 0 to metrics.jsonl (and wandb); other ranks' loggers do nothing. Every line holds
    `step_key` (GRPO: iteration, SFT: step), which orders the lines and is wandb's step."""

    def __init__(self, run_dir: Path, config: dict[str, Any], settings: LogConfig | None, enabled: bool,
                 resume_iteration: int | None, step_key: str = "iteration",
                 console: dict[str, str] | None = CONSOLE_KEYS) -> None:
        """settings None: no wandb. console: the keys (with their short names) of the console line; None: all."""
        self.enabled, self.step_key, self.console = enabled, step_key, console
        self.path = run_dir / METRICS_FILE
        self.run = None
        if not enabled:
            return
        if resume_iteration is not None and self.path.exists():
            # Lines logged after the checkpoint are replayed by the resumed run; drop them so each iteration
            # appears once.
            rows, torn = parse_metrics(self.path)
            if torn:
                print(f"{self.path}: dropped its torn last line (a write cut short); the resumed run logs the "
                      f"{step_key}s after {resume_iteration} again", flush=True)
            kept = [row for row in rows if row[step_key] <= resume_iteration]
            write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if settings is not None and settings.use_wandb:
            import wandb

            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(wandb.util.generate_id())
            self.run = wandb.init(project=settings.wandb_project, name=run_dir.name, id=id_file.read_text(),
                                  resume="allow", dir=run_dir, config=config, mode=settings.wandb_mode)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A skipped non-finite step logs null, not NaN, so that every JSON reader accepts the line.
        metrics = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=int(metrics[self.step_key]))
        shown = self.console or {key: key for key in metrics}
        print(" | ".join(f"{short} {_number(metrics[key])}" for key, short in shown.items()
                         if metrics.get(key) is not None), flush=True)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


class UpdateStats:
    """Token-weighted means, minima and maxima of per-micro-batch statistics, reduced over ranks. Values may be
    tensors on the GPU: they are combined there and read back once, in `reduce`, since each read waits for all
    queued GPU work and would leave the GPU idle while the host prepares the next micro-batch."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.weights: dict[str, float] = {}
        self.minima: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def mean(self, name: str, value: torch.Tensor | float, weight: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + _detached(value) * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def minimum(self, name: str, value: torch.Tensor | float) -> None:
        self.minima[name] = _extreme(torch.minimum, self.minima.get(name), value)

    def maximum(self, name: str, value: torch.Tensor | float) -> None:
        self.maxima[name] = _extreme(torch.maximum, self.maxima.get(name), value)

    def reduce(self, ctx: DistContext, names: dict[str, tuple[str, ...]]) -> dict[str, float]:
        """train/<name> for the declared `names` ({"mean": ..., "min": ..., "max": ...}), the same on every rank;
        a rank that saw no data contributes nothing."""
        sums = reduce_values({n: float(self.sums.get(n, 0.0)) for n in names["mean"]}, ctx)
        weights = reduce_values({n: self.weights.get(n, 0.0) for n in names["mean"]}, ctx)
        minima = reduce_values({n: float(self.minima.get(n, math.inf)) for n in names["min"]}, ctx, "min")
        maxima = reduce_values({n: float(self.maxima.get(n, -math.inf)) for n in names["max"]}, ctx, "max")
        out = {f"train/{n}": sums[n] / weights[n] for n in names["mean"] if weights[n] > 0}
        out.update({f"train/{n}": v for n, v in {**minima, **maxima}.items() if math.isfinite(v)})
        return out


def _detached(value: torch.Tensor | float) -> torch.Tensor | float:
    return value.detach().float() if isinstance(value, torch.Tensor) else float(value)


def _extreme(pick, current: torch.Tensor | None, value: torch.Tensor | float) -> torch.Tensor:
    """`pick` (torch.minimum / torch.maximum) of the running value and `value`, without reading a tensor back (a
    0-d CPU tensor combines with a GPU one)."""
    value = torch.as_tensor(_detached(value))
    return value if current is None else pick(current, value)
