# The two commands README promises: `make demo` (the main job) and `make test`. Each sets itself up on a fresh
# machine: a virtualenv in .venv, torch 2.13.0 first (the local CPU wheel), then this package with its extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py $(wildcard modeling/ops/csrc/*.cpp modeling/ops/csrc/*/*.cpp modeling/ops/csrc/*.h modeling/ops/csrc/*/*.h modeling/ops/csrc/*/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m mask2former demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build $(VENV) modeling/ops/*.so
