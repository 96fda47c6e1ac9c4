# Everything a fresh machine needs: `make train` (the main job on the embedded sample), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install train test test-fast clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # first and pinned: the CPU wheel, not a CUDA build
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lamscale train configs/tiny.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

# on a machine with one CUDA GPU: train tiny (NCCL, bf16, triton, ZeRO-2/3, a driver kill + resume) and the
# cuda benchmarks, one summary block, < 8 min on an H200; outputs under $(OUT) if set. See docs/benchmarks.md.
gpu-check: $(STAMP)
	PYTHON=$(PY) launch/gpu_check.sh $(ARGS)

clean:
	rm -rf runs shards/tiny
