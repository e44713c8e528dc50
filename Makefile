# Set-up, demo and tests. `make demo` on a fresh machine: creates .venv, installs, trains the tiny demo.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch 2.13.0 (this project's CI machines have it on disk). GPU clusters: install the CUDA
# build of torch that matches your driver into the venv first, then run `make setup TORCH=`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# Written after a complete install: `make test` on a fresh clone installs first, and later runs install again
# only when pyproject.toml is newer than it (a changed dependency), not every time.
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# $(1): how torch gets in (before the package, so that pip does not pick a torch of its own).
define install
	$(BIN)/python -m pip install -q --upgrade pip
	$(1)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(INSTALLED)
endef

# The automatic install keeps a torch that is already in the venv: a CUDA build put there by hand stays.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(call install,$(if $(TORCH),$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"))

# Installs whenever asked, $(TORCH) included (empty: keep the venv's torch).
setup: | $(BIN)/python
	$(call install,$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)"))

# The embedded default: Me-LLaMA's two stages on the tiny profile and the shipped sample data, CPU, offline:
# continual pretraining, then LoRA instruction tuning of its final/ (a few minutes in all).
# Re-running continues the same run directories (--resume auto) instead of starting over. `mellama-train launch`
# passes Ctrl-C to every rank (a checkpoint, exit 75), which `deepspeed` alone does not.
demo: $(INSTALLED)
	PATH="$(abspath $(BIN)):$$PATH" mellama-train launch deepspeed launch/pretrain.py --ds ds_configs/zero3.json \
		--output-dir runs/demo-pretrain
	PATH="$(abspath $(BIN)):$$PATH" mellama-train launch deepspeed launch/tune.py --ds ds_configs/zero3.json \
		--base runs/demo-pretrain/final --output-dir runs/demo-tune

# Every test, the slow ones included (what CI runs).
test: $(INSTALLED)
	$(BIN)/python -m pytest -q --durations=15

# Skip the slow tests (multi-process runs, training runs through the entry point) while iterating locally.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(INSTALLED)
	$(BIN)/ruff check src tests launch tools bench
	$(BIN)/ruff format --check src tests launch tools bench

clean:
	rm -rf $(VENV) runs .pytest_cache
