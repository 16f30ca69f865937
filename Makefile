# The two commands a newcomer runs: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: install demo test ui

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

UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000

# Prints (and tries to open) the demo's runs table in the model-training view, then serves the UI.
ui: $(STAMP)
	@$(BIN)/python -m stego_core.tracking ui --base http://$(UI_HOST):$(UI_PORT) stego-vessels stego-vessels-sweeps
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(UI_HOST) --port $(UI_PORT)
