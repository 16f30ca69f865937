# The two commands a newcomer runs: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: install demo test test-fast ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.main

test: $(STAMP)
	$(BIN)/python -m pytest

# The edit loop: everything but the whole-run tests (marked slow), on two processes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 -q

UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
UI_WORKERS ?= 1

# Prints the link that opens the latest pipeline's report.html, then the runs-table link of each existing
# experiment (model-training view, per-method columns), then serves the UI: `mlflow ui --app-name stego-vessels`
# (MLflow's app plus the project's landing pages) with one worker and no job runner.
ui: $(STAMP)
	@$(BIN)/python -m stego_core.platform.ui --host $(UI_HOST) --port $(UI_PORT) --workers $(UI_WORKERS)
