# Two commands: `make train` (set up + CPU demo on real LIBERO) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: setup train test bench-cpu

$(STAMP): requirements.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

train: $(STAMP)
	$(PY) OpenVLA_GRPO.py demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

bench-cpu: $(STAMP)
	$(PY) -m bench.bench_libero_env
