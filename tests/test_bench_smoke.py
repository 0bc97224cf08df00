"""CPU smoke run of bench/bench_gpu.py: every code path on a tiny look-alike checkpoint (numbers are not checked;
speed is measured on the GPU, see BENCHMARKS.md)."""

import json

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
