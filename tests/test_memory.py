"""trainer/memory.py: the predicted GPU memory of an iteration by hand on a small shape, and against every peak the
7B benchmarks recorded (the bench curves it is fitted to, the real trainer's peaks it predicts), within 10 %."""

import json
from pathlib import Path

import pytest

from OpenVLA_GRPO import parse_command
from trainer.memory import (FIRST_RESET_SECONDS, FUSED_UNCHECKPOINTED_ACTIVATIONS, GIB, KV_SLOT_MULTIPLE, PI_OLD_SHARE,
                            ROLLOUT_ACTIVATIONS, SECONDS_PER_QUERY, SECONDS_PER_SAMPLE,
                            SIMULATOR_ACTIONS_PER_S_PER_ENV, UNCHECKPOINTED_ACTIVATIONS, UPDATE_ACTIVATIONS, ModelShape,
                            check_fits, checkpoint_shape, iteration_seconds, model_shape, predict,
                            rollout_bytes_per_sample, update_bytes_per_sample)
from vla_actor import LoraSettings
from vla_actor.openvla_7b import openvla_7b_config

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_per_sample_bytes_by_hand():
    shape = ModelShape(frozen_parameters=0, lora_parameters=0, layers=2, hidden=8, kv_hidden=4, mlp=16, oft=False,
                       images=1, proprio=False, dtype_bytes=2)
    prompt = shape.prompt_tokens  # 32 + 256
    slots = -(-(prompt + 6) // KV_SLOT_MULTIPLE) * KV_SLOT_MULTIPLE
    assert rollout_bytes_per_sample(shape) == pytest.approx(ROLLOUT_ACTIVATIONS * prompt * 16 * 2
                                                            + 2 * 2 * 4 * slots * 2)
    tokens = prompt + 7
    assert update_bytes_per_sample(shape, True) == pytest.approx(2 * tokens * 8 * 2
                                                                 + UPDATE_ACTIVATIONS * tokens * 16 * 2)
    assert update_bytes_per_sample(shape, False) == pytest.approx(2 * UNCHECKPOINTED_ACTIVATIONS * tokens * 16 * 2)
    assert update_bytes_per_sample(shape, False, fused=True) == pytest.approx(
        2 * FUSED_UNCHECKPOINTED_ACTIVATIONS * tokens * 16 * 2)


def shape_7b(tmp_path: Path, variant: str, images: int, proprio: bool) -> ModelShape:
    directory = tmp_path / f"{variant}-{images}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(openvla_7b_config(variant, images, proprio)))
    return model_shape(directory, LoraSettings(rank=16, alpha=16), dtype_bytes=2)


def train_config(num_envs: int, micro_batch: int, *flags: str):
    return parse_command(["train", "--num-envs", str(num_envs), "--micro-batch-size", str(micro_batch), *flags])


def test_predictions_are_within_ten_percent_of_every_recorded_7b_peak(tmp_path):
    openvla = shape_7b(tmp_path, "openvla", 1, False)
    assert openvla.frozen_parameters == 7_541_237_184 and openvla.lora_parameters == 39_976_960
    oft = shape_7b(tmp_path, "oft", 2, True)
    bench = json.loads((RESULTS / "gpu_7b.json").read_text())
    cases = [(openvla, int(b), 1, point["peak_gib"], "rollout") for b, point in bench["rollout_curve"].items() if point]
    cases += [(openvla, 1, int(m), point["peak_gib"], "update") for m, point in bench["update_curve"].items()]
    cases.append((openvla, bench["iteration_batch"], bench["update_micro_batch"], bench["peak_gib_iteration"], "peak"))
    micro = json.loads((RESULTS / "gpu_7b_micro_batches.json").read_text())  # micro-batches up to 48, one run
    cases += [(openvla, 1, int(m), point["peak_gib"], "update") for m, point in micro["update_curve"].items()]
    cases.append((openvla, micro["iteration_batch"], micro["update_micro_batch"], micro["peak_gib_iteration"], "peak"))
    e2e = json.loads((RESULTS / "gpu_7b_e2e.json").read_text())
    cases.append((openvla, e2e["num_envs"], 16, e2e["peak_gib"], "peak"))
    cases.append((oft, e2e["num_envs"], 8, e2e["oft_peak_gib"], "peak"))
    steady = json.loads((RESULTS / "gpu_7b_e2e_oft_steady.json").read_text())
    cases.append((oft, steady["num_envs"], 8, steady["oft_peak_gib"], "peak"))
    oft_run = json.loads((RESULTS / "gpu_7b_e2e_oft.json").read_text())
    cases.append((oft, oft_run["num_envs"], 8, oft_run["oft_peak_gib"], "peak"))
    for name in ("gpu_7b_e2e_oft_vision_graph", "gpu_7b_e2e_oft_fused", "gpu_7b_e2e_oft_fused_overlap"):
        run = json.loads((RESULTS / f"{name}.json").read_text())  # vision graph kept through the update, Liger
        cases.append((oft, run["num_envs"], 8, run["oft_peak_gib"], "peak"))
    for name in ("gpu_7b_e2e_openvla60", "gpu_7b_e2e_openvla220", "gpu_7b_e2e_prefill_graph"):
        openvla_run = json.loads((RESULTS / f"{name}.json").read_text())
        cases.append((openvla, openvla_run["num_envs"], 16, openvla_run["peak_gib"], "peak"))
        if "peak_gib_baseline" in openvla_run:  # main, in the same run
            cases.append((openvla, openvla_run["num_envs"], 16, openvla_run["peak_gib_baseline"], "peak"))
    oft_run = json.loads((RESULTS / "gpu_7b_e2e_oft_rope_lora.json").read_text())  # RoPE and LoRA fused too
    cases.append((oft, oft_run["num_envs"], 8, oft_run["oft_peak_gib"], "peak"))
    unchecked = json.loads((RESULTS / "gpu_7b_no_checkpointing.json").read_text())["update_curve_no_checkpointing"]
    cases += [(openvla, 1, int(m), point["peak_gib"], "update_unchecked") for m, point in unchecked.items() if point]
    graphed = json.loads((RESULTS / "gpu_7b_e2e_openvla_graphed_update.json").read_text())  # fused, down recomputed
    cases.append((openvla, graphed["num_envs"], 4, graphed["peak_gib"], "peak_unchecked_fused"))
    cases.append((openvla, graphed["num_envs"], 16, graphed["peak_gib_baseline"], "peak"))
    for shape, num_envs, micro_batch, measured, part in cases:
        flags = ["--no-gradient-checkpointing"] if "unchecked" in part else []
        prediction = predict(train_config(num_envs, micro_batch, *flags), shape, "NVIDIA H200",
                             fused=part.endswith("fused"))
        predicted = {"rollout": prediction.rollout_gib, "update": prediction.update_gib,
                     "update_unchecked": prediction.update_gib, "peak": prediction.peak_gib,
                     "peak_unchecked_fused": prediction.peak_gib}[part]
        assert abs(predicted / measured - 1) < 0.10, (part, num_envs, micro_batch, predicted, measured)


def test_the_fused_factor_is_counted_where_build_policy_would_fuse(tmp_path, monkeypatch):
    """Without checkpointing, an update's activations are counted with the fused kernels' factor exactly where
    build_policy swaps them in (liger-kernel installed, --fused-kernels, no --compile-layers)."""
    monkeypatch.setattr("trainer.memory.fused_kernels_available", lambda: True)
    shape = shape_7b(tmp_path, "openvla", 1, False)
    unchecked = ("--no-gradient-checkpointing",)

    def update_gib(*flags: str) -> float:
        return predict(train_config(16, 4, *unchecked, *flags), shape, "NVIDIA H100").update_gib

    assert update_gib() == pytest.approx(predict(train_config(16, 4, *unchecked), shape, "NVIDIA H100",
                                                 fused=True).update_gib)
    assert update_gib("--no-fused-kernels") == pytest.approx(predict(train_config(16, 4, *unchecked), shape,
                                                                     "NVIDIA H100", fused=False).update_gib)
    unfused_compiled = predict(train_config(16, 4, *unchecked, "--compile-layers"), shape, "NVIDIA H100", fused=False)
    assert update_gib("--compile-layers") == pytest.approx(unfused_compiled.update_gib)
    assert update_gib() < update_gib("--no-fused-kernels")


def test_overlapped_halves_are_counted_as_one_half_per_query(tmp_path):
    """With --overlap-rollouts a query holds the envs of one half (the larger of an odd number), so 32 envs in halves
    need the rollout memory of 16 envs and 15 that of 8; OFT on CUDA overlaps by default, the token head does not."""
    openvla, oft = shape_7b(tmp_path, "openvla", 1, False), shape_7b(tmp_path, "oft", 2, True)

    def rollout_gib(shape, num_envs, *flags):
        return predict(train_config(num_envs, 16, *flags), shape, "NVIDIA H200").rollout_gib

    assert rollout_gib(openvla, 32, "--overlap-rollouts", "on") == rollout_gib(openvla, 16)
    assert rollout_gib(openvla, 15, "--overlap-rollouts", "on") == rollout_gib(openvla, 8)
    assert rollout_gib(openvla, 16) > rollout_gib(openvla, 8)
    assert rollout_gib(oft, 15) == rollout_gib(oft, 8, "--overlap-rollouts", "off")
    assert rollout_gib(oft, 16, "--overlap-rollouts", "off") > rollout_gib(oft, 16)


def test_compiled_blocks_are_counted_and_their_batch_that_did_not_fit_is_refused(tmp_path):
    """--compile-layers holds more activations (fitted to gpu_7b_compiled.json's batch 16 and micro-batch 16); the
    same run's compiled batch 32 did not fit 24 GiB, which the prediction must say too."""
    directory = tmp_path / "openvla-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(openvla_7b_config()))
    run = json.loads((RESULTS / "gpu_7b_compiled.json").read_text())
    assert run["compiled"]["rollout_curve"]["32"] is None and run["mem_cap_gib"] == 24.0

    def prediction(*flags):
        config = parse_command(["train", "--checkpoint", str(directory), *flags])
        return predict(config, checkpoint_shape(config), "NVIDIA H100 80GB HBM3")

    measured = {"rollout": run["compiled"]["rollout_curve"]["16"]["peak_gib"],
                "update": run["compiled"]["update_peak_gib"]}
    compiled = prediction("--compile-layers", "--num-envs", "16", "--micro-batch-size", "16")
    assert abs(compiled.rollout_gib / measured["rollout"] - 1) < 0.10
    assert abs(compiled.update_gib / measured["update"] - 1) < 0.10
    eager = prediction("--num-envs", "16", "--micro-batch-size", "16")
    assert compiled.rollout_gib - eager.rollout_gib == pytest.approx(
        measured["rollout"] - run["rollout_curve"]["16"]["peak_gib"], abs=0.1)
    assert prediction("--compile-layers", "--num-envs", "32").rollout_gib > 24.0
    assert prediction("--num-envs", "32").rollout_gib < 24.0  # eager batch 32 fits, as measured (21.0 GiB)
    config = parse_command(["train", "--checkpoint", str(directory), "--compile-layers", "--num-envs", "32"])
    with pytest.raises(ValueError, match=r"lower --num-envs \(now 32\) or turn --compile-layers off$"):
        check_fits(config, checkpoint_shape(config), "NVIDIA GeForce RTX 4090", 24.0)
    config = parse_command(["train", "--checkpoint", str(directory), "--compile-layers", "--no-gradient-checkpointing",
                            "--micro-batch-size", "4"])
    with pytest.raises(ValueError, match=r"lower --micro-batch-size \(now 4\) or turn --gradient-checkpointing on "
                                         r"or turn --compile-layers off$"):
        check_fits(config, checkpoint_shape(config), "NVIDIA GeForce RTX 4090", 24.0)


def test_a_configuration_predicted_not_to_fit_is_refused_naming_the_flag(tmp_path):
    directory = tmp_path / "openvla-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(openvla_7b_config()))
    config = parse_command(["train", "--checkpoint", str(directory), "--num-envs", "64"])
    with pytest.raises(ValueError, match=r"predicted to need 2\d\.\d GiB .* 24\.0 GiB: lower --num-envs \(now 64\)"):
        check_fits(config, checkpoint_shape(config), "NVIDIA GeForce RTX 4090", 24.0)
    config = parse_command(["train", "--checkpoint", str(directory), "--num-envs", "16"])
    fits = check_fits(config, checkpoint_shape(config), "NVIDIA GeForce RTX 4090", 24.0)
    assert fits.peak_gib < 24 and fits.iteration_seconds > 0
    assert "4090" in fits.summary() and "an estimate" in fits.summary()
    assert fits.peak_gib * GIB > 15e9  # the bf16 weights alone
    quantized = parse_command(["train", "--checkpoint", str(directory), "--num-envs", "64", "--base-quant", "int8"])
    assert check_fits(quantized, checkpoint_shape(quantized), "NVIDIA GeForce RTX 4090", 24.0).peak_gib < 24


def test_iteration_time_is_queries_and_steps_plus_one_blocking_first_reset(tmp_path):
    """Refilled rollouts block on their first reset only; the update pays a recomputed pi_old on every mini-batch
    but the first (the token head in bf16): 128 episodes of 220 steps are 110 mini-batches of 256; an H200
    (989 TFLOP/s) is 989 / 165 times a 4090's GPU seconds. With LoRA dropout the first mini-batch's gradient pass
    cannot give pi_old, so every step is recomputed. An update without gradient checkpointing gets no estimate."""
    directory = tmp_path / "openvla-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(openvla_7b_config()))

    def seconds(groups, *flags, card="NVIDIA H200"):
        config = parse_command(["train", "--checkpoint", str(directory), "--num-envs", "16",
                                "--groups-per-iteration", str(groups), "--group-size", "8", "--ppo-epochs", "1",
                                "--mini-batch-size", "256", *flags])
        return iteration_seconds(config, checkpoint_shape(config), card)

    def simulators(groups):
        return groups * 8 * 220 / (SIMULATOR_ACTIONS_PER_S_PER_ENV * 16) + FIRST_RESET_SECONDS

    steps = 16 * 8 * 220
    gpu_h200 = seconds(16) - simulators(16)
    assert gpu_h200 == pytest.approx(steps * (SECONDS_PER_QUERY["openvla"]
                                              + SECONDS_PER_SAMPLE["openvla"] * (1 + PI_OLD_SHARE * 109 / 110)))
    assert seconds(16, card="NVIDIA GeForce RTX 4090") == pytest.approx(gpu_h200 * 989 / 165 + simulators(16))
    rollout_pi_old = seconds(16, "--old-log-probs", "rollout") - simulators(16)
    assert rollout_pi_old == pytest.approx(steps * (SECONDS_PER_QUERY["openvla"] + SECONDS_PER_SAMPLE["openvla"]))
    # one mini-batch of 1,760 steps: its gradient pass gives pi_old, nothing is recomputed
    assert seconds(1, "--mini-batch-size", "2048") - simulators(1) == pytest.approx(rollout_pi_old / 16)
    every_step = steps * (SECONDS_PER_QUERY["openvla"] + SECONDS_PER_SAMPLE["openvla"] * (1 + PI_OLD_SHARE))
    assert seconds(16, "--lora-dropout", "0.1") - simulators(16) == pytest.approx(every_step)
    # an update without checkpointing was timed in the microbenchmark only: no estimate rather than a wrong one
    assert seconds(16, "--no-gradient-checkpointing", "--micro-batch-size", "4") is None


def test_a_quantized_base_is_counted_in_its_storage_and_makes_the_7b_fit_16_gib(tmp_path):
    directory = tmp_path / "openvla-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(openvla_7b_config()))

    def config(mode, *flags):
        return parse_command(["train", "--checkpoint", str(directory), "--base-quant", mode, *flags])

    shapes = {mode: checkpoint_shape(config(mode)) for mode in ("none", "int8", "fp8", "fp8-dynamic", "nf4")}

    # 32 decoder layers of q, k, v, o [4096 x 4096] and gate, up [11008 x 4096], down [4096 x 11008]
    layers, small, large = 32, 4096 * 4096, 11008 * 4096
    rows = 4 * 4096 + 2 * 11008 + 4096

    def nf4(weights):  # 4-bit codes, an int8 scale per 64, a bf16 scale per 256 of those, the mean, 16 codes
        return weights // 2 + weights // 64 + (weights // 64 // 256 + 17) * 2

    expected = {"int8": layers * ((4 * small + 3 * large) + rows * 5),
                "fp8": layers * ((4 * small + 3 * large) + rows * 4),
                "fp8-dynamic": layers * ((4 * small + 3 * large) + rows * 4),
                "nf4": layers * (4 * nf4(small) + 3 * nf4(large))}
    bf16 = predict(config("none"), shapes["none"], "NVIDIA H200")
    for mode, stored in expected.items():
        shape = shapes[mode]
        assert shape.quantized_parameters == layers * (4 * small + 3 * large) and shape.quantized_bytes == stored
        assert shape.largest_quantized == large
        prediction = predict(config(mode), shape, "NVIDIA H200")
        saved = (shape.quantized_parameters * 2 - stored) / GIB
        assert prediction.resident_gib == pytest.approx(bf16.resident_gib - saved)
        assert prediction.rollout_gib == pytest.approx(bf16.rollout_gib - saved + 2 * large * 2 / GIB)
        assert prediction.iteration_seconds is None and "bf16 bases" in prediction.summary()  # not timed yet
    for name in ("gpu_7b_quant.json", "gpu_7b_quant_fp8.json", "gpu_7b_quant_8bit.json",  # bf16 and quantized bases
                 "gpu_7b_fp8_dynamic.json"):
        for mode, measured in json.loads((RESULTS / name).read_text())["modes"].items():
            shape = "none" if mode == "bf16" else mode
            for batch, point in measured["rollout_curve_mem_cap"].items():
                if point is not None:
                    predicted = predict(config(shape, "--num-envs", batch), shapes[shape], "NVIDIA H200").rollout_gib
                    assert abs(predicted / point["peak_gib"] - 1) < 0.10, (name, mode, batch, predicted, point)
            flags = ("--num-envs", str(measured["iteration_batch"]), "--micro-batch-size",
                     str(measured["update_micro_batch"]))
            predicted = predict(config(shape, *flags), shapes[shape], "NVIDIA H200").peak_gib
            assert abs(predicted / measured["peak_gib_iteration"] - 1) < 0.10, (name, mode, predicted, measured)
    card = "NVIDIA GeForce RTX 4060 Ti"
    fits = check_fits(config("nf4", "--num-envs", "16"), shapes["nf4"], card, 16.0)
    assert fits.peak_gib < 15  # the goal for nf4, predicted
    with pytest.raises(ValueError, match=r"gives this process 16\.0 GiB: lower --num-envs \(now 16\)$"):
        check_fits(config("none", "--num-envs", "16"), shapes["none"], card, 16.0)
    with pytest.raises(ValueError, match=r"even 1 env and a micro-batch of 1 would need 15\.\d GiB: store the frozen "
                                         r"base in 4 bits \(--base-quant nf4\)$"):
        check_fits(config("none"), shapes["none"], "Tesla T4", 15.0)
    with pytest.raises(ValueError, match=r"would need [56]\.\d GiB: use a card with more memory$"):
        check_fits(config("nf4"), shapes["nf4"], "NVIDIA GeForce RTX 3060 Laptop GPU", 5.0)
