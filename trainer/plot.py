"""Success-rate and loss curves of a run, drawn from its metrics.jsonl."""

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from trainer.metrics import read_metrics

PANELS = (
    ("success rate", ("rollout/success_rate", "eval/success_rate")),
    ("loss", ("train/loss",)),
    ("gradient norm (before clipping)", ("train/grad_norm",)),
    ("entropy and KL", ("train/entropy", "train/approx_kl_k3", "train/kl_to_base")),
)


def plot_run(run_dir: Path, output: Path | None = None) -> Path:
    """Writes the curves PNG of a run (default <run_dir>/curves.png) and returns its path."""
    return plot_metrics(read_metrics(run_dir), run_dir.name, output or run_dir / "curves.png")


def plot_metrics(rows: list[dict[str, Any]], title: str, output: Path) -> Path:
    """Writes the curves PNG of metrics rows (one per iteration) and returns its path."""
    tmp = output.with_name(f".{output.stem}.tmp.png")
    try:
        curves_figure(rows, title).savefig(tmp, dpi=110)
        os.replace(tmp, output)
    except OSError as error:
        raise OSError(f"cannot write the plot to {output} ({error.strerror or error}); pass --output with a path in "
                      f"a writable directory") from error
    return output


def curves_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """One panel per PANELS entry, iterations on the x axis."""
    figure = Figure(figsize=(5 * len(PANELS), 3.6))
    axes = figure.subplots(1, len(PANELS))
    for axis, (panel, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(row["iteration"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                x, y = zip(*points)
                axis.plot(x, y, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        axis.set_title(panel)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=7)
    axes[0].set_ylim(-0.05, 1.05)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
