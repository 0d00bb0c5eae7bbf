# `make test` builds (or reuses) .venv, installs the project with its test extra and runs
# the whole suite. TORCH_SPEC defaults to the CPU build these machines keep on local disk;
# on a GPU machine run `make test TORCH_SPEC=torch` (or any CUDA build) instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test-gpu and gpu-check build nothing: a lent GPU machine has no network and its own CUDA
# torch, so they run the project from this folder with .venv's python if there is one, else
# $(PYTHON).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
RUN_HERE := PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY)

.PHONY: test install run bench reproduce figures clean test-gpu gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

run: $(STAMP)
	$(PY) -m minimal_amkp

bench: $(STAMP)
	$(PY) -m bench

# The kernel and ops property tests compiled on a GPU, a few examples each (under the
# interpreter without one); `make test` stays the CPU suite CI runs.
test-gpu:
	$(RUN_HERE) -m bench.gpu_check --tests-only

# Compiled tests, bench, a tiny and a short paper run in <= 8 min, numbers in bench/results/<device>/.
gpu-check:
	$(RUN_HERE) -m bench.gpu_check

reproduce: $(STAMP)
	$(PY) -m minimal_amkp.study.reproduce

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

figures: $(STAMP)
	$(PY) -m walkthrough.make_figures --control runs/control
