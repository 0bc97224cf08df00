"""Evaluation, greedy or sampled at a temperature: per-task success over a list of episodes, shared among ranks,
with videos from rank 0."""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from libero_env import EpisodeSpec, write_video
from trainer.checkpoint import write_json, write_text
from trainer.distributed import DistContext, reduce_values
from trainer.rollout import Policy, PolicyInputs, VectorEnv, play_episodes

MAX_REPLAYS = 3
"""Times an eval episode whose env worker died is played again before the eval gives up."""
Z_95 = 1.959963984540054
"""Standard normal quantile of 0.975: two-sided 95 % intervals."""


def wilson_interval(successes: int, episodes: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate (Wilson 1927): unlike the normal approximation it stays inside
    [0, 1] and does not collapse to a point at 0 or n successes, which small evals hit often."""
    if episodes == 0:
        return 0.0, 1.0
    rate = successes / episodes
    denominator = 1 + z * z / episodes
    center = (rate + z * z / (2 * episodes)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / episodes + z * z / (4 * episodes * episodes)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class TaskResults:
    """Successes and episodes per task id, summed over ranks."""

    successes: dict[int, int]
    episodes: dict[int, int]
    outcomes: tuple[tuple[int, int, int, bool], ...] = ()
    """Each episode as (task_id, init_index, scene, success), in the order of the eval's episode list: two evals of
    one list meet the same scenes, so their outcomes pair episode by episode (`paired_comparison`)."""

    @property
    def success_rate(self) -> float:
        return sum(self.successes.values()) / max(1, sum(self.episodes.values()))

    def task_rate(self, task_id: int) -> float:
        return self.successes[task_id] / self.episodes[task_id]

    @property
    def interval(self) -> tuple[float, float]:
        """95 % Wilson interval of the overall success rate."""
        return wilson_interval(sum(self.successes.values()), sum(self.episodes.values()))

    def task_interval(self, task_id: int) -> tuple[float, float]:
        return wilson_interval(self.successes[task_id], self.episodes[task_id])

    def metrics(self, prefix: str) -> dict[str, float]:
        """Success rates with their 95 % intervals, overall and per task, as `<prefix>/...` metrics."""
        low, high = self.interval
        metrics = {f"{prefix}/success_rate": self.success_rate, f"{prefix}/success_rate_ci95_low": low,
                   f"{prefix}/success_rate_ci95_high": high, f"{prefix}/episodes": sum(self.episodes.values())}
        for task in sorted(self.episodes):
            low, high = self.task_interval(task)
            metrics.update({f"{prefix}/task_{task}/success_rate": self.task_rate(task),
                            f"{prefix}/task_{task}/success_rate_ci95_low": low,
                            f"{prefix}/task_{task}/success_rate_ci95_high": high})
        return metrics


def rank_share(episodes: list[EpisodeSpec], ctx: DistContext) -> list[EpisodeSpec]:
    """The episodes of an eval this rank plays: every world_size-th one from its rank."""
    return episodes[ctx.rank::ctx.world_size]


def evaluate(env: VectorEnv, policy: Policy, episodes: list[EpisodeSpec], inputs: PolicyInputs, ctx: DistContext,
             video_dir: Path | None, video_prefix: str, num_videos: int, progress: bool = False,
             temperature: float | None = None, overlap: bool = False, fixed_batch: bool = False,
             env_tasks: list[int | None] | None = None) -> TaskResults:
    """Plays `episodes` greedily (or sampled at `temperature`), rank r taking every world_size-th one. Rank 0
    records its first episode of each task (up to `num_videos`) to
    <video_dir>/<prefix>_task<t>_init<i>_<success|failure>.mp4. Lost episodes are replayed until they finish.
    `env_tasks`: the envs' tasks carried across calls (play_episodes)."""
    mine = rank_share(episodes, ctx)
    recorded: set[int] = set()
    filmed_tasks: set[int] = set()
    for index, spec in enumerate(mine):
        if ctx.is_main and video_dir is not None and len(recorded) < num_videos and spec.task_id not in filmed_tasks:
            recorded.add(index)
            filmed_tasks.add(spec.task_id)
    specs = [replace(spec, record_video=i in recorded) for i, spec in enumerate(mine)]
    success = np.zeros(len(specs), dtype=bool)
    pending = np.arange(len(specs))
    for _ in range(MAX_REPLAYS + 1):
        if not len(pending):
            break
        result = play_episodes(env, policy, [specs[i] for i in pending], np.zeros(len(pending), dtype=np.int64),
                               inputs, temperature=temperature or 1.0, greedy=temperature is None, keep_steps=False,
                               progress=progress, overlap=overlap, fixed_batch=fixed_batch, env_tasks=env_tasks)
        success[pending] = result.success
        for row, frames in result.videos.items():
            spec = specs[pending[row]]
            if not result.lost[row] and video_dir is not None:
                outcome = "success" if result.success[row] else "failure"
                name = f"{video_prefix}_task{spec.task_id:02d}_init{spec.init_index:02d}_{outcome}.mp4"
                write_video(video_dir / name, frames)
        pending = pending[result.lost]
    if len(pending):
        raise RuntimeError(f"{len(pending)} eval episodes were lost {MAX_REPLAYS + 1} times in a row (env workers "
                           f"keep dying); see the libero_env worker errors above")
    # rank r played episodes r, r + world_size, ...: a sum over ranks puts every outcome at its list position
    played = {f"{i}": 0.0 for i in range(len(episodes))}
    played.update({f"{ctx.rank + i * ctx.world_size}": float(ok) for i, ok in enumerate(success)})
    played = reduce_values(played, ctx)
    outcomes = tuple((s.task_id, s.init_index, s.scene, played[f"{i}"] > 0.5) for i, s in enumerate(episodes))
    task_ids = sorted({s.task_id for s in episodes})
    return TaskResults(successes={t: sum(ok for task, _, _, ok in outcomes if task == t) for t in task_ids},
                       episodes={t: sum(s.task_id == t for s in episodes) for t in task_ids}, outcomes=outcomes)


def paired_comparison(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Two evals of the same episodes (results.json's `episodes`: task, init state, scene, success), compared
    episode by episode: the change in success rate with the Agresti-Min 95 % interval of a paired difference (a
    Wald interval after adding 1/2 to each cell of the 2x2 table; Agresti & Min 2005) and McNemar's exact
    two-sided p-value (the episodes only one of the two solved, binomial at 1/2). Pairing removes the spread of
    episode difficulty that two unpaired Wilson intervals carry, so it detects smaller changes."""
    key = ("task_id", "init_index", "scene")
    if [[e[k] for k in key] for e in before] != [[e[k] for k in key] for e in after]:
        raise ValueError("the two evals did not play the same episodes (task, init state, scene, in order): "
                         "evaluate both with the same --task-ids, --protocol, --trials-per-task, --num-heldout and "
                         "--seed")
    if not before:
        raise ValueError("the evals hold no episodes to compare")
    n = len(before)
    only_before = sum(b["success"] and not a["success"] for b, a in zip(before, after))
    only_after = sum(a["success"] and not b["success"] for b, a in zip(before, after))
    discordant = only_before + only_after
    tail = sum(math.comb(discordant, k) for k in range(min(only_before, only_after) + 1)) / 2 ** discordant
    cells_before, cells_after, total = only_before + 0.5, only_after + 0.5, n + 2
    difference = (cells_after - cells_before) / total
    half = Z_95 * math.sqrt(cells_before + cells_after - (cells_after - cells_before) ** 2 / total) / total
    return {"episodes": n, "success_before": sum(b["success"] for b in before) / n,
            "success_after": sum(a["success"] for a in after) / n, "difference": (only_after - only_before) / n,
            "difference_ci95": [max(-1.0, difference - half), min(1.0, difference + half)],
            "only_before": only_before, "only_after": only_after, "mcnemar_p": min(1.0, 2 * tail)}


def compare_evals(before: Path, after: Path) -> str:
    """`compare`: paired_comparison of two eval results directories (or their results.json), as one line."""
    outcomes = []
    for path in (before, after):
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{path} holds no results.json: give the results directory an eval printed "
                             f"(runs/eval-...)")
        episodes = json.loads(file.read_text()).get("episodes")
        if episodes is None:
            raise ValueError(f"{file} has no per-episode outcomes (an eval from before they were recorded): run "
                             f"that eval again")
        outcomes.append(episodes)
    c = paired_comparison(*outcomes)
    low, high = c["difference_ci95"]
    return (f"success {c['success_before']:.3f} -> {c['success_after']:.3f} on the same {c['episodes']} episodes: "
            f"{c['difference']:+.3f} (paired 95 % interval {low:+.3f} to {high:+.3f}); solved only by the first "
            f"{c['only_before']}, only by the second {c['only_after']}; McNemar exact p = {c['mcnemar_p']:.2g}")


EVALS_DIR = "evals"
"""A training run's held-out evals: <run>/evals/iter_NNNNNN/results.json, each with its episodes, so that
`compare` pairs any two of a run's evals (e.g. its first and last)."""


def run_eval_dir(run_dir: Path, iteration: int) -> Path:
    """Where a training run writes (and readers find) its held-out eval at `iteration`."""
    return run_dir / EVALS_DIR / f"iter_{iteration:06d}"


def write_results(results_dir: Path, results: TaskResults, instructions: dict[int, str],
                  config: dict[str, Any], dtype: str, policy: str | None = None) -> None:
    """results.json and results.md: success per task and overall with 95 % Wilson intervals, the dtype the policy
    computed in, and the config that produced them. `policy` names what was evaluated (default: the config's
    checkpoint and adapter)."""
    rows = [{"task_id": t, "instruction": instructions[t], "successes": results.successes[t],
             "episodes": results.episodes[t], "success_rate": results.task_rate(t),
             "ci95": list(results.task_interval(t))} for t in sorted(results.episodes)]
    total = {"successes": sum(results.successes.values()), "episodes": sum(results.episodes.values()),
             "success_rate": results.success_rate, "ci95": list(results.interval)}
    episodes = [{"task_id": t, "init_index": i, "scene": scene, "success": ok} for t, i, scene, ok in results.outcomes]
    write_json(results_dir / "results.json", {"config": config, "dtype": dtype, "tasks": rows, "overall": total,
                                              "episodes": episodes})
    default_policy = f"checkpoint `{config['model']['checkpoint']}`, adapter `{config['model']['adapter']}`"
    actions = "greedy" if config["temperature"] is None else f"sampled at temperature {config['temperature']}"
    lines = [f"# {config['env']['task_suite']}: success, {actions} actions ({config['protocol']} protocol)", "",
             f"{policy or default_policy}, computed in {dtype}; intervals are 95 % Wilson score intervals", "",
             "| task | instruction | successes | episodes | success rate | 95 % interval |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['task_id']} | {r['instruction']} | {r['successes']} | {r['episodes']} | "
              f"{100 * r['success_rate']:.1f} % | {_percent_range(r['ci95'])} |" for r in rows]
    lines.append(f"| all | | {total['successes']} | {total['episodes']} | {100 * total['success_rate']:.1f} % | "
                 f"{_percent_range(total['ci95'])} |")
    write_text(results_dir / "results.md", "\n".join(lines) + "\n")


def _percent_range(bounds: list[float]) -> str:
    return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f} %"
