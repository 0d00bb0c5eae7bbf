# `make test` builds (or reuses) .venv, installs the project with its test extra and runs
# the whole suite. TORCH_SPEC defaults to the CPU build these machines keep on local disk;
# on a GPU machine run `make test TORCH_SPEC=torch` (or any CUDA build) instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install run bench reproduce figures clean

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

reproduce: $(STAMP)
	$(PY) -m minimal_amkp.study.reproduce

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

figures: $(STAMP)
	$(PY) -m walkthrough.make_figures
