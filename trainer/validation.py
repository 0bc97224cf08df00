"""Checks that turn a config that cannot work into one clear error before any model, env or process starts."""

import re
from pathlib import Path

from trainer.checkpoint import ADAPTER_DIR, MODEL_DIR, default_run_name, latest_checkpoint, resolve_adapter
from trainer.config import DemoConfig, EnvConfig, EvaluateConfig, ModelConfig, TrainConfig
from trainer.envs import suite_names, suite_shape

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(model: ModelConfig) -> None:
    path = Path(model.checkpoint).expanduser()
    looks_local = path.exists() or not _HUB_ID.match(model.checkpoint) or Path(path.parts[0]).is_dir()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {model.checkpoint} not found: expected a directory with config.json "
                                f"(REF 1.1) or a hub id such as openvla/openvla-7b-finetuned-libero-spatial; "
                                f"`OpenVLA_GRPO.py demo` builds a tiny local one")
    if model.adapter is not None:
        resolve_adapter(model.adapter)


def check_env(env: EnvConfig) -> list[int]:
    """The task ids the config selects (all of the suite when none are given)."""
    if env.task_suite not in suite_names():
        raise ValueError(f"unknown --task-suite {env.task_suite!r}; valid suites: {', '.join(suite_names())}")
    shape = suite_shape(env.task_suite)
    bad = [t for t in env.task_ids if not 0 <= t < shape.num_tasks]
    if bad:
        raise ValueError(f"unknown task id(s) {bad} for {env.task_suite}: valid task ids are 0..{shape.num_tasks - 1}")
    if len(set(env.task_ids)) != len(env.task_ids):
        raise ValueError(f"--task-ids has repeats: {list(env.task_ids)}")
    if env.num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {env.num_envs}")
    if env.max_steps is not None and env.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (or omitted for the suite's {shape.max_steps}), got {env.max_steps}")
    if not 0 < env.num_heldout < shape.num_init_states:
        raise ValueError(f"--num-heldout must be in 1..{shape.num_init_states - 1} ({shape.num_init_states} init "
                         f"states per task), got {env.num_heldout}")
    return list(env.task_ids) or list(range(shape.num_tasks))


def run_dir_of(config: TrainConfig) -> Path:
    if config.resume is not None:
        return config.resume
    prefix = "demo" if isinstance(config, DemoConfig) else config.env.task_suite
    return config.logging.output_dir / (config.logging.run_name or default_run_name(prefix))


def check_train(config: TrainConfig, rank: int = 0) -> Path:
    """Raises on the first problem; returns the run directory the config will write to. Only rank 0 writes
    there, so only rank 0 checks that a new run directory does not exist yet."""
    check_model(config.model)
    check_env(config.env)
    grpo, optim = config.grpo, config.optim
    if grpo.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (advantages compare rollouts of one group), got {grpo.group_size}")
    positive = {"--groups-per-iteration": grpo.groups_per_iteration, "--mini-batch-size": optim.mini_batch_size,
                "--micro-batch-size": optim.micro_batch_size, "--ppo-epochs": optim.ppo_epochs,
                "--temperature": grpo.temperature, "--lr": optim.lr, "--clip-low": grpo.clip_low,
                "--clip-high": grpo.clip_high, "--max-grad-norm": optim.max_grad_norm,
                "--skip-grad-norm": optim.skip_grad_norm, "--timesteps": config.timesteps,
                "--save-every": config.checkpointing.save_every}
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if optim.mini_batch_size % optim.micro_batch_size:
        divisors = [d for d in range(1, optim.mini_batch_size + 1) if optim.mini_batch_size % d == 0]
        raise ValueError(f"--mini-batch-size {optim.mini_batch_size} is not divisible by --micro-batch-size "
                         f"{optim.micro_batch_size}; valid micro-batch sizes: {divisors}")
    if config.iterations is not None and config.iterations < 1:
        raise ValueError(f"--iterations must be >= 1 (or omitted), got {config.iterations}")
    if grpo.entropy_coef < 0:
        raise ValueError(f"--entropy-coef must be >= 0 (a bonus on entropy), got {grpo.entropy_coef}")
    if grpo.max_refill_rounds < 0:
        raise ValueError(f"--max-refill-rounds must be >= 0, got {grpo.max_refill_rounds}")
    per_task = config.evaluation.eval_episodes_per_task
    if per_task is not None and not 1 <= per_task <= config.env.num_heldout:
        raise ValueError(f"--eval-episodes-per-task must be in 1..--num-heldout ({config.env.num_heldout}), got "
                         f"{per_task}")
    if config.finetune == "full" and grpo.kl_coef > 0:
        raise ValueError(f"--kl-coef {grpo.kl_coef} needs the base model, which is the policy with its LoRA adapter "
                         f"disabled; --finetune full has no adapter: use --kl-coef 0 or --finetune lora")
    if config.finetune == "full" and config.model.adapter is not None:
        raise ValueError(f"--adapter {config.model.adapter} is a LoRA adapter and --finetune full trains no adapter: "
                         f"merge it into a full checkpoint first (VLAPolicy.merge_and_export; an SFT run writes one to "
                         f"model/) and pass that as --checkpoint")
    run_dir = run_dir_of(config)
    if config.resume is not None:
        latest = latest_checkpoint(config.resume)
        expected = MODEL_DIR if config.finetune == "full" else ADAPTER_DIR
        if not (latest / expected).is_dir():
            saved = "full" if config.finetune == "lora" else "lora"
            raise ValueError(f"{latest} has no {expected}/: the run was trained with --finetune {saved}; resume it "
                             f"with --finetune {saved} (or without --finetune)")
    elif rank == 0 and run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} already exists: continue it with --resume {run_dir}, or "
                              f"choose another --run-name")
    return run_dir


def check_eval(config: EvaluateConfig, rank: int = 0) -> Path:
    """Raises on the first problem; returns the results directory (new: results are never overwritten)."""
    check_model(config.model)
    check_env(config.env)
    if not 1 <= config.trials_per_task <= suite_shape(config.env.task_suite).num_init_states:
        raise ValueError(f"--trials-per-task must be in 1..{suite_shape(config.env.task_suite).num_init_states}, "
                         f"got {config.trials_per_task}")
    if config.temperature is not None and not config.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (or left out for greedy actions), got {config.temperature}")
    results_dir = config.output_dir / (config.run_name or default_run_name(f"eval-{config.env.task_suite}"))
    if rank == 0 and results_dir.exists():
        raise FileExistsError(f"results directory {results_dir} already exists; choose another --run-name")
    return results_dir
