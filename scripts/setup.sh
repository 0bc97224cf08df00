#!/usr/bin/env bash
# Creates .venv (Python 3.11), installs the pinned requirements and the Debian GL libraries that headless
# MuJoCo rendering (MUJOCO_GL=egl) needs. Idempotent: `make` runs it only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

gl_packages=(libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglx-mesa0 libglib2.0-0)
missing=()
for p in "${gl_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing headless GL packages: ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "setup: headless rendering needs these Debian packages; run as root:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || {
  echo "setup: $python not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The pinned torch is the CUDA build (its nvidia-* wheels alone are 3.2 GB): the whole stack takes 7.8 GB.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  free_gb=$(df -Pk .venv | awk 'NR == 2 {print int($4 / 1048576)}')
  if ((free_gb < 9)); then
    echo "setup: the install needs about 9 GB free on the disk of $(pwd)/.venv, only ${free_gb} GB are;" \
         "free some space (pip cache: python3 -m pip cache purge) and run make again" >&2
    exit 1
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, timm, libero, vla_actor" \
  || { echo "setup: the install did not complete; see the pip output above" >&2; exit 1; }
