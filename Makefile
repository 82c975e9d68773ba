# cfgen — make help lists the targets.
# On a GPU cluster: make run NUM_PROCESSES=8 CONFIG=pipelines/x.toml
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= pipelines/digits.toml
OUT ?=
NUM_PROCESSES ?= 1
# The CPU wheel here; a CUDA image may pass its own, e.g. TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

OUT_FLAG := $(if $(OUT),--out $(OUT),)
ifeq ($(NUM_PROCESSES),1)
CFGEN := $(BIN)/cfgen
else
CFGEN := $(BIN)/accelerate launch --num_processes $(NUM_PROCESSES) -m cfgen
endif

.PHONY: help install demo test invert guide pack run evaluate train clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install cfgen with torch pinned

demo: install ## digits -> runs/digits/pairs/, then judge the pairs independently
	$(BIN)/cfgen run --config pipelines/digits.toml
	$(BIN)/cfgen evaluate runs/digits

test: install ## run the test suite (offline)
	$(BIN)/python -m pytest

invert: install ## cfgen invert on CONFIG (NUM_PROCESSES>1 uses accelerate launch)
	$(CFGEN) invert --config $(CONFIG) $(OUT_FLAG)

guide: install ## cfgen guide on CONFIG
	$(CFGEN) guide --config $(CONFIG) $(OUT_FLAG)

pack: install ## cfgen pack on CONFIG
	$(CFGEN) pack --config $(CONFIG) $(OUT_FLAG)

run: install ## invert, guide and pack on CONFIG
	$(CFGEN) run --config $(CONFIG) $(OUT_FLAG)

train: install ## retrain the embedded digits models (diffusion, then classifier)
	$(BIN)/cfgen train diffusion --config $(CONFIG)
	$(BIN)/cfgen train classifier --config $(CONFIG)

clean: ## remove runs/ (not .venv)
	rm -rf runs
