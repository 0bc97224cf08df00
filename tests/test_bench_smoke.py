"""CPU smoke run of bench/bench_gpu.py: every code path on a tiny look-alike checkpoint (numbers are not checked;
speed is measured on the GPU, see BENCHMARKS.md)."""

import json
from pathlib import Path

import torch

from bench.bench_gpu import BenchConfig, main


def test_bench_gpu_code_paths_run_on_cpu(tmp_path):
    torch.set_num_threads(1)
    output = tmp_path / "gpu_7b.json"
    config = BenchConfig(model="tiny", rollout_batches=(2, 4), oft_batches=(2,), micro_batches=(2, 4), mini_batch=8,
                         seed_samples=2, repeats=1, iteration_steps=2, iteration_batch=4, output=output)
    results = main(config)
    saved = json.loads(output.read_text())
    keys = ("device", "mem_cap_gib", "rollout_actions_per_s_seed", "rollout_actions_per_s", "rollout_batch",
            "oft_actions_per_s", "update_samples_per_s_seed", "update_samples_per_s", "update_micro_batch",
            "peak_gib_iteration", "logprob_mismatch")
    assert all(key in saved for key in keys)
    assert saved == json.loads(json.dumps(results))
    assert results["rollout_batch"] in (2, 4) and results["update_micro_batch"] in (2, 4)
    assert set(saved["oft_setups"]) == {"2img_proprio", "1img"} and saved["oft_setup"] in saved["oft_setups"]
    assert results["logprob_mismatch"] < 1e-4  # float32 on the CPU: rollout and update agree


def test_bench_gpu_base_quant_runs_on_cpu(tmp_path):
    """--base-quant: bf16 and int8 in one run (each in a process of its own) on the tiny look-alike, the keys the GPU
    JSON will have."""
    torch.set_num_threads(1)
    output = tmp_path / "gpu_7b_quant.json"
    results = main(BenchConfig(model="tiny", base_quant=("int8",), rollout_batches=(2,), quant_rollout_batches=(2, 4),
                               micro_batches=(2,), mini_batch=4, repeats=1, iteration_steps=1, iteration_batch=4,
                               quant_output=output, output=tmp_path / "unused.json"))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results)) and not (tmp_path / "unused.json").exists()
    assert results["mem_cap_gib"] == 16 and set(results["modes"]) == {"bf16", "int8"}
    for mode in results["modes"].values():
        assert {"peak_gib_iteration", "rollout_actions_per_s", "update_samples_per_s", "largest_rollout_batch",
                "largest_rollout_batch_actions_per_s", "weights_gib", "build_peak_gib"} <= set(mode)
        assert mode["largest_rollout_batch"] == 4 and mode["update_micro_batch"] == 2
    assert results["modes"]["bf16"]["logprob_diff_vs_bf16"]["max"] < 1e-5  # the probe was sampled by bf16 itself
    assert 0 < results["modes"]["int8"]["logprob_diff_vs_bf16"]["max"] < 0.5


def test_bench_e2e_runs_the_real_trainer_against_a_baseline_on_cpu(tmp_path):
    """bench_e2e on a tiny OFT look-alike and the toy suite, with this checkout as its own baseline."""
    from bench.bench_e2e import E2EConfig
    from bench.bench_e2e import main as e2e_main

    output = tmp_path / "e2e.json"
    results = e2e_main(E2EConfig(model="tiny", models=("oft",), task_suite="toy", num_envs=4, group_size=2,
                                 groups_per_iteration=2, iterations=2, microbench_batch=2,
                                 baseline_repo=Path(__file__).resolve().parents[1],
                                 baseline_flags=("--old-log-probs", "rollout"),
                                 extra_flags=("--old-log-probs", "recompute"), work_dir=tmp_path, output=output))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    for suffix in ("", "_baseline"):
        assert results[f"oft_env_steps_per_s{suffix}"] > 0 and results[f"oft_iterations_measured{suffix}"] == 1
        assert set(results[f"oft_rollout_breakdown_seconds{suffix}"]) == {"model", "env_wait", "host", "first_reset"}
    assert results["max_steps"] == 4 and results["oft_rollout_logprob_mismatch"] < 1e-4
