#!/usr/bin/env bash
# Starts `OpenVLA_GRPO.py train` detached with nohup; every argument is passed through to it.
#
#   ./start_training.sh --checkpoint openvla/openvla-7b-finetuned-libero-spatial --task-suite libero_spatial \
#       --run-name spatial-r16
#   ./start_training.sh --resume runs/spatial-r16            # continue a stopped run from its last checkpoint
#   NPROC=4 ./start_training.sh ...                          # torchrun data parallel, one process per GPU
#
# The flags are checked first (same errors as a foreground run, printed here), then the run goes to the
# background. Its output goes to logs/<run>.log and its process id to logs/<run>.pid, relative to the current
# directory like the run directory runs/<run> (LOG_DIR=... moves the two files). A start into a run directory
# that exists (without --resume), or whose process is still alive, is refused.
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)

python=${PYTHON:-$repo/.venv/bin/python}
nproc=${NPROC:-1}
log_dir=${LOG_DIR:-logs}

# --dry-run validates everything and prints the run directory (resolving the default timestamped name once).
run_dir=$("$python" "$repo/OpenVLA_GRPO.py" train --dry-run "$@" | tail -n 1)
run=$(basename "$run_dir")
mkdir -p "$log_dir"
log="$log_dir/$run.log"
pid_file="$log_dir/$run.pid"
if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "start_training: run $run is already running as PID $(cat "$pid_file") (log: $log); stop it with:" >&2
  echo "  kill $(cat "$pid_file")" >&2
  exit 1
fi

if ((nproc > 1)); then
  launcher=("$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc")
else
  launcher=("$python")
fi
PYTHONUNBUFFERED=1 nohup "${launcher[@]}" "$repo/OpenVLA_GRPO.py" train "$@" --run-name "$run" >"$log" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

echo "started run $run (PID $pid) writing to $run_dir"
echo "  follow it:  tail -f $log"
echo "  stop it:    kill $pid"
echo "  resume it:  $0 --resume $run_dir"
