"""The command line: flags and their aliases, config files, the errors a config that cannot work gives before any
work starts, the eval and plot subcommands, and start_training.sh (tiny checkpoint, toy env, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from libero_env import init_state_split
from OpenVLA_GRPO import parse_command
from trainer.checkpoint import CHECKPOINTS
from trainer.config import EvaluateConfig, ModelConfig, PlotConfig, TrainConfig, config_to_dict
from trainer.envs import suite_shape
from trainer.policy_builder import build_policy
from trainer.validation import check_train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def toy_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    """A toy run of two small iterations."""
    return ["--checkpoint", str(checkpoint), "--task-suite", "toy", "--num-envs", "4", "--group-size", "2",
            "--groups-per-iteration", "2", "--mini-batch-size", "8", "--micro-batch-size", "4", "--lora-rank", "4",
            "--lora-alpha", "4", "--eval-every", "2", "--eval-episodes-per-task", "1", "--num-videos", "1",
            "--iterations", "2", "--no-gradient-checkpointing", "--output-dir", str(output_dir), *extra]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "OpenVLA_GRPO.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def test_original_flags_and_aliases():
    config = parse_command(["train", "--task-suite", "toy", "--task-id", "2", "--num-envs", "4", "--timesteps", "99",
                            "--no-wandb"])
    assert isinstance(config, TrainConfig)
    assert config.env.task_suite == "toy" and config.env.task_ids == (2,) and config.env.num_envs == 4
    assert config.timesteps == 99 and config.logging.use_wandb is False
    config = parse_command(["train", "--task-ids", "0", "3", "--use-wandb", "--wandb-mode", "offline"])
    assert config.env.task_ids == (0, 3) and config.logging.use_wandb and config.logging.wandb_mode == "offline"
    assert parse_command(["train", "--wandb"]).logging.use_wandb


def test_documented_defaults():
    config = parse_command(["train"])
    assert (config.lora.lora_rank, config.lora.lora_alpha, config.lora.lora_dropout) == (16, 16, 0.0)
    assert (config.grpo.clip_low, config.grpo.clip_high, config.grpo.log_ratio_clamp) == (0.2, 0.28, 5.0)
    assert (config.grpo.advantage_clamp, config.grpo.group_size, config.grpo.temperature) == (10.0, 8, 1.6)
    assert config.optim.max_grad_norm == 1.0 and config.grpo.kl_coef == 0.0
    assert isinstance(parse_command(["eval"]), EvaluateConfig)
    assert parse_command(["eval"]).trials_per_task == 50 and parse_command(["eval"]).seed == 7
    assert parse_command(["plot", "runs/x"]) == PlotConfig(run_dir=Path("runs/x"))


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command(["train", "--no-such-flag", "3"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_command(["train", "--aggregation", "mean-of-everything"])


def test_config_files_nested_or_flat_and_flags_override(tmp_path):
    (tmp_path / "run.yaml").write_text("env:\n  task_suite: toy\n  task_ids: [1, 2]\nlr: 0.003\ngroup_size: 4\n")
    config = parse_command(["train", "--config", str(tmp_path / "run.yaml"), "--group-size", "6"])
    assert config.env.task_suite == "toy" and config.env.task_ids == (1, 2)
    assert config.optim.lr == 0.003 and config.grpo.group_size == 6
    (tmp_path / "eval.json").write_text(json.dumps({"protocol": "heldout", "env": {"num_envs": 5}}))
    config = parse_command(["eval", "--config", str(tmp_path / "eval.json")])
    assert config.protocol == "heldout" and config.env.num_envs == 5


def test_overlapped_rollouts_auto_on_for_oft_on_cuda_and_a_flag_saved_by_older_runs(tmp_path):
    """auto: on for an OFT head on CUDA with 2+ envs (the 7B measurement), off for the token head and on the CPU;
    on / off win; a config.json saved when the field was a bool still loads (True -> on, False -> off)."""
    config = parse_command(["train", "--num-envs", "16"])
    assert config.env.overlap_rollouts == "auto"
    assert config.env.overlaps(oft=True, cuda=True)
    assert not config.env.overlaps(oft=False, cuda=True) and not config.env.overlaps(oft=True, cuda=False)
    assert not parse_command(["train", "--num-envs", "1"]).env.overlaps(oft=True, cuda=True)
    assert parse_command(["train", "--overlap-rollouts", "on"]).env.overlaps(oft=False, cuda=False)
    assert not parse_command(["train", "--overlap-rollouts", "off"]).env.overlaps(oft=True, cuda=True)
    for saved, expected in ((True, "on"), (False, "off")):
        (tmp_path / "old.json").write_text(json.dumps({"env": {"overlap_rollouts": saved}}))
        assert parse_command(["train", "--config", str(tmp_path / "old.json")]).env.overlap_rollouts == expected


def test_a_run_saved_with_a_retired_speed_setting_resumes(tmp_path):
    """A run directory written when --pi-old-while-simulating existed (it set where pi_old was computed, not its
    numbers) resumes with its other settings; the same key in a --config file is still an unknown key."""
    saved = config_to_dict(parse_command(["train", "--lr", "0.003"]))
    saved["grpo"]["pi_old_while_simulating"] = "auto"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert parse_command(["train", "--resume", str(tmp_path / "run")]).optim.lr == 0.003
    (tmp_path / "flags.json").write_text(json.dumps({"pi_old_while_simulating": "on"}))
    with pytest.raises(ValueError, match="unknown key 'pi_old_while_simulating'"):
        parse_command(["train", "--config", str(tmp_path / "flags.json")])


@pytest.mark.parametrize("text, message", [
    ("lr_rate: 0.1\n", "unknown key 'lr_rate'"),
    ("env:\n  num_envs: four\n", "num_envs: expected int, got 'four'"),
    ("aggregation: mean\n", "'mean' is not one of"),
])
def test_config_file_errors_name_the_key(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_command(["train", "--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("flags, error, message", [
    (["--task-suite", "libero_moon"], ValueError, "unknown --task-suite 'libero_moon'; valid suites: libero_spatial"),
    (["--task-id", "4"], ValueError, r"unknown task id\(s\) \[4\] for toy: valid task ids are 0..3"),
    (["--mini-batch-size", "10", "--micro-batch-size", "4"], ValueError,
     r"--mini-batch-size 10 is not divisible by --micro-batch-size 4; valid micro-batch sizes: \[1, 2, 5, 10\]"),
    (["--group-size", "1", "--groups-per-iteration", "4"], ValueError, "--group-size must be >= 2"),
    (["--eval-episodes-per-task", "11"], ValueError, "--eval-episodes-per-task must be in 1..--num-heldout"),
])
def test_configs_that_cannot_work(checkpoint, tmp_path, flags, error, message):
    config = parse_command(["train", *toy_args(checkpoint, tmp_path), *flags])
    with pytest.raises(error, match=message):
        check_train(config)


def test_missing_checkpoint_existing_run_and_resume_without_checkpoint(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing-model not found"):
        check_train(parse_command(["train", *toy_args(tmp_path / "missing-model", tmp_path)]))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match=f"continue it with --resume {tmp_path / 'taken'}"):
        check_train(parse_command(["train", *toy_args(checkpoint, tmp_path), "--run-name", "taken"]))
    (tmp_path / "taken" / "config.json").write_text(json.dumps({"env": {"task_suite": "toy"}}))
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        check_train(parse_command(["train", *toy_args(checkpoint, tmp_path), "--resume", str(tmp_path / "taken")]))


def test_error_before_any_work_in_one_line(checkpoint, tmp_path):
    result = run_cli("train", *toy_args(checkpoint, tmp_path), "--task-suite", "toy", "--task-ids", "0", "9")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "OpenVLA_GRPO.py: error: unknown task id(s) [9] for toy: valid task ids are 0..3"]
    assert list(tmp_path.iterdir()) == []


def test_eval_subcommand_writes_table_and_videos(checkpoint, tmp_path):
    result = run_cli("eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--task-ids", "0", "1",
                     "--protocol", "reference", "--trials-per-task", "3", "--num-envs", "4", "--num-videos", "2",
                     "--output-dir", str(tmp_path), "--run-name", "toy-eval")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "toy-eval" / "results.json").read_text())
    assert [row["task_id"] for row in results["tasks"]] == [0, 1]
    assert [row["episodes"] for row in results["tasks"]] == [3, 3] and results["overall"]["episodes"] == 6
    assert results["overall"]["successes"] == sum(row["successes"] for row in results["tasks"])
    table = (tmp_path / "toy-eval" / "results.md").read_text()
    assert "| 0 | push toward the red marker | " in table and "| all | |" in table
    videos = sorted(p.name for p in (tmp_path / "toy-eval" / "videos").iterdir())
    assert len(videos) == 2 and videos[0].startswith("eval_task00_init00_")
    again = run_cli("eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--output-dir", str(tmp_path),
                    "--run-name", "toy-eval")
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [  # never overwrites results
        f"OpenVLA_GRPO.py: error: results directory {tmp_path / 'toy-eval'} already exists; choose another --run-name"]


def start_training(*args: str, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "start_training.sh"), *args], capture_output=True, text=True,
                          env={**ENV, "LOG_DIR": str(log_dir)}, cwd=REPO, timeout=300)


def wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"run {pid} did not finish in {timeout} s")


@pytest.mark.slow
def test_start_training_detaches_logs_and_refuses_a_second_start(checkpoint, tmp_path):
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    args = [*toy_args(checkpoint, runs), "--iterations", "100000", "--save-every", "1"]  # runs until stopped
    started = start_training(*args, "--run-name", "toy-bg", log_dir=logs)
    assert started.returncode == 0, started.stderr
    pid = int((logs / "toy-bg.pid").read_text())
    assert f"tail -f {logs / 'toy-bg.log'}" in started.stdout and f"kill {pid}" in started.stdout
    try:
        again = start_training(*args, "--run-name", "toy-bg", log_dir=logs)
        # refused by the PID file, or by the run directory once the first run has created it
        assert again.returncode != 0
        assert f"already running as PID {pid}" in again.stderr or "already exists" in again.stderr
        while not list((runs / "toy-bg" / CHECKPOINTS).glob("iter_*")):
            os.kill(pid, 0)  # raises if the run died before its first checkpoint
            time.sleep(1)
        resumed_twice = start_training("--resume", str(runs / "toy-bg"), log_dir=logs)
        assert resumed_twice.returncode != 0 and f"already running as PID {pid}" in resumed_twice.stderr
    finally:
        os.kill(pid, signal.SIGTERM)  # what the printed `kill <pid>` does
    wait_for_exit(pid, timeout=60)
    assert "iter 1 | env steps" in (logs / "toy-bg.log").read_text()

    plotted = run_cli("plot", str(runs / "toy-bg"), "--output", str(tmp_path / "curves.png"))
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_training_reports_bad_flags_at_once(tmp_path):
    result = start_training("--task-suite", "libero_moon", log_dir=tmp_path / "logs")
    assert result.returncode != 0 and "unknown --task-suite 'libero_moon'" in result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("protocol", ["train", "heldout"])
def test_eval_protocols_take_their_split(checkpoint, tmp_path, protocol):
    result = run_cli("eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--task-ids", "0",
                     "--protocol", protocol, "--trials-per-task", "2", "--num-envs", "2", "--num-videos", "1",
                     "--output-dir", str(tmp_path), "--run-name", protocol)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / protocol / "results.json").read_text())["overall"]["episodes"] == 2
    train, heldout = init_state_split(suite_shape("toy").num_init_states, 10, 0)
    first = (train if protocol == "train" else heldout)[0]
    [video] = (tmp_path / protocol / "videos").iterdir()
    assert video.name.startswith(f"eval_task00_init{first:02d}_")


def test_eval_can_sample_at_a_temperature(checkpoint, tmp_path):
    result = run_cli("eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--task-ids", "0",
                     "--protocol", "train", "--trials-per-task", "4", "--num-envs", "4", "--num-videos", "0",
                     "--temperature", "0.7", "--output-dir", str(tmp_path), "--run-name", "sampled")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "sampled" / "results.json").read_text())
    assert results["config"]["temperature"] == 0.7 and results["overall"]["episodes"] == 4
    assert "success, sampled at temperature 0.7 actions" in (tmp_path / "sampled" / "results.md").read_text()
    rejected = run_cli("eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--temperature", "0",
                       "--output-dir", str(tmp_path), "--run-name", "zero")
    assert rejected.returncode == 1 and rejected.stderr.strip().splitlines() == [
        "OpenVLA_GRPO.py: error: --temperature must be > 0 (or left out for greedy actions), got 0.0"]


def test_cuda_graphs_follow_the_flag(checkpoint):
    assert parse_command(["train"]).model.cuda_graphs
    assert not parse_command(["eval", "--no-cuda-graphs"]).model.cuda_graphs
    for enabled in (True, False):
        policy = build_policy(ModelConfig(checkpoint=str(checkpoint), cuda_graphs=enabled), None, "libero_spatial",
                              torch.device("cpu"))
        assert policy.cuda_graphs is enabled and not policy.fixed_batch  # graphs replay on CUDA only


def test_the_update_graph_follows_its_flag_and_stays_off_where_it_cannot_capture(checkpoint):
    """--graph-update (default on) reaches the policy, except under --base-quant or --compile-layers."""
    assert parse_command(["train"]).model.graph_update
    assert not parse_command(["train", "--no-graph-update"]).model.graph_update
    for settings, expected in (({}, True), ({"graph_update": False}, False), ({"base_quant": "int8"}, False),
                               ({"compile_layers": True}, False)):
        model = ModelConfig(checkpoint=str(checkpoint), **settings)
        assert build_policy(model, None, "libero_spatial", torch.device("cpu")).graph_update is expected


def test_fused_kernels_are_on_by_default_and_only_on_cuda(checkpoint):
    """--fused-kernels (default on) swaps in Liger's kernels on CUDA only (tests/test_vla_gpu.py checks them there):
    a CPU policy keeps transformers' RMSNorm and MLP, and VLAPolicy.fuse_kernels on the CPU names the device."""
    assert parse_command(["train"]).model.fused_kernels
    assert not parse_command(["train", "--no-fused-kernels"]).model.fused_kernels
    policy = build_policy(ModelConfig(checkpoint=str(checkpoint)), None, "libero_spatial", torch.device("cpu"))
    layer = policy.model.language_model.model.layers[0]
    assert isinstance(layer.input_layernorm, LlamaRMSNorm) and isinstance(layer.mlp, LlamaMLP)
    with pytest.raises(ValueError, match="^fused kernels run on CUDA only; this policy is on cpu$"):
        policy.fuse_kernels()
