# MedMAT-CG. `make demo` and `make test` each set up .venv from nothing, then run.
SHELL := /bin/bash
PY_BOOT ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Everything offline and quiet: no hub downloads, no telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
# dvc.yaml's stages call `medmat` and `python`: the venv's, whether or not it is activated.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-slow test-all bench ui dashboard use-gpu-config services clean

setup: $(VENV)/.installed

# torch first, from the local CPU build (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PY_BOOT) >/dev/null || { echo "need $(PY_BOOT) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY_BOOT) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python -m medmat.demo

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" -q

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The link opens the study's runs in MLflow's machine-learning view (the UI's default view is GenAI's).
ui: setup
	@$(BIN)/python -c "from medmat import tracking; print('MLflow UI:', tracking.experiment_url())"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts --host 127.0.0.1 --port 5000

dashboard: setup
	$(BIN)/optuna-dashboard sqlite:///mlruns/optuna.db --host 127.0.0.1 --port 8080

# The team stores on this machine until Ctrl-C: PostgreSQL + an S3 server + mlflow server on 127.0.0.1
# (medmat.services; docs/scale-out.md). Prints the URLs and the params/env to point medmat at them.
services: setup
	$(BIN)/python -m medmat.services

# Switch params.yaml to the paper's GPU configuration (local checkpoint; old file kept as params.yaml.bak).
use-gpu-config: setup
	$(BIN)/python -m medmat.pipeline use-config configs/gpu.yaml

clean:
	rm -rf mlruns reports/*.png work .pytest_cache
