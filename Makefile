# Two entry points for people: `make serve` (the embedded default) and `make test` (everything).
# Both create .venv on first use and install the core plus every workspace plugin into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := -e "plugins/executor_local[triton]" -e plugins/executor_slurm -e "plugins/gateway_hypha[server]" -e "plugins/storage_s3[test]" -e "plugins/executor_k8s[test]"

.PHONY: serve test install services lint bench clean

# What `make serve` needs: the core with ONNX support and the local executor with its Triton.
$(BIN)/.serve-installed: pyproject.toml constraints.txt plugins/executor_local/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[onnx]" -e "plugins/executor_local[triton]"
	touch $@

# Everything, for development and tests: every plugin with its test dependencies, torch,
# TensorFlow (the `tensorflow` extra: ~20 s from a warm package cache).
$(BIN)/.installed: $(BIN)/.serve-installed $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[onnx,torch,tensorflow,test]" $(PLUGINS)
	touch $@

install: $(BIN)/.installed

serve: $(BIN)/.serve-installed
	$(BIN)/bioengine serve --config examples/local.toml

services:
	bash .ci/start-services.sh

test: install services
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/bench_local.py
	$(BIN)/python bench/bench_hypha.py --n 20

clean:
	rm -rf $(VENV) .bioengine
