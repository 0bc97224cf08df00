"""scripts/libero_learning.py: its evals, run for real on the toy suite (greedy on held-out and training init states,
sampled at the rollout temperature on the training ones), and its hand-over between machines."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from scripts import libero_learning
from scripts.libero_learning import (Experiment, before_after_videos, device_name, eval_protocols, evaluate,
                                     grpo_metrics, is_adapter, main, reinforcement_learning, run, success_rate)
from trainer.config import SHIPPED_SFT

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("protocol, episodes, temperature", [("heldout", 10, None), ("train", 3, None),
                                                             ("sampled", 3, 0.7)])
def test_eval_stages_take_their_split_and_temperature(checkpoint, tmp_path, monkeypatch, protocol, episodes,
                                                      temperature):
    monkeypatch.chdir(REPO)  # the stages run OpenVLA_GRPO.py from the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=2, max_steps=1, temperature=0.7,
                            train_eval_per_task=3)
    results = evaluate(experiment, f"eval_sft_{protocol}", checkpoint, protocol)
    videos = sorted(path.name for path in (results.parent / "videos").glob("*.mp4"))
    assert len(videos) == (1 if protocol == "heldout" else 0)  # only the held-out evals feed the before/after pair
    recorded = json.loads(results.read_text())
    assert recorded["overall"]["episodes"] == episodes and 0 <= success_rate(results) <= 1
    assert recorded["config"]["protocol"] == ("heldout" if protocol == "heldout" else "train")
    assert recorded["config"]["temperature"] == temperature
    assert json.loads((tmp_path / "stage_seconds.json").read_text())[f"eval_sft_{protocol}"] > 0


def test_the_evals_before_and_after_grpo_are_held_out_plus_what_is_asked():
    assert eval_protocols(Experiment()) == ("heldout", "train", "sampled")
    assert eval_protocols(Experiment(sampled_evals=False)) == ("heldout", "train")
    assert eval_protocols(Experiment(train_evals=False, sampled_evals=False)) == ("heldout",)


def test_stages_record_their_time_and_machine(tmp_path):
    run([sys.executable, "-c", "import time; time.sleep(0.2)"], "demos", tmp_path)
    run([sys.executable, "-c", "import time; time.sleep(0.2)"], "demos", tmp_path)
    assert json.loads((tmp_path / "stage_devices.json").read_text()) == {"demos": [device_name()]}
    assert json.loads((tmp_path / "stage_seconds.json").read_text())["demos"] >= 0.4  # both invocations add up


def test_a_grpo_export_brought_back_without_checkpoints_is_used_as_is(tmp_path):
    for iterations in (9, 21, 100):  # the latest by iteration, not by name
        (tmp_path / f"grpo{iterations}_export").mkdir()
    for iterations in (9, 21):
        (tmp_path / f"grpo{iterations}_export" / "config.json").write_text("{}")  # grpo100 was cut short
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), grpo_iterations=200)
    assert reinforcement_learning(experiment, tmp_path / "sft_export") == tmp_path / "grpo21_export"
    assert not (tmp_path / "stage_seconds.json").exists()  # nothing ran


def test_with_until_grpo_a_brought_back_export_is_continued_in_a_new_run(tmp_path, monkeypatch):
    (tmp_path / "grpo17_export").mkdir()
    (tmp_path / "grpo17_export" / "config.json").write_text("{}")
    commands = []

    def trainer_that_saves_after_three_iterations(command, stage, work_dir):
        commands.append(command)
        (work_dir / "grpo_from17" / "checkpoints" / "iter_000003" / "model").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(libero_learning, "run", trainer_that_saves_after_three_iterations)
    monkeypatch.setattr(libero_learning, "export_bfloat16", lambda model_dir, export_dir: export_dir)
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), grpo_iterations=200, until="grpo")
    assert reinforcement_learning(experiment, tmp_path / "sft_export") == tmp_path / "grpo20_export"
    [command] = commands
    flag = {name: command[command.index(name) + 1] for name in ("--checkpoint", "--run-name", "--iterations", "--seed")}
    assert flag == {"--checkpoint": str(tmp_path / "grpo17_export"), "--run-name": "grpo_from17",
                    "--iterations": "183", "--seed": "17"}
    assert "--resume" not in command
    reinforcement_learning(experiment, tmp_path / "sft_export")  # the continued run is now resumed from its checkpoint
    assert commands[1][commands[1].index("--resume") + 1] == str(tmp_path / "grpo_from17")


@pytest.mark.parametrize("sampled_success, grpo_runs", [(0.025, False), (0.25, True)])
def test_grpo_starts_only_from_an_sft_model_whose_sampled_rollouts_succeed_often_enough(tmp_path, monkeypatch,
                                                                                        sampled_success, grpo_runs):
    commands, evals = [], []

    def sampled_eval(ex, name, checkpoint, protocol):
        evals.append((name, checkpoint, protocol))
        results = tmp_path / name / "results.json"
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps({"overall": {"success_rate": sampled_success}}))
        return results

    monkeypatch.setattr(libero_learning, "evaluate", sampled_eval)
    monkeypatch.setattr(libero_learning, "run", lambda command, stage, work_dir: commands.append(command))
    monkeypatch.setattr(libero_learning, "export_bfloat16", lambda model_dir, export_dir: export_dir)
    monkeypatch.setattr(libero_learning, "latest_checkpoint", lambda run_dir: run_dir)
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), grpo_iterations=5, until="grpo",
                            min_start_success=0.1)
    if grpo_runs:
        reinforcement_learning(experiment, tmp_path / "sft_export")
        assert len(commands) == 1
    else:
        with pytest.raises(SystemExit, match=r"succeeds in 2\.5% of its sampled episodes .* below --min-start-success "
                                             r"0\.1, .* train SFT longer \(--sft-steps\)"):
            reinforcement_learning(experiment, tmp_path / "sft_export")
        assert commands == []
    assert evals == [("eval_sft_sampled", tmp_path / "sft_export", "sampled")]
    (tmp_path / "grpo" / "checkpoints" / "iter_000002" / "model").mkdir(parents=True)
    evals.clear()
    reinforcement_learning(experiment, tmp_path / "sft_export")  # a run resumed from its checkpoint is not checked
    assert evals == []


def test_grpo_on_two_gpus_runs_under_torchrun_with_half_of_everything_per_rank(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(libero_learning, "run", lambda command, stage, work_dir: commands.append(command))
    monkeypatch.setattr(libero_learning, "export_bfloat16", lambda model_dir, export_dir: export_dir)
    monkeypatch.setattr(libero_learning, "latest_checkpoint", lambda run_dir: run_dir)
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=32, gpus=2, groups=16,
                            mini_batch_size=256, grpo_iterations=5, until="grpo")
    reinforcement_learning(experiment, tmp_path / "sft_export")
    [command] = commands
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    flag = {name: command[command.index(name) + 1]
            for name in ("--num-envs", "--groups-per-iteration", "--mini-batch-size", "--micro-batch-size")}
    assert flag == {"--num-envs": "16", "--groups-per-iteration": "8", "--mini-batch-size": "128",
                    "--micro-batch-size": "64"}


@pytest.mark.slow
def test_grpo_on_two_ranks_runs_for_real_and_exports(checkpoint, tmp_path, monkeypatch):
    """`--gpus 2` end to end on the CPU (torchrun, gloo): full fine-tuning sharded over 2 ranks, then the export."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=2, gpus=2, group_size=4, groups=2,
                            mini_batch_size=8, temperature=1.6, grpo_iterations=2, eval_every=0, until="grpo")
    export = reinforcement_learning(experiment, checkpoint)
    assert export == tmp_path / "grpo2_export" and (export / "config.json").is_file()
    rows = grpo_metrics(tmp_path)
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all(row["rollout/episodes"] == 8 for row in rows)  # 1 group of 4 on each rank, summed


@pytest.mark.slow
def test_lora_grpo_exports_its_adapter_and_the_evals_put_it_on_the_sft_model(checkpoint, tmp_path, monkeypatch):
    """--grpo-finetune lora end to end on the CPU: GRPO trains an adapter on sft_export, the export is that adapter
    alone, and the eval of the GRPO result loads sft_export with it."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sft_export = tmp_path / "sft_export"
    shutil.copytree(checkpoint, sft_export)
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=2, group_size=4, groups=1,
                            mini_batch_size=4, temperature=1.6, grpo_iterations=1, eval_every=0, max_steps=1,
                            grpo_finetune="lora", until="grpo")
    export = reinforcement_learning(experiment, sft_export)
    assert export == tmp_path / "grpo1_export" and is_adapter(export)
    names = {path.name for path in export.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "config.json" not in names
    results = evaluate(experiment, "eval_grpo1_heldout", export, "heldout")
    model = json.loads(results.read_text())["config"]["model"]
    assert (model["checkpoint"], model["adapter"]) == (str(sft_export), str(export))


@pytest.mark.slow
def test_with_heldout_evals_grpo_one_command_trains_and_records_a_seed(checkpoint, tmp_path, monkeypatch):
    """--heldout-evals grpo end to end on the CPU: GRPO's start and final held-out evals are the before and after,
    and no eval stage runs."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    shutil.copytree(checkpoint, tmp_path / "sft_export")
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=2, group_size=4, groups=1,
                            mini_batch_size=4, temperature=1.6, grpo_iterations=2, eval_every=1, max_steps=1,
                            grpo_finetune="lora", heldout_evals="grpo", train_evals=False, sampled_evals=False,
                            result_json=tmp_path / "record.json", media_dir=tmp_path / "media")
    main(experiment)
    recorded = json.loads((tmp_path / "record.json").read_text())
    curve = recorded["heldout_success_by_iteration"]
    assert list(curve) == ["0", "1", "2"] and recorded["grpo_iterations"] == 2
    assert (recorded["heldout_success_sft"], recorded["heldout_success_grpo"]) == (curve["0"], curve["2"])
    assert recorded["episodes_eval"] == 10 and recorded["dtype"] == "float32"
    paired = recorded["heldout_paired"]  # the same 10 episodes, episode by episode
    assert (paired["episodes"], paired["success_before"], paired["success_after"]) == (10, curve["0"], curve["2"])
    assert not list(tmp_path.glob("eval_*"))  # nothing played the held-out episodes again
    assert (tmp_path / "media" / "libero_learning_before.mp4").stat().st_size > 0
    assert (tmp_path / "media" / "libero_learning_after.mp4").stat().st_size > 0


def test_an_export_of_the_other_kind_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "grpo4_export").mkdir()
    (tmp_path / "grpo4_export" / "config.json").write_text("{}")
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), grpo_iterations=8, until="grpo",
                            grpo_finetune="lora")
    with pytest.raises(ValueError, match="is a whole model, so GRPO cannot continue it with --grpo-finetune lora: "
                                         "pass --grpo-finetune full"):
        reinforcement_learning(experiment, tmp_path / "sft_export")
    assert not (tmp_path / "stage_seconds.json").exists()


def test_an_adapter_brought_back_without_its_sft_model_is_refused(tmp_path):
    (tmp_path / "grpo4_export").mkdir()
    (tmp_path / "grpo4_export" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="grpo4_export is a LoRA adapter for .*sft_export, which is missing"):
        main(Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), grpo_finetune="lora"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grpo4_export"]


def test_gpus_that_do_not_divide_the_groups_are_refused():
    with pytest.raises(ValueError, match="--gpus 3 must divide --workers 16, --groups 8, --mini-batch-size 256"):
        Experiment(gpus=3)
    with pytest.raises(ValueError, match="--gpus 0: GRPO needs at least one GPU"):
        Experiment(gpus=0)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_start_bar_that_is_not_a_success_rate_is_refused(rate):
    with pytest.raises(ValueError, match=rf"--min-start-success {rate:g} is not a success rate: give one in \[0, 1\]"):
        Experiment(min_start_success=rate)


def test_grpo_metrics_count_iterations_from_the_sft_model_across_continued_runs(tmp_path):
    for run_dir, iterations in (("grpo", (0, 1, 2)), ("grpo_from2", (0, 1)), ("grpo_from12", (1,))):
        (tmp_path / run_dir).mkdir()
        (tmp_path / run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"iteration": iteration, "run": run_dir}) + "\n" for iteration in iterations))
    assert [(row["iteration"], row["run"]) for row in grpo_metrics(tmp_path)] == [
        (0, "grpo"), (1, "grpo"), (2, "grpo"), (2, "grpo_from2"), (3, "grpo_from2"), (13, "grpo_from12")]


def test_before_after_videos_show_an_episode_grpo_turned_into_a_success(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    for folder, names in ((before, ["eval_task00_init02_failure", "eval_task02_init02_failure"]),
                          (after, ["eval_task00_init02_failure", "eval_task02_init02_success"])):
        folder.mkdir()
        for name in names:
            (folder / f"{name}.mp4").write_bytes(b"")

    def videos(folder):
        return sorted(folder.glob("*.mp4"))
    assert before_after_videos(videos(before), videos(after)) == (before / "eval_task02_init02_failure.mp4",
                                                                  after / "eval_task02_init02_success.mp4")
    (after / "eval_task02_init02_success.mp4").unlink()
    assert before_after_videos(videos(before), videos(after)) == (before / "eval_task00_init02_failure.mp4",
                                                                  after / "eval_task00_init02_failure.mp4")
    assert before_after_videos(videos(before), []) == ()


def grpo_eval_row(iteration: int, rate: float) -> dict:
    """A metrics row of an iteration that ended with a held-out eval of 100 episodes."""
    return {"iteration": iteration, "env_steps": 100 * iteration, "eval/success_rate": rate,
            "eval/success_rate_ci95_low": rate - 0.1, "eval/success_rate_ci95_high": rate + 0.1, "eval/episodes": 100}


def test_with_heldout_evals_grpo_the_before_and_after_are_grpos_first_and_last_evals(tmp_path):
    from scripts.libero_learning import grpo_heldout_evals, record

    run_dir = tmp_path / "grpo"
    (run_dir / "videos").mkdir(parents=True)
    rows = [grpo_eval_row(0, 0.2), {"iteration": 1, "env_steps": 100, "rollout/success_rate": 0.25},
            {**grpo_eval_row(2, 0.3), "rollout/success_rate": 0.5}, {"iteration": 3, "env_steps": 300},
            grpo_eval_row(4, 0.45)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "config.json").write_text(json.dumps({"model": {"dtype": "auto",
                                                               "checkpoint": str(SHIPPED_SFT)}}))
    (tmp_path / "stage_devices.json").write_text(json.dumps({"grpo": ["CPU (2 cores)"]}))
    for name in ("iter000000_task00_init02_failure", "iter000002_task00_init02_success",
                 "iter000004_task00_init02_success"):
        (run_dir / "videos" / f"{name}.mp4").write_bytes(name.encode())
    experiment = Experiment(work_dir=tmp_path, tasks=(0,), heldout_evals="grpo", train_evals=False,
                            sampled_evals=False, result_json=tmp_path / "record.json", media_dir=tmp_path / "media",
                            seed=3, extra_grpo="--lora-rank 32 --max-seconds 1300 --no-dynamic-sampling")
    assert eval_protocols(experiment) == ()  # no eval stage plays the held-out episodes again
    before, after = grpo_heldout_evals(experiment, grpo_metrics(tmp_path))
    assert (before.success_rate, after.success_rate) == (0.2, 0.45) and after.ci95 == [0.35, 0.55]
    assert before.episodes == after.episodes == 100
    assert before.dtype == after.dtype == "float32"  # auto on the CPU (and the shipped model's training dtype)

    record(experiment, {}, {})
    recorded = json.loads((tmp_path / "record.json").read_text())
    assert (recorded["heldout_success_sft"], recorded["heldout_success_grpo"]) == (0.2, 0.45)
    assert recorded["episodes_eval"] == 100 and recorded["grpo_iterations"] == 4 and recorded["dtype"] == "float32"
    assert recorded["heldout_evals"] == "grpo" and "heldout_paired" not in recorded  # metrics only, no evals/
    assert recorded["heldout_success_by_iteration"] == {"0": 0.2, "2": 0.3, "4": 0.45}
    assert recorded["rollout_success_by_iteration"] == {"1": 0.25, "2": 0.5}
    recipe = recorded["recipe"]  # what the seeds share: not the seed, the machine's share or its time bound
    assert recipe["extra_grpo"] == "--lora-rank 32 --no-dynamic-sampling" and recipe["tasks"] == [0]
    assert not {"seed", "work_dir", "workers", "result_json"} & set(recipe) and recipe["grpo_lr"] == 3e-5
    assert (tmp_path / "media" / "libero_learning_before.mp4").read_bytes() == b"iter000000_task00_init02_failure"
    assert (tmp_path / "media" / "libero_learning_after.mp4").read_bytes() == b"iter000004_task00_init02_success"

    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    with pytest.raises(ValueError, match=r"evals at iterations \[0, 2\], not at 0 and at its last iteration 3"):
        grpo_heldout_evals(experiment, grpo_metrics(tmp_path))
    (tmp_path / "grpo_from3").mkdir()
    (tmp_path / "grpo_from3" / "metrics.jsonl").write_text(json.dumps(grpo_eval_row(1, 0.5)) + "\n")
    with pytest.raises(ValueError, match="continued from an export"):
        grpo_heldout_evals(experiment, grpo_metrics(tmp_path))
    with pytest.raises(ValueError, match="--eval-every 0"):
        Experiment(heldout_evals="grpo", eval_every=0)


def test_seeds_demonstrate_training_init_states_only_and_differ():
    from libero_env.suites import init_state_split
    from scripts.libero_learning import demo_init_states, grpo_seed

    train, heldout = init_state_split(50, 25)
    first = demo_init_states(Experiment(demos_per_task=3, num_heldout=25))
    assert first == train[:3]  # seed 0: the recorded runs' choice
    drawn = [demo_init_states(Experiment(demos_per_task=3, num_heldout=25, seed=s)) for s in (1, 2, 3)]
    assert all(len(d) == 3 and set(d) <= set(train) and not set(d) & set(heldout) for d in drawn)
    assert len({tuple(d) for d in [first, *drawn]}) == 4
    assert grpo_seed(Experiment(seed=2), 0) != grpo_seed(Experiment(seed=0), 2)


def test_seeds_combine_into_a_mean_lift_with_a_t_interval(tmp_path):
    from scripts.libero_seeds import Seeds, main

    paths = []
    for seed, (before, after) in enumerate([(0.20, 0.50), (0.25, 0.45), (0.15, 0.40)], start=1):
        record = {"seed": seed, "suite": "libero_spatial", "tasks": [0, 1, 2, 3], "num_heldout": 25,
                  "dtype": "float32", "grpo_finetune": "lora", "heldout_success_sft": before,
                  "heldout_success_grpo": after, "episodes_eval": 100, "grpo_iterations": 10, "device": "NVIDIA H200",
                  "wall_seconds": 1500.0,
                  "command": f"python -m scripts.libero_learning --seed {seed}",
                  "heldout_success_by_iteration": {"0": before, "10": after},
                  "rollout_success_by_iteration": {"1": before, "10": after}, "recipe": {"grpo_lr": 1.5e-4}}
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(record))
    (tmp_path / "combined.json").write_text(json.dumps({"mean_lift": -1.0, "shipped": {"seed": 3}}))
    result = main(Seeds(records=tuple(paths), output=tmp_path / "combined.json", curves=tmp_path / "curves.png"))
    written = json.loads((tmp_path / "combined.json").read_text())  # the combined record replaces its own keys
    assert written["mean_lift"] == pytest.approx(0.25) and written["shipped"] == {"seed": 3}
    # lifts 0.30, 0.20, 0.25: mean 0.25, sd 0.05, t(0.975, 2) = 4.3027 -> half width 4.3027 * 0.05 / sqrt(3)
    assert result["mean_lift"] == pytest.approx(0.25) and result["min_lift"] == pytest.approx(0.20)
    assert result["lift_ci95"] == pytest.approx([0.25 - 0.124208, 0.25 + 0.124208], abs=1e-5)
    assert [s["seed"] for s in result["seeds"]] == [1, 2, 3] and result["wall_seconds"] == 4500.0
    assert [s["lift"] for s in result["seeds"]] == pytest.approx([0.30, 0.20, 0.25])
    assert result["seeds"][0]["device"] == "NVIDIA H200"
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert result["grpo_finetune"] == "lora"
    with pytest.raises(ValueError, match="at least 2 seeds"):
        main(Seeds(records=tuple(paths[:1]), output=tmp_path / "one.json", curves=tmp_path / "one.png"))
    full = json.loads(paths[0].read_text()) | {"grpo_finetune": "full"}
    paths[0].write_text(json.dumps(full))
    with pytest.raises(ValueError, match="the records differ in grpo_finetune"):
        main(Seeds(records=tuple(paths), output=tmp_path / "mixed.json", curves=tmp_path / "mixed.png"))
    other_lr = full | {"grpo_finetune": "lora", "recipe": {"grpo_lr": 1e-4}}
    paths[0].write_text(json.dumps(other_lr))
    with pytest.raises(ValueError, match="the records differ in recipe"):
        main(Seeds(records=tuple(paths), output=tmp_path / "mixed.json", curves=tmp_path / "mixed.png"))
