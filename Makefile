# Set-up, demo and tests. `make demo` on a fresh machine: creates .venv, installs, trains the tiny demo.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch 2.13.0 (this project's CI machines have it on disk). GPU clusters: install the CUDA
# build of torch that matches your driver into the venv first, then run `make setup TORCH=`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"

# The embedded default: Me-LLaMA's two stages on the tiny profile and the shipped sample data, CPU, offline:
# continual pretraining, then LoRA instruction tuning of its final/ (a few minutes in all).
# Re-running continues the same run directories (--resume auto) instead of starting over.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" deepspeed launch/pretrain.py --ds ds_configs/zero3.json --output-dir runs/demo-pretrain
	PATH="$(abspath $(BIN)):$$PATH" deepspeed launch/tune.py --ds ds_configs/zero3.json \
		--base runs/demo-pretrain/final --output-dir runs/demo-tune

# Every test, the slow 2-rank runs included (what CI runs).
test:
	$(BIN)/python -m pytest -q

# Skip the slow multi-process tests while iterating locally.
test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check src tests launch tools bench
	$(BIN)/ruff format --check src tests launch tools bench

clean:
	rm -rf $(VENV) runs .pytest_cache
