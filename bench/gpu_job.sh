#!/usr/bin/env bash
# Runs GPU stages (the GPU tests, the benchmarks of BENCHMARKS.md, a seed of the LIBERO experiment) in the
# background on a fresh GPU machine without network, so that a session of short calls can start them once and
# collect what has finished from later calls. Send each report call as soon as the previous one returns: the
# machine goes back after ~30 s idle and takes the running job with it (seed 4's first run was lost that way).
#
#   setsid nohup bash bench/gpu_job.sh run STAGE... > /tmp/gpu_job.log 2>&1 &   # from the repository root
#   bash bench/gpu_job.sh report OUT_DIR [WAIT_SECONDS]      # waits for the job, prints the logs, copies results
#
# A stage named bg:NAME runs in the background beside the stages after it (e.g. bg:seed1 vlagpu). Stages:
#   vlagpu     tests/test_vla_gpu.py (VLAGPU_K: a pytest -k selection, when the lease is short)
#   seed<N>    seed N of the small-VLA experiment (scripts/libero_seeds.py's recipe), packed with scripts.transfer
#   micro      bench_gpu: checkpointed update micro-batches 16 / 32 / 48
#   compile    bench_gpu --compile-layers: compiled blocks against eager in one process
#   quant8     bench_gpu --base-quant int8 fp8 against bf16
#   rollout    bench_rollout: the shipped small policy on the GPU with and without overlap, for each number of
#              simulators in ROLLOUT_ENVS ("16 32": one and two per core), ROLLOUT_EPISODES_PER_TASK (25) held-out
#              episodes of each of tasks 0-3
#   reuse      bench_gpu of this checkout and of BASELINE_TAR (a tar.xz of an older commit), alternated twice
#   e2e, e2eoft  bench_e2e (E2E_MODELS, default "openvla oft", E2E_ITERATIONS each (2), or OFT only) against
#              BASELINE_TAR, into E2E_OUTPUT (gpu_7b_e2e.json), E2E_MAX_STEPS a shorter horizon, E2E_FLAGS train
#              flags of both runs; an OpenVLA
#              iteration at horizon 220 takes ~5 minutes on an H100, the first ~1 more
#   profile    profile_gpu: a rollout query at batch 16 and 32, pi_old and an update micro-batch of 16, eager and fused
#   profilegraphs  profile_gpu, fused kernels: pi_old and the update micro-batch of 4 without gradient checkpointing,
#              replayed from the kept training graph and eagerly (profile_7b_update_graphs.json, _eager.json), and the
#              checkpointed 16 of the same code beside them (profile_7b_update_checkpointed.json)
#   e2eoverlap bench_e2e of OVERLAP_MODELS (oft) with --overlap-rollouts against the same checkout without it,
#              E2E_ITERATIONS (3) each
#   nockpt     bench_gpu --fused-kernels: the update with pi_old recomputed, checkpointed at micro-batch 16 and
#              without checkpointing at 2 / 4 / 6 / 8, and OFT 2 images + proprio at batches 16 / 32 / 64 (fused at the
#              eager best); writes the unchecked micro-batch faster by 5 % than the checkpointed one, if any
#   e2enow     bench_e2e of OpenVLA, one iteration at the full horizon, against BASELINE_TAR, this checkout with the
#              micro-batch nockpt found (if it ran and found one) without gradient checkpointing
#   fp8dyn     bench_gpu --base-quant fp8-dynamic against bf16, both with the fused kernels, everything under 24 GiB:
#              rollout batches 16 / 32 (and 64, the largest), the update at micro-batch 16 checkpointed and at 4 / 8
#              without, pi_old recomputed (gpu_7b_fp8_dynamic.json)
#   e2efp8     bench_e2e of OpenVLA, one iteration at the full horizon, --base-quant fp8-dynamic against this checkout
#              in bf16 (gpu_7b_e2e_fp8_dynamic.json)
#   profilefp8 profile_gpu of the fused fp8-dynamic base: a rollout query at batch 16, pi_old, an update micro-batch
#   e2eoftpi   bench_e2e of OFT, E2E_ITERATIONS (3) each, pi_old as auto takes it (the rollout's) against
#              --old-log-probs recompute, the same checkout, both at mini-batches of 64 (an iteration's 440 steps
#              in 6, as a 128-episode iteration's 3,520 in 13 of 256; with one mini-batch recompute costs nothing)
#              (gpu_7b_e2e_oft_rollout_pi_old.json)
#   e2ewide    bench_e2e of OpenVLA, E2E_ITERATIONS (2) each, 4 groups of 8 (32 episodes an iteration): 32 envs in two
#              overlapped halves of 16 (each half's simulators run while the other half's query is on the GPU)
#              against 16 envs without overlap, the same checkout (gpu_7b_e2e_openvla_32_envs.json); E2E_MAX_STEPS;
#              at 120 steps on an H100 a run takes ~9 minutes (iterations of ~280 and ~210 s), the stage ~18
#   e2egraphed bench_e2e of OpenVLA, E2E_ITERATIONS (2) each: the update without gradient checkpointing at micro-batch 4
#              (its stack replayed from the kept training graph) against checkpointed 16, the same checkout,
#              E2E_MAX_STEPS (gpu_7b_e2e_openvla_graphed_update.json): the trainer's own speed and peak of the bench's
#              fastest update
#   e2eoftunchecked  bench_e2e of OFT, E2E_ITERATIONS (3) each: the update without gradient checkpointing at
#              micro-batch 2 (graphed) against checkpointed 8, the same checkout (gpu_7b_e2e_oft_unchecked.json)
#   e2esteady  bench_e2e of OpenVLA, two iterations of this checkout alone (gpu_7b_e2e_openvla_steady.json)
#   graphs     bench_gpu --fused-kernels at rollout batch 16: the update with pi_old recomputed, checkpointed at
#              micro-batch 16 and without checkpointing at 2 / 4, the Llama stack replayed from the kept training
#              graph and eagerly (gpu_7b_update_graphs.json)
#   levers     bench_gpu at rollout batch 16 and micro-batch 16: the update with the towers eager (as before they
#              replayed the rollout's vision graph) and the fused kernels (--fused-kernels), each against this run,
#              into LEVERS_OUTPUT (gpu_7b_levers.json)
# Optional inputs, used where present: .gl/*.deb (GL loader libraries), .libero_bundle/ (see
# make_libero_bundle.sh in the team's tools), .whl/*.whl (packages the machine lacks: tyro and its needs,
# simplejpeg), .whl_quant/*.whl (torchao, for quant8 and the quantized GPU tests), .baseline/baseline.tar.xz
# (BASELINE_TAR). Logs and results go to JOB_DIR (/tmp/gpu_job). One transfer carries at most 64 MiB with the
# tracked tree (~28.5 MB): .gl .libero_bundle .whl (40.0 MB) for seeds and rollout, .gl .whl .whl_quant for vlagpu,
# and .baseline (git-ignored; e.g. `git archive COMMIT -- . ':(exclude)assets' | xz > .baseline/baseline.tar.xz`,
# 1.5 MB) for the stages against a baseline.
# SEED_GRPO_SECONDS (1300) bounds a seed's GRPO so that the seed ends inside a 30-minute lease: set it to the
# device time left at launch minus ~500 s (machine start ~100, demos + model + SFT 160-211, the iteration that
# crosses the bound and the last eval ~150, packing and report calls ~50; seed 1 on the H100 machine, seed 2 on an
# H200 machine, which ended ~70 s before the lease did, seed 3 on an H200 machine whose simulators were twice as
# fast, all 16 iterations in 804 s: bench/results/libero_learning.json). Let a seed finish: the adapter export, the
# record and the pack come in the ~20 s after GRPO's last eval. Stages after a seed (`run seed4 e2eoverlap`) use
# what a fast machine leaves; the seed's pack comes back with the first report after it.
set -u
JOB_DIR=${JOB_DIR:-/tmp/gpu_job}
RESULTS=$JOB_DIR/results
BASELINE_TAR=${BASELINE_TAR:-.baseline/baseline.tar.xz}

setup() {
  mkdir -p "$RESULTS"
  if command -v nvidia-smi > /dev/null && compgen -G ".gl/*.deb" > /dev/null; then  # the bare GPU machine
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  local vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f $vendor ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
  mkdir -p /tmp/site
  [ -f .libero_bundle/site.tar.xz ] && tar -xJf .libero_bundle/site.tar.xz -C /tmp/site
  local wheels=$(ls .whl/*.whl .whl_quant/*.whl .libero_bundle/*.whl 2>/dev/null)
  [ -n "$wheels" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels > "$JOB_DIR/pip.log" 2>&1
  export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYOPENGL_PLATFORM=egl TOKENIZERS_PARALLELISM=false
  export WANDB_MODE=disabled PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__)"; echo "cores $(nproc)"
    lscpu | sed -n 's/^Model name: *//p'; } > "$RESULTS/device.txt" 2>&1
}

baseline() {  # the baseline checkout, unpacked once
  [ -d /tmp/baseline ] || { mkdir -p /tmp/baseline && tar -xJf "$BASELINE_TAR" -C /tmp/baseline; }
}

# The fastest update micro-batch without gradient checkpointing (pi_old recomputed, fused kernels) that divides
# bench_e2e's mini-batch of 256 and peaked at most 22 GiB, printed if it beats the checkpointed micro-batch 16 by 5 %.
PICK_UNCHECKPOINTED='
import json, sys
fused = json.load(open(sys.argv[1]))["fused"]
checkpointed = fused["update_curve_with_pi_old"]["16"]["samples_per_s"]
rates = {int(m): p["samples_per_s"] for m, p in fused["update_curve_no_checkpointing_with_pi_old"].items()
         if p and 256 % int(m) == 0 and p["peak_gib"] <= 22}
best = max(rates, key=rates.get, default=None)
print(best if best and rates[best] > 1.05 * checkpointed else "")'

stage() {
  local name=$1
  local bench="python3 -m bench.bench_gpu --skip-oft"
  case $name in
    vlagpu) python3 -m pytest -q -p no:cacheprovider -rA tests/test_vla_gpu.py ${VLAGPU_K:+-k "$VLAGPU_K"} ;;
    seed*)
      local seed=${name#seed} work=$JOB_DIR/ll_$name
      local lora="--lora-rank 32 --lora-alpha 32 --lora-vision --lora-projector --no-dynamic-sampling"
      python3 -m scripts.libero_learning --seed "$seed" --num-heldout 25 --tasks 0 1 2 3 --demos-per-task 3 \
        --sft-steps 1000 --workers 16 --group-size 8 --groups 16 --temperature 0.5 --grpo-lr 1.5e-4 --ppo-epochs 2 \
        --mini-batch-size 256 --eval-every 16 --grpo-iterations 16 --no-train-evals --no-sampled-evals \
        --grpo-finetune lora --heldout-evals grpo --no-eval-videos \
        "--extra-grpo=$lora --max-seconds ${SEED_GRPO_SECONDS:-1300}" \
        --work-dir "$work" --result-json "$work/record.json" --media-dir "$work/media"
      local status=$?
      python3 -m scripts.transfer pack --work-dir "$work" --out-dir "$JOB_DIR/pack_$name" --max-parts 5
      return $status ;;
    micro) $bench --rollout-batches 16 --micro-batches 16 32 48 --mini-batch 96 --seed-samples 2 \
             --output "$RESULTS/gpu_7b_micro_batches.json" ;;
    compile) $bench --compile-layers --rollout-batches 16 32 --micro-batches 16 \
               --output "$RESULTS/gpu_7b_compiled.json" ;;
    quant8) $bench --base-quant int8 fp8 --rollout-batches 16 32 --micro-batches 16 --quant-rollout-batches 16 32 64 \
              --output "$RESULTS/gpu_7b_quant8_bf16.json" --quant-output "$RESULTS/gpu_7b_quant_8bit.json" ;;
    reuse)
      baseline
      for i in 1 2; do
        $bench --rollout-batches 16 32 --micro-batches 16 --output "$RESULTS/gpu_7b_reuse$i.json"
        (cd /tmp/baseline && $bench --rollout-batches 16 32 --micro-batches 16 \
           --output "$RESULTS/gpu_7b_reuse_baseline$i.json")
      done ;;
    rollout)
      for envs in ${ROLLOUT_ENVS:-16 32}; do
        OMP_NUM_THREADS=1 python3 -m bench.bench_rollout --device cuda --num-envs "$envs" \
          --episodes-per-task "${ROLLOUT_EPISODES_PER_TASK:-25}" --modes refill_kept refill_kept_overlapped \
          --out "$RESULTS/rollout_gpu_${envs}_envs.json" || return
      done ;;
    e2e) baseline; python3 -m bench.bench_e2e --models ${E2E_MODELS:-openvla oft} --iterations "${E2E_ITERATIONS:-2}" \
           --baseline-repo /tmp/baseline --work-dir /tmp/e2e ${E2E_MAX_STEPS:+--max-steps "$E2E_MAX_STEPS"} \
           ${E2E_FLAGS:+--extra-flags="$E2E_FLAGS"} --output "$RESULTS/${E2E_OUTPUT:-gpu_7b_e2e.json}" ;;
    e2eoft) baseline; python3 -m bench.bench_e2e --models oft --baseline-repo /tmp/baseline --work-dir /tmp/e2e \
              --output "$RESULTS/gpu_7b_e2e_oft.json" ;;
    profile) python3 -m bench.profile_gpu --variants eager fused --rollout-batches 16 32 \
               --output "$RESULTS/profile_7b_fused.json" ;;
    profilegraphs)
      local fused_profile="python3 -m bench.profile_gpu --variants fused --rollout-batches 16"
      $fused_profile --no-gradient-checkpointing --micro-batch 4 --output "$RESULTS/profile_7b_update_graphs.json" &&
      $fused_profile --no-gradient-checkpointing --no-graph-update --micro-batch 4 \
        --output "$RESULTS/profile_7b_update_graphs_eager.json" &&
      $fused_profile --micro-batch 16 --output "$RESULTS/profile_7b_update_checkpointed.json" ;;
    nockpt)
      python3 -m bench.bench_gpu --rollout-batches 16 --micro-batches 16 --no-checkpoint-micro-batches 2 4 6 8 \
        --fused-kernels --mini-batch 96 --oft-setups 2img_proprio --oft-batches 16 32 64 \
        --output "$RESULTS/gpu_7b_no_checkpointing_fused.json" || return
      python3 -c "$PICK_UNCHECKPOINTED" "$RESULTS/gpu_7b_no_checkpointing_fused.json" > "$JOB_DIR/unchecked_micro" ;;
    e2enow)
      baseline
      local micro flags=""
      micro=$(cat "$JOB_DIR/unchecked_micro" 2>/dev/null)
      [ -n "$micro" ] && flags="--no-gradient-checkpointing --micro-batch-size $micro"
      echo "this checkout's flags: ${flags:-none}"
      python3 -m bench.bench_e2e --models openvla --iterations 1 --baseline-repo /tmp/baseline \
        --extra-flags="$flags" --baseline-flags="--gradient-checkpointing --micro-batch-size 16" --work-dir /tmp/e2e \
        --output "$RESULTS/${E2E_OUTPUT:-gpu_7b_e2e_now.json}" ;;
    fp8dyn) $bench --base-quant fp8-dynamic --fused-kernels --quant-mem-cap-gib 24 --rollout-batches 16 32 \
              --quant-rollout-batches 64 --micro-batches 16 --no-checkpoint-micro-batches 4 8 --mini-batch 96 \
              --output "$RESULTS/gpu_7b_fp8_dynamic_unused.json" --quant-output "$RESULTS/gpu_7b_fp8_dynamic.json" ;;
    e2efp8) python3 -m bench.bench_e2e --models openvla --iterations 1 --baseline-repo . \
              --extra-flags="--base-quant fp8-dynamic" --work-dir /tmp/e2e \
              --output "$RESULTS/${E2E_OUTPUT:-gpu_7b_e2e_fp8_dynamic.json}" ;;
    profilefp8) python3 -m bench.profile_gpu --variants fused --base-quant fp8-dynamic --rollout-batches 16 \
                  --output "$RESULTS/profile_7b_fp8_dynamic.json" ;;
    e2eoftpi) python3 -m bench.bench_e2e --models oft --iterations "${E2E_ITERATIONS:-3}" --baseline-repo . \
                --extra-flags="--mini-batch-size 64" --baseline-flags="--old-log-probs recompute" --work-dir /tmp/e2e \
                --output "$RESULTS/gpu_7b_e2e_oft_rollout_pi_old.json" ;;
    e2ewide) python3 -m bench.bench_e2e --models openvla --iterations "${E2E_ITERATIONS:-2}" --groups-per-iteration 4 \
               --baseline-repo . --extra-flags="--num-envs 32 --overlap-rollouts on" \
               --baseline-flags="--num-envs 16 --overlap-rollouts off" --work-dir /tmp/e2e \
               ${E2E_MAX_STEPS:+--max-steps "$E2E_MAX_STEPS"} --output "$RESULTS/gpu_7b_e2e_openvla_32_envs.json" ;;
    e2egraphed) python3 -m bench.bench_e2e --models openvla --iterations "${E2E_ITERATIONS:-2}" --baseline-repo . \
                  --extra-flags="--no-gradient-checkpointing --micro-batch-size 4" \
                  --baseline-flags="--gradient-checkpointing --micro-batch-size 16" --work-dir /tmp/e2e \
                  ${E2E_MAX_STEPS:+--max-steps "$E2E_MAX_STEPS"} \
                  --output "$RESULTS/gpu_7b_e2e_openvla_graphed_update.json" ;;
    graphs) $bench --rollout-batches 16 --micro-batches 16 --no-checkpoint-micro-batches 2 4 --fused-kernels \
              --mini-batch 96 --output "$RESULTS/gpu_7b_update_graphs.json" ;;
    e2eoftunchecked) python3 -m bench.bench_e2e --models oft --iterations "${E2E_ITERATIONS:-3}" --baseline-repo . \
                       --extra-flags="--no-gradient-checkpointing --micro-batch-size 2" \
                       --baseline-flags="--gradient-checkpointing --micro-batch-size 8" --work-dir /tmp/e2e \
                       --output "$RESULTS/gpu_7b_e2e_oft_unchecked.json" ;;
    e2esteady) python3 -m bench.bench_e2e --models openvla --iterations 2 --work-dir /tmp/e2e \
                 --output "$RESULTS/gpu_7b_e2e_openvla_steady.json" ;;
    levers) $bench --rollout-batches 16 --micro-batches 16 --fused-kernels \
              --output "$RESULTS/${LEVERS_OUTPUT:-gpu_7b_levers.json}" ;;
    e2eoverlap) python3 -m bench.bench_e2e --models ${OVERLAP_MODELS:-oft} --iterations "${E2E_ITERATIONS:-3}" \
                  --baseline-repo . \
                  --extra-flags="--overlap-rollouts on" --baseline-flags="--overlap-rollouts off" --work-dir /tmp/e2e \
                  --output "$RESULTS/gpu_7b_e2e_overlap.json" ;;
    *) echo "unknown stage: $name"; return 2 ;;
  esac
}

run() {
  rm -rf "$JOB_DIR" && mkdir -p "$JOB_DIR"
  setup
  for arg in "$@"; do
    if [[ $arg == bg:* ]]; then
      local name=${arg#bg:}
      ( stage "$name" > "$JOB_DIR/$name.log" 2>&1; echo $? > "$JOB_DIR/$name.rc" ) &
    else
      echo "$arg started $(date +%T)" >> "$JOB_DIR/stages.log"
      stage "$arg" > "$JOB_DIR/$arg.log" 2>&1
      echo $? > "$JOB_DIR/$arg.rc"
    fi
  done
  wait
  touch "$JOB_DIR/done"
}

report() {
  local out=$1 until=$((SECONDS + ${2:-270}))
  while [ ! -f "$JOB_DIR/done" ] && [ $SECONDS -lt $until ]; do sleep 5; done
  date +%T; cat "$RESULTS/device.txt" 2>/dev/null
  for f in "$JOB_DIR"/*.rc; do [ -f "$f" ] && echo "$(basename "$f" .rc): exit $(cat "$f")"; done
  for f in "$JOB_DIR"/*.log; do echo "---- $(basename "$f")"; tail -c "${TAIL_BYTES:-1500}" "$f"; done
  [ -f "$JOB_DIR/done" ] && echo "job done"
  # A seed's latest GRPO adapter and the running bench_e2e trainer's metrics (every finished iteration's) come back
  # with every report, so a stage cut short by the lease keeps what it measured.
  mkdir -p "$JOB_DIR/e2e_runs"
  for m in /tmp/e2e/runs/*/metrics.jsonl; do
    [ -f "$m" ] && cp "$m" "$JOB_DIR/e2e_runs/$(basename "$(dirname "$m")").metrics.jsonl"
  done
  (cd "$JOB_DIR" && tar -cJf "$out/results.tar.xz" results e2e_runs *.log *.rc \
     $(ls -d ll_seed*/record.json ll_seed*/*/metrics.jsonl ll_seed*/stage_*.json ll_seed*/grpo/evals \
             ll_seed*/grpo/checkpoints/*/adapter 2>/dev/null) 2>/dev/null)
  for pack in "$JOB_DIR"/pack_*; do
    [ -d "$pack" ] && mkdir -p "$out/$(basename "$pack")" && cp "$pack"/* "$out/$(basename "$pack")/"
  done
  ls -la "$out"
}

command=${1:-}; shift || true
case $command in
  run) run "$@" ;;
  report) report "$@" ;;
  *) echo "usage: bench/gpu_job.sh run STAGE... | report OUT_DIR [WAIT_SECONDS]" >&2; exit 2 ;;
esac
