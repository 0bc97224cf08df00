"""The env behind a suite name: a LIBERO suite (LiberoVectorEnv) or the CPU toy task (ToyVectorEnv)."""

from dataclasses import dataclass

from libero_env import NUM_INIT_STATES, SUITES, LiberoVectorEnv
from libero_env.toy import TASK_COLOURS, ToyVectorEnv
from trainer.config import EnvConfig

TOY = "toy"
TOY_HORIZON = 4
"""ToyVectorEnv's default horizon: a random policy succeeds 26 % of the time (libero_env/toy.py)."""
TOY_PUSHES_TO_GOAL = 2
"""Correct pushes that reach the marker (fewer when --max-steps is shorter): --max-steps 1 makes the toy a one-step
task (one image, one action; random success 25 %)."""
TOY_INIT_STATES = 1000
"""Toy instances per task: GRPO trains on 990 marker positions per task, evals hold out 10 (--num-heldout)."""


@dataclass(frozen=True)
class SuiteShape:
    """What validation needs to know about a suite before any env starts."""

    num_tasks: int
    num_init_states: int
    max_steps: int


def suite_names() -> list[str]:
    return [*SUITES, TOY]


def suite_shape(name: str) -> SuiteShape:
    if name == TOY:
        return SuiteShape(num_tasks=len(TASK_COLOURS), num_init_states=TOY_INIT_STATES, max_steps=TOY_HORIZON)
    if name not in SUITES:
        raise ValueError(f"unknown task suite {name!r}; valid suites: {', '.join(suite_names())}")
    return SuiteShape(num_tasks=SUITES[name].num_tasks, num_init_states=NUM_INIT_STATES,
                      max_steps=SUITES[name].max_steps)


def make_env(settings: EnvConfig, wrist: bool) -> LiberoVectorEnv | ToyVectorEnv:
    """The vector env of `settings.task_suite`; `wrist`: render the wrist camera too (LIBERO only; the toy env
    always draws it)."""
    if settings.task_suite == TOY:
        horizon = settings.max_steps or TOY_HORIZON
        return ToyVectorEnv(num_envs=settings.num_envs, num_init_states=TOY_INIT_STATES, horizon=horizon,
                            pushes_to_goal=min(TOY_PUSHES_TO_GOAL, horizon))
    return LiberoVectorEnv(suite=settings.task_suite, num_envs=settings.num_envs, wrist=wrist,
                           max_steps=settings.max_steps)
