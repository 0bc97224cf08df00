"""Every failure a user can cause: one line naming the problem and the fix, a non-zero exit, and the directory tree
exactly as it was (no run directory, no config.json, no results directory). Tiny look-alike checkpoint, toy
suite, CPU; the CLI runs in-process except where the exit status and stderr of a real process are the point."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from OpenVLA_GRPO import GRPOTrainer, main, parse_command
from trainer.checkpoint import CHECKPOINTS, save_checkpoint
from trainer.errors import TRACEBACK_ENV, UserError
from trainer.metrics import METRICS_FILE, read_metrics
from trainer.validation import check_output_space

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PREFIX = "OpenVLA_GRPO.py: error: "


def toy_args(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    """One small toy iteration with a checkpoint."""
    return ["--checkpoint", str(checkpoint), "--task-suite", "toy", "--task-ids", "0", "1", "--num-envs", "4",
            "--group-size", "2", "--groups-per-iteration", "2", "--mini-batch-size", "8", "--micro-batch-size", "4",
            "--lora-rank", "4", "--lora-alpha", "4", "--eval-every", "0", "--iterations", "1", "--save-every", "1",
            "--no-gradient-checkpointing", "--no-progress", "--output-dir", str(output_dir), *extra]


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its content (directories: 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def fails(*args: str) -> str:
    """Runs the CLI in-process; returns its one-line error message (without the program prefix)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(PREFIX), message
    assert "\n" not in message
    return message.removeprefix(PREFIX)


def fails_unchanged(root: Path, *args: str) -> str:
    """`fails`, and the tree under `root` is byte for byte what it was."""
    before = tree(root)
    message = fails(*args)
    assert tree(root) == before
    return message


@pytest.fixture(scope="module")
def finished_run(checkpoint, tmp_path_factory) -> Path:
    """A toy run of one iteration with its checkpoint (read-only: tests copy it)."""
    output = tmp_path_factory.mktemp("runs")
    main(["train", *toy_args(checkpoint, output, "--run-name", "done")])
    return output / "done"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "runs" / "done"))


@pytest.fixture
def model_copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "model"))


def test_failed_resume_with_a_new_lora_rank_leaves_the_run_resumable(run, tmp_path):
    message = fails_unchanged(tmp_path, "train", "--resume", str(run), "--lora-rank", "8")
    assert message.startswith(f"--resume {run} cannot change --lora-rank (saved 4, given 8): the run was trained "
                              f"with the saved values ({run / 'config.json'}). A resumed run may change only "
                              f"--iterations, --timesteps, --max-seconds")
    assert "start a new run (another --run-name) to change the others" in message
    main(["train", "--resume", str(run), "--iterations", "2", "--overlap-rollouts", "on"])  # a speed setting
    assert [row["iteration"] for row in read_metrics(run)] == [1, 2]


def test_resume_lists_every_incompatible_field(run, tmp_path, checkpoint, model_copy):
    message = fails_unchanged(tmp_path, "train", "--resume", str(run), "--task-ids", "0", "1", "2",
                              "--checkpoint", str(model_copy), "--lr", "0.5", "--iterations", "3")
    assert (f"cannot change --checkpoint (saved {str(checkpoint)!r}, given {str(model_copy)!r}); "
            f"--task-ids (saved [0, 1], given [0, 1, 2]); --lr (saved 1e-05, given 0.5)") in message
    assert "--iterations (" not in message  # a field that may change is not listed


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[:200]), "is not a readable safetensors file"),
    (lambda path: path.write_bytes(os.urandom(4096)), "is not a readable safetensors file"),
])
def test_truncated_or_garbled_weights_are_named(model_copy, tmp_path, damage, reason):
    shard = model_copy / "model-00002-of-00004.safetensors"
    damage(shard)
    message = fails_unchanged(tmp_path, "train", *toy_args(model_copy, tmp_path / "runs"))
    assert message.startswith(f"{shard} {reason} (") and message.endswith("it is truncated or damaged; copy or "
                                                                           "download it again")
    # the same command works once the file is good again: nothing was left behind to block it
    assert not (tmp_path / "runs").exists()


def test_wrong_hidden_size_is_named(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (model_copy / "config.json").write_text(json.dumps(config))
    message = fails_unchanged(tmp_path, "train", *toy_args(model_copy, tmp_path / "runs"))
    assert message.startswith(f"{model_copy} (4 shards) does not match the model built from its config: shape "
                              f"mismatch for")


def test_missing_statistics_key_is_named(checkpoint, tmp_path):
    message = fails_unchanged(tmp_path, "train", *toy_args(checkpoint, tmp_path / "runs"), "--unnorm-key", "moon")
    assert message.startswith("unnorm_key 'moon' (nor 'moon_no_noops') is not in ")
    assert "available keys: ['libero_spatial']" in message


def test_eval_with_an_adapter_of_another_base_model(run, checkpoint, tmp_path):
    adapter = run / CHECKPOINTS / "iter_000001" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in weights if k.endswith("q_proj.lora_A.weight"))[0]
    weights[key] = torch.zeros(weights[key].shape[0], 2 * weights[key].shape[1])  # a base twice as wide
    save_file(weights, adapter / "adapter_model.safetensors")
    message = fails_unchanged(tmp_path, "eval", "--checkpoint", str(checkpoint), "--adapter", str(run),
                              "--task-suite", "toy", "--output-dir", str(tmp_path / "results"))
    assert message.startswith(f"adapter {adapter} does not fit this checkpoint: {key} is [4, 128] but the layer "
                              f"is [64, 64]; it was trained on another base model")


def test_what_our_runs_write_given_as_the_checkpoint_is_named_with_the_flags_that_take_it(run, checkpoint, tmp_path):
    adapter = run / CHECKPOINTS / "iter_000001" / "adapter"
    eval_args = ["--task-suite", "toy", "--output-dir", str(tmp_path / "results")]
    assert fails_unchanged(tmp_path, "eval", "--checkpoint", str(adapter), *eval_args) == (
        f"--checkpoint {adapter} is a LoRA adapter, not a model: pass --adapter {adapter} and the model it was "
        f"trained on as --checkpoint")
    assert fails_unchanged(tmp_path, "eval", "--checkpoint", str(run), *eval_args) == (
        f"--checkpoint {run} is a LoRA run or checkpoint, not a model: pass --adapter {run} --checkpoint {checkpoint}")
    sft_output = tmp_path / "sft-out"  # an SFT output directory: its config and the model it wrote
    shutil.copytree(checkpoint, sft_output / "model")
    (sft_output / "config.json").write_text("{}")
    assert fails_unchanged(tmp_path, "train", *toy_args(sft_output, tmp_path / "runs")) == (
        f"--checkpoint {sft_output} is not a model but holds one: pass --checkpoint {sft_output / 'model'}")
    shutil.rmtree(run / CHECKPOINTS)
    assert fails_unchanged(tmp_path, "eval", "--checkpoint", str(run), *eval_args) == (
        f"--checkpoint {run} is a run directory with no model or adapter saved in it: pass a model directory")


@pytest.mark.parametrize("subcommand", ["train", "dry-run"])
def test_unwritable_output_dir_is_refused_up_front(checkpoint, tmp_path, subcommand):
    extra = ["--dry-run"] if subcommand == "dry-run" else []
    message = fails("train", *toy_args(checkpoint, Path("/proc/no-runs-here")), *extra)
    assert message.startswith("run directory /proc/no-runs-here/toy-") and "is not writable (" in message
    assert message.endswith("in /proc); choose another --output-dir or make /proc writable")
    (tmp_path / "a-file").write_text("")
    message = fails_unchanged(tmp_path, "train", *toy_args(checkpoint, tmp_path / "a-file" / "runs"), *extra)
    assert f"cannot be created: {tmp_path / 'a-file'} is a file, not a directory" in message


def test_free_space_for_a_checkpoint_is_checked(tmp_path):
    with pytest.raises(OSError, match=r"run directory .*/runs/x needs about 931322574.62 GiB free for a checkpoint, "
                                      r"but .* has [\d.]+ GiB free; free space or choose an --output-dir"):
        check_output_space(tmp_path / "runs" / "x", 10**18, "run directory")
    assert list(tmp_path.iterdir()) == []


class FullDisk:
    """A policy whose adapter cannot be written: the disk is full."""

    def save_adapter(self, directory: Path) -> None:
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(run):
    before = tree(run)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(OSError) as error:
        save_checkpoint(run, 2, FullDisk(), optimizer, scheduler, {}, [], {}, keep_last=1)
    assert str(error.value) == (f"writing checkpoint {run / CHECKPOINTS / 'iter_000002'} failed ([Errno 28] No "
                                f"space left on device); make room on {run / CHECKPOINTS} (or check the disk) and "
                                f"continue with --resume {run}, which starts from the newest complete checkpoint")
    assert tree(run) == before  # no half-written checkpoint, the older one not pruned


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_directory(checkpoint, tmp_path):
    message = fails_unchanged(tmp_path, "train", *toy_args(checkpoint, tmp_path / "runs"), "--skip-grad-norm",
                              "1e-12", "--max-skipped-in-a-row", "1", "--iterations", "3", "--save-every", "3")
    assert message == ("the last 1 optimizer steps in a row were skipped (gradient norm not finite or above "
                       "--skip-grad-norm 1e-12, or the step made trained weights non-finite): the run diverged at "
                       "iteration 1. Start a new run from the same --checkpoint with a lower --lr (now 1e-05), or "
                       "raise --max-skipped-in-a-row")


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--clip-high", "inf"),
                                         ("--temperature", "nan"), ("--kl-coef", "-inf")])
def test_non_finite_hyper_parameters_are_refused(checkpoint, tmp_path, flag, value):
    message = fails_unchanged(tmp_path, "train", *toy_args(checkpoint, tmp_path / "runs"), flag, value)
    assert message == f"{flag} must be a finite number, got {float(value)}"


def test_a_learning_rate_above_one_is_refused(checkpoint, tmp_path):
    message = fails_unchanged(tmp_path, "train", *toy_args(checkpoint, tmp_path / "runs"), "--lr", "1e39")
    assert message == "--lr must be <= 1 (an AdamW step moves each weight by about lr; LIBERO GRPO uses 1e-6..1e-4), " \
                      "got 1e+39"


def test_a_step_that_makes_weights_non_finite_is_undone_counted_and_stops_the_run(checkpoint, tmp_path):
    trainer = GRPOTrainer(parse_command(["train", *toy_args(checkpoint, tmp_path, "--iterations", "3",
                                                            "--max-skipped-in-a-row", "2")]))
    initial = [p.detach().clone() for p in trainer.params]

    def overflow(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """What an overflowing step does: a trained weight becomes inf (after AdamW has updated its state)."""
        with torch.no_grad():
            trainer.params[-1][0, 0] = float("inf")

    trainer.optimizer.register_step_post_hook(overflow)
    with pytest.raises(UserError, match="the last 2 optimizer steps in a row were skipped .* the run diverged at "
                                        "iteration 2. Start a new run from --adapter .*iter_000002 with a lower "
                                        r"--lr \(now 1e-05\), or raise --max-skipped-in-a-row"):
        trainer.train()
    trainer.close()
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, initial))  # weights restored
    assert not trainer.optimizer.state  # and the optimizer state: as before its first step
    rows = read_metrics(trainer.run_dir)
    assert [(row["train/optimizer_steps"], row["train/skipped_steps"]) for row in rows] == [(0, 1), (0, 1)]
    assert rows[-1]["train/skipped_steps_total"] == 2


def test_resume_drops_a_torn_last_metrics_line(run, capsys):
    with (run / METRICS_FILE).open("a") as f:
        f.write('{"time": 17, "iteration": 2, "rollout/succ')  # the power went out mid-line
    main(["train", "--resume", str(run), "--iterations", "2"])
    assert f"{run / METRICS_FILE}: dropped its torn last line" in capsys.readouterr().out
    assert [row["iteration"] for row in read_metrics(run)] == [1, 2]


def test_a_damaged_metrics_line_before_the_last_is_named(run, tmp_path):
    lines = (run / METRICS_FILE).read_text()
    (run / METRICS_FILE).write_text("{not json\n" + lines)
    message = fails_unchanged(tmp_path, "plot", str(run))
    assert message.startswith(f"{run / METRICS_FILE} line 1 is not JSON (") and message.endswith(
        "delete or repair that line")


def test_lost_resets_are_counted(checkpoint, tmp_path):
    trainer = GRPOTrainer(parse_command(["train", *toy_args(checkpoint, tmp_path)]))
    trainer.env.lost_resets = 3  # as if three workers had died while their scenes were built
    trainer.train()
    trainer.close()
    assert read_metrics(trainer.run_dir)[0]["rollout/lost_resets"] == 0  # counted per iteration, not since start
    from trainer.rollout import collect_groups

    class LosingEnv(type(trainer.env)):
        def reset(self, specs, envs=None, wait=True):
            self.lost_resets += 1
            return super().reset(specs, envs, wait)

    env = LosingEnv(num_envs=4, num_init_states=1000)
    _, counts = collect_groups(env, trainer.policy, trainer.sampler, trainer.inputs, 2, 2, 1.0,
                               dynamic_sampling=False, max_refill_rounds=0)
    assert counts["lost_resets"] == env.lost_resets > 0


@pytest.mark.parametrize("case", [
    "config-not-yaml", "config-missing", "resume-no-config", "lora-dropout", "max-seconds", "num-envs",
    "adapter-missing", "checkpoint-config-not-json", "weight-decay", "eval-trials", "eval-temperature-inf",
    "plot-no-metrics", "optimizer-truncated", "trainer-state-garbled", "resume-finetune", "sft-no-demos",
    "demo-lr-nan", "device", "flash-attn-missing", "plot-unwritable", "base-quant-fp8-cpu", "base-quant-full",
    "eval-adapter-of-another-base-quant", "eval-seed", "compile-layers-full", "compare-no-results",
])
def test_more_bad_inputs(case, checkpoint, run, model_copy, tmp_path):
    runs = tmp_path / "new-runs"
    optimizer_file = run / CHECKPOINTS / "iter_000001" / "optimizer.pt"
    state_file = run / CHECKPOINTS / "iter_000001" / "trainer_state.json"
    if case == "config-not-yaml":
        (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    if case == "checkpoint-config-not-json":
        (model_copy / "config.json").write_text("{")
    if case == "optimizer-truncated":
        optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    if case == "trainer-state-garbled":
        state_file.write_text("{")
    args, expected = {
        "config-not-yaml": (["train", "--config", str(tmp_path / "bad.yaml")],
                            f"config file {tmp_path / 'bad.yaml'} is not valid YAML ("),
        "config-missing": (["train", "--config", str(tmp_path / "nope.yaml")],
                           f"config file {tmp_path / 'nope.yaml'} does not exist"),
        "resume-no-config": (["train", "--resume", str(tmp_path)], f"--resume {tmp_path}: no config.json there"),
        "lora-dropout": (["train", *toy_args(checkpoint, runs), "--lora-dropout", "1.5"],
                         "--lora-dropout must be in [0, 1), got 1.5"),
        "max-seconds": (["train", *toy_args(checkpoint, runs), "--max-seconds", "-1"],
                        "--max-seconds must be >= 0, got -1.0"),
        "num-envs": (["train", *toy_args(checkpoint, runs), "--num-envs", "0"], "--num-envs must be >= 1, got 0"),
        "adapter-missing": (["train", *toy_args(checkpoint, runs), "--adapter", str(tmp_path / "none")],
                            f"adapter {tmp_path / 'none'} does not exist"),
        "checkpoint-config-not-json": (["train", *toy_args(model_copy, runs)],
                                       f"{model_copy / 'config.json'} is not valid JSON"),
        "weight-decay": (["train", *toy_args(checkpoint, runs), "--weight-decay", "-0.1"],
                         "--weight-decay must be >= 0, got -0.1"),
        "eval-trials": (["eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--trials-per-task", "0",
                         "--output-dir", str(runs)], "--trials-per-task must be in 1..1000, got 0"),
        "eval-seed": (["eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--seed", "-1",
                       "--output-dir", str(runs)], "--seed must be >= 0 (it also picks the scenes), got -1"),
        "eval-temperature-inf": (["eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--temperature",
                                  "inf", "--output-dir", str(runs)], "--temperature must be a finite number, got inf"),
        "plot-no-metrics": (["plot", str(tmp_path)], f"{tmp_path / METRICS_FILE} does not exist"),
        "compare-no-results": (["compare", str(run), str(tmp_path)],
                               f"{run} holds no results.json: give the results directory an eval printed"),
        "optimizer-truncated": (["train", "--resume", str(run), "--iterations", "2"],
                                f"{optimizer_file} is truncated or damaged ("),
        "trainer-state-garbled": (["train", "--resume", str(run), "--iterations", "2"],
                                  f"{state_file} is not valid JSON"),
        "sft-no-demos": (["sft", "--demos", str(tmp_path / "demos"), "--output-dir", str(runs), "--checkpoint",
                          str(checkpoint)], f"demo directory {tmp_path / 'demos'} does not exist; collect demos"),
        "demo-lr-nan": (["demo", "--lr", "nan", "--output-dir", str(runs)], "--lr must be a finite number, got nan"),
        "device": (["eval", "--checkpoint", str(checkpoint), "--task-suite", "toy", "--device", "gpu0",
                    "--output-dir", str(runs)], "--device 'gpu0' is not a torch device ("),
        "flash-attn-missing": (["train", *toy_args(checkpoint, runs), "--attn-implementation", "flash_attention_2"],
                               "--attn-implementation flash_attention_2 needs the flash-attn package"),
        "eval-adapter-of-another-base-quant": (
            ["eval", "--checkpoint", str(checkpoint), "--adapter", str(run), "--task-suite", "toy", "--base-quant",
             "int8", "--output-dir", str(runs)],
            f"adapter {run / CHECKPOINTS / 'iter_000001' / 'adapter'} was trained on a base with --base-quant = none"),
        "base-quant-fp8-cpu": (["train", *toy_args(checkpoint, runs), "--device", "cpu", "--base-quant", "fp8"],
                               "--base-quant fp8 needs a CUDA GPU with FP8 (compute capability 8.9+"),
        "base-quant-full": (["train", *toy_args(checkpoint, runs), "--finetune", "full", "--kl-coef", "0",
                             "--base-quant", "nf4"], "--base-quant nf4 stores a frozen quantized base, which "
                            "--finetune full would train: use --finetune lora, or --base-quant none"),
        "compile-layers-full": (["train", *toy_args(checkpoint, runs), "--finetune", "full", "--kl-coef", "0",
                                 "--compile-layers"], "--compile-layers is for LoRA fine-tuning: use --finetune lora, "
                                "or drop --compile-layers"),
        "plot-unwritable": (["plot", str(run), "--output", "/proc/no-such-dir/curves.png"],
                            "cannot write the plot to /proc/no-such-dir/curves.png ("),
        "resume-finetune": (["train", "--resume", str(run), "--finetune", "full", "--kl-coef", "0"],
                            f"{run / CHECKPOINTS / 'iter_000001'} has no model/: the run was trained with "
                            f"--finetune lora"),
    }[case]
    assert fails_unchanged(tmp_path, *args).startswith(expected)


def test_one_line_on_stderr_exit_1_and_traceback_on_request(model_copy, tmp_path):
    (model_copy / "model-00001-of-00004.safetensors").write_bytes(b"")
    command = [sys.executable, str(REPO / "OpenVLA_GRPO.py"), "train", *toy_args(model_copy, tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop(TRACEBACK_ENV, None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"{PREFIX}{model_copy / 'model-00001-of-00004.safetensors'} is not a readable")
    traced = subprocess.run([*command, "--traceback"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr
    assert "SafetensorError" in traced.stderr and not (tmp_path / "runs").exists()
    transfer = subprocess.run([sys.executable, "-m", "scripts.transfer", "unpack", "--parts-dir",
                               str(tmp_path / "none"), "--dest", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert transfer.returncode == 1 and len(transfer.stderr.strip().splitlines()) == 1
    assert transfer.stderr.startswith("transfer.py: error: ")
