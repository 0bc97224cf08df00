"""CPU smoke run of bench/bench_gpu.py: every code path on a tiny look-alike checkpoint (numbers are not checked;
speed is measured on the GPU, see BENCHMARKS.md)."""

import json
from pathlib import Path

import pytest
import torch

from bench.bench_gpu import BenchConfig, main


def test_bench_gpu_code_paths_run_on_cpu(tmp_path):
    torch.set_num_threads(1)
    output = tmp_path / "gpu_7b.json"
    config = BenchConfig(model="tiny", rollout_batches=(2, 4), oft_batches=(2,), micro_batches=(2, 4), mini_batch=8,
                         no_checkpoint_micro_batches=(2,), seed_samples=2, repeats=1, iteration_steps=2,
                         iteration_batch=4, output=output)
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
    assert set(saved["update_curve_no_checkpointing"]) == {"2"}


def test_bench_gpu_compile_layers_runs_on_cpu(tmp_path):
    """--compile-layers: the same policies (OpenVLA, OFT) compiled after the eager numbers ("aot_eager" keeps it
    quick on the CPU)."""
    torch.set_num_threads(1)
    # LoRA r4 with alpha 4, as tests/test_vla_lora.py's compile test: in one pytest run the second reuses the graphs
    results = main(BenchConfig(model="tiny", rollout_batches=(2,), micro_batches=(2,), mini_batch=2, seed_samples=1,
                               repeats=1, iteration_steps=1, iteration_batch=2, oft_batches=(2,), oft_setups=("1img",),
                               lora_rank=4, compile_layers=True, compile_backend="aot_eager",
                               no_checkpoint_micro_batches=(2,), output=tmp_path / "gpu_7b.json"))
    assert results["oft_setups"]["1img"]["compiled_actions_per_s"] > 0
    compiled = results["compiled"]
    assert compiled["update_micro_batch"] == 2 and compiled["rollout_batch"] == 2 and compiled["compile_warmup_s"] > 0
    assert compiled["logprob_diff_vs_eager"]["max"] < 1e-5 and compiled["pi_old_vs_update_max"] < 1e-5
    assert compiled["logprob_mismatch"] < 1e-4 and compiled["update_samples_per_s"] > 0
    assert set(compiled["update_curve_no_checkpointing_with_pi_old"]) == {"2"}
    assert set(compiled["update_curve_no_checkpointing_eager_with_pi_old"]) == {"2"}


def test_profile_gpu_code_paths_run_on_cpu(tmp_path):
    """bench/profile_gpu.py on the tiny look-alike (an fp8-dynamic base): every phase profiled, the summary and the
    tables written (no GPU timeline on the CPU: the GPU figures are zero and the idle share is null)."""
    from bench.profile_gpu import ProfileConfig
    from bench.profile_gpu import main as profile_main

    torch.set_num_threads(1)
    output = tmp_path / "profile.json"
    results = profile_main(ProfileConfig(model="tiny", rollout_batches=(2,), micro_batch=2, calls=1, warmup_calls=0,
                                         timed_calls=1, top=5, base_quant="fp8-dynamic", output=output))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    phases = results["variants"]["eager"]
    assert set(phases) == {"rollout_batch2", "pi_old_forward", "update_micro_batch"}
    for phase in phases.values():
        assert phase["wall_s_per_call"] > 0 and phase["gpu_busy_s_per_call"] == 0 and phase["gpu_idle_share"] is None
        assert len(phase["top_operators_by_host_time"]) == 5
        assert "OpenVLAModel.vision" in phase["named_phases"]
    assert {"DynamicDecoder.prefill", "DynamicDecoder.step"} <= set(phases["rollout_batch2"]["named_phases"])
    assert "== eager/update_micro_batch" in output.with_suffix(".txt").read_text()
    unchecked = profile_main(ProfileConfig(model="tiny", rollout_batches=(2,), micro_batch=2, calls=1, warmup_calls=0,
                                           timed_calls=1, top=5, gradient_checkpointing=False, output=output))
    assert unchecked["gradient_checkpointing"] is False and unchecked["graph_update"] is True
    assert unchecked["variants"]["eager"]["update_micro_batch"]["wall_s_per_call"] > 0
    with pytest.raises(SystemExit, match="is eager, fused, compiled, eager fused or eager compiled"):
        profile_main(ProfileConfig(model="tiny", variants=("eager", "fused", "compiled"), output=output))


def test_bench_gpu_base_quant_runs_on_cpu(tmp_path):
    """--base-quant: bf16, int8 and fp8-dynamic (emulated on the CPU) in one run, each in a process of its own, on
    the tiny look-alike, the keys the GPU JSON will have."""
    torch.set_num_threads(1)
    output = tmp_path / "gpu_7b_quant.json"
    results = main(BenchConfig(model="tiny", base_quant=("int8", "fp8-dynamic"), rollout_batches=(2,),
                               quant_rollout_batches=(2, 4), micro_batches=(2,), no_checkpoint_micro_batches=(2,),
                               mini_batch=4, repeats=1, iteration_steps=1, iteration_batch=4, quant_output=output,
                               output=tmp_path / "unused.json"))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results)) and not (tmp_path / "unused.json").exists()
    assert results["mem_cap_gib"] == 16 and set(results["modes"]) == {"bf16", "int8", "fp8-dynamic"}
    for mode in results["modes"].values():
        assert {"peak_gib_iteration", "rollout_actions_per_s", "update_samples_per_s", "largest_rollout_batch",
                "largest_rollout_batch_actions_per_s", "weights_gib", "build_peak_gib"} <= set(mode)
        assert mode["largest_rollout_batch"] == 4 and mode["update_micro_batch"] == 2
        assert set(mode["update_curve_with_pi_old"]) == set(mode["update_curve_no_checkpointing_with_pi_old"]) == {"2"}
    assert results["modes"]["bf16"]["logprob_diff_vs_bf16"]["max"] < 1e-5  # the probe was sampled by bf16 itself
    assert 0 < results["modes"]["int8"]["logprob_diff_vs_bf16"]["max"] < 0.5
    assert 0 < results["modes"]["fp8-dynamic"]["logprob_diff_vs_bf16"]["max"] < 0.5


def test_bench_e2e_runs_the_real_trainer_against_a_baseline_on_cpu(tmp_path):
    """bench_e2e on a tiny OFT look-alike and the toy suite, with this checkout as its own baseline; a flags value
    carrying several flags is split as a shell would."""
    from bench.bench_e2e import E2EConfig
    from bench.bench_e2e import main as e2e_main

    output = tmp_path / "e2e.json"
    results = e2e_main(E2EConfig(model="tiny", models=("oft",), task_suite="toy", num_envs=4, group_size=2,
                                 groups_per_iteration=2, iterations=2, microbench_batch=2,
                                 baseline_repo=Path(__file__).resolve().parents[1],
                                 baseline_flags=("--old-log-probs rollout",),
                                 extra_flags=("--old-log-probs", "recompute"), work_dir=tmp_path, output=output))
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert results["baseline_flags"] == ["--old-log-probs", "rollout"]
    for suffix in ("", "_baseline"):
        assert results[f"oft_env_steps_per_s{suffix}"] > 0 and results[f"oft_iterations_measured{suffix}"] == 1
        assert set(results[f"oft_rollout_breakdown_seconds{suffix}"]) == {"model", "env_wait", "host", "first_reset"}
        model_rate = results[f"oft_rollout_model_actions_per_s{suffix}"]
        assert model_rate >= results[f"oft_rollout_actions_per_s{suffix}"]  # the simulators' wait left out
        assert results[f"oft_rollout_model_share_of_microbench{suffix}"] == pytest.approx(
            model_rate / results[f"oft_microbench_actions_per_s{suffix}"])
    assert results["max_steps"] == 4 and results["oft_rollout_logprob_mismatch"] < 1e-4
    assert results["oft_rollout_logprob_mismatch"] <= results["oft_rollout_logprob_mismatch_max"] < 1e-3
    assert results["microbench_fused_kernels"] is False  # the CPU has no Liger kernels


def test_profile_trace_summary_hand_computed():
    """profile_gpu's reading of a Chrome trace, on a hand-written one of 2 calls: overlapping kernels count once
    (busy 0-15 and 20-25 us = 20 us), launches and syncs are counted per call, a sync is named by its innermost named
    range and operator, and the named ranges' host and GPU times are per call."""
    from bench.profile_gpu import CALL_LABEL, trace_summary

    def event(category, name, start, duration, tid=1):
        return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "tid": tid}

    trace = {"traceEvents": [
        event("user_annotation", CALL_LABEL, 0, 100), event("user_annotation", "GraphDecoder.prefill", 1, 40),
        event("cpu_op", "aten::to", 2, 10), event("cpu_op", "aten::copy_", 3, 8),
        event("cuda_runtime", "cudaStreamSynchronize", 4, 5), event("cuda_runtime", "cudaLaunchKernel", 20, 1),
        event("cuda_runtime", "cudaLaunchKernel", 21, 1), event("cuda_runtime", "cudaGraphLaunch", 50, 1),
        event("cuda_runtime", "cudaStreamSynchronize", 60, 2),
        event("kernel", "gemm", 0, 10, tid=7), event("kernel", "gemm", 5, 10, tid=8),
        event("gpu_memcpy", "Memcpy HtoD", 20, 5, tid=7), event("gpu_user_annotation", "GraphDecoder.prefill", 0, 15),
        {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 3},
    ]}
    summary = trace_summary(trace, calls=2, top=5)
    assert summary["gpu_busy_s_per_call"] == 10e-6 and summary["gpu_kernel_s_per_call"] == 10e-6
    assert summary["kernels_per_call"] == 1 and summary["kernel_launches_per_call"] == 1
    assert summary["graph_launches_per_call"] == 0.5
    assert summary["host_syncs_per_call"] == {"cudaStreamSynchronize": 1.0}
    assert summary["host_syncs_by_caller"] == {"GraphDecoder.prefill > aten::copy_": 0.5, "- > -": 0.5}
    assert summary["named_phases"] == {"GraphDecoder.prefill": {"cpu_ms_per_call": 0.02, "gpu_ms_per_call": 0.0075}}
    assert summary["top_kernels_by_gpu_time"] == [{"name": "gemm", "count_per_call": 1.0, "ms_per_call": 0.01}]


def test_ceilings_hand_computed():
    """bench.ceiling on a hand-sized shape at 1 FLOP/s and 1 byte/s: a prompt of 4 patches + 2 text tokens is a
    1,344-flop decoder pass (2 x 100 x 6 + causal attention 2 x 6^2 x 2), the towers 2 x 10 x 4 = 80, two decode
    steps read 2 x 200 bytes for a batch of 2; a sample of 9 tokens is 2,124 flops, an update 3 passes + the towers,
    4 + 2 towers with pi_old."""
    from bench.ceiling import CeilingConfig, Shape, ceilings

    shape = Shape(decoder_weights=100, hidden=2, layers=1, vision_weights=10, patches=4, text_tokens=2,
                  action_tokens=3)
    config = CeilingConfig(gemm_tflops=1e-12, bandwidth_tbs=1e-12, rollout_batch=2, env_steps=10,
                           env_wait_seconds=5.0)
    bounds = ceilings(shape, config)
    assert bounds["tokens_per_sample"] == 9
    assert bounds["rollout_actions_per_s"] == pytest.approx(1 / (1344 + 80 + 200))
    assert bounds["update_samples_per_s"] == pytest.approx(1 / (3 * 2124 + 80))
    assert bounds["update_samples_per_s_with_pi_old"] == pytest.approx(1 / (4 * 2124 + 160))
    assert bounds["iteration_env_steps_per_s"] == pytest.approx(10 / (10 * (1624 + 8656) + 5))
    assert bounds["iteration_env_steps_per_s_simulators_hidden"] == pytest.approx(10 / (10 * (1624 + 8656)))


def test_the_7b_shape_of_the_ceilings_is_the_released_one():
    """32 layers of 4 x 4096^2 + 3 x 4096 x 11008 decoder weights, 256 patches per image."""
    from bench.ceiling import Shape

    shape = Shape.openvla_7b()
    assert shape.decoder_weights == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert (shape.hidden, shape.layers, shape.patches, shape.action_tokens) == (4096, 32, 256, 7)
    assert 20 < shape.text_tokens < 50


def test_bench_e2e_estimates_128_episodes_with_one_first_reset_per_rollout():
    """Two steady iterations of 16 episodes of 60 steps, 50 and 54 s, their rollouts blocking 2 and 4 s on the
    first reset: 128 episodes take 8 times the rest of an iteration and one first reset, 128 * 98 / 32 + 6 / 2 s."""
    from bench.bench_e2e import summarize

    def row(seconds, first_reset):
        return {"rollout/episode_length": 60, "rollout/episodes": 16, "perf/iteration_seconds": seconds,
                "perf/rollout_seconds": 20.0, "train/steps": 960, "rollout/policy_queries": 960,
                "perf/rollout_first_reset_seconds": first_reset, "perf/gpu_memory_gib": 17.0}

    summary = summarize([row(80.0, 9.0), row(50.0, 2.0), row(54.0, 4.0)], microbench_rate=75.0)
    assert summary["iteration_seconds_128_episodes_estimate"] == pytest.approx(395.0)
    assert summary["env_steps_per_s"] == pytest.approx(1920 / 104) and summary["iterations_measured"] == 2
