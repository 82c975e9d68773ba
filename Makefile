# cfgen — make help lists the targets.
# On a GPU cluster: make run NUM_PROCESSES=8 CONFIG=pipelines/x.toml
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= pipelines/digits.toml
OUT ?=
NUM_PROCESSES ?= 1
BENCH_LIMIT ?= 128
RUN ?= runs/digits
# Extra accelerate launch flags, e.g. for several nodes:
#   ACCELERATE_ARGS='--num_machines 2 --machine_rank 0 --main_process_ip HOST --main_process_port 29500'
ACCELERATE_ARGS ?= --num_machines 1
# The CPU wheel here; a CUDA image may pass its own, e.g. TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

OUT_FLAG := $(if $(OUT),--out $(OUT),)
ifeq ($(NUM_PROCESSES),1)
CFGEN := $(BIN)/cfgen
else
# --multi_gpu selects accelerate's torchrun launcher (one process per GPU; gloo on a CPU-only box)
CFGEN := $(BIN)/accelerate launch --multi_gpu --num_processes $(NUM_PROCESSES) $(ACCELERATE_ARGS) \
	--mixed_precision no --dynamo_backend no -m cfgen
endif

# make benchmark: the pairs' value. BENCH_POOL picks the train-split images whose pairs are the shots
# pool (shots come from the base classes only: circle, square, triangle of shapes6), gates on.
TRAIN_OUT ?= runs/train-$(basename $(notdir $(CONFIG)))
BENCH_CONFIG ?= pipelines/shapes6.toml
BENCH_RUN ?= runs/$(basename $(notdir $(BENCH_CONFIG)))-benchmark
BENCH_VLM ?= models/shapes6/vlm
BENCH_GPU_ARGS ?=
BENCH_POOL ?= --set data.use_split=train --set 'data.only_classes=["circle", "square", "triangle"]' \
	--set data.class_limit=40 --set pack.require_flip=true
# The same pool's cue flips (issue 28): each image in every other environment through the text path of
# BENCH_TEXT_CONFIG (the captioned shapes6, models/shapes6-text), gates on (pack.require_flip holds a do()
# that keeps the class to the class kept); tune reads them with the captioned source (same pixels, plus
# the renderer's do(environment) for the true cue flips).
BENCH_TEXT_CONFIG ?= pipelines/shapes6-text.toml
BENCH_TEXT_RUN ?= $(BENCH_RUN)-text
BENCH_TEXT_POOL ?= --set data.use_split=train --set 'data.only_classes=["circle", "square", "triangle"]' \
	--set data.class_limit=40 --set pack.require_flip=true
BENCH_TUNE ?= --set data.source=shapes-captioned --set 'tune.cue_pairs=$(abspath $(BENCH_TEXT_RUN))/pairs/pairs-*.tar'

.PHONY: help install demo test invert guide pack run evaluate train bench bench-gpu bench-tune bench-threads shapes benchmark benchmark-cocoop benchmark-prompts report clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install cfgen with torch pinned

demo: install ## digits -> runs/digits/pairs/, judge the pairs, then prompt tuning on them
	$(BIN)/cfgen run --config pipelines/digits.toml
	$(BIN)/cfgen evaluate runs/digits
	$(BIN)/cfgen tune --config pipelines/digits.toml
	@echo "The digits leave prompt learning nothing to gain (zero-shot is at ceiling): 'make benchmark'"
	@echo "measures what counterfactual pairs are worth, on a dataset with a spurious cue and worst-group accuracy."

# Two pytest workers (pytest-xdist), one torch thread each: on a 2-core machine two single-threaded workers
# finish sooner than one worker whose threads fight (docs/performance.md#threads). TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: install ## run the test suite (offline; TEST_WORKERS=2 pytest workers, one thread each)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)

invert: install ## cfgen invert on CONFIG (NUM_PROCESSES>1 uses accelerate launch)
	$(CFGEN) invert --config $(CONFIG) $(OUT_FLAG)

guide: install ## cfgen guide on CONFIG
	$(CFGEN) guide --config $(CONFIG) $(OUT_FLAG)

pack: install ## cfgen pack on CONFIG
	$(CFGEN) pack --config $(CONFIG) $(OUT_FLAG)

run: install ## invert, guide and pack on CONFIG
	$(CFGEN) run --config $(CONFIG) $(OUT_FLAG)

train: install ## train CONFIG's models (diffusion, classifier, VLM tower) into TRAIN_OUT (never the shipped ones unless TRAIN_OUT=models/<name>)
	$(BIN)/cfgen train diffusion --config $(CONFIG) --out $(TRAIN_OUT)
	$(BIN)/cfgen train classifier --config $(CONFIG) --out $(TRAIN_OUT)/classifier
	$(BIN)/cfgen train vlm --config $(CONFIG) --out $(TRAIN_OUT)/vlm

bench: install ## guide-stage throughput vs compute alone vs a one-at-a-time reference
	$(BIN)/cfgen bench --config $(CONFIG)

bench-gpu: install ## guided step of ADM-256 / SD 1.5-sized random models: pairs/s, TFLOP/s, MFU, memory (CPU: BENCH_GPU_ARGS=--tiny)
	$(BIN)/python -m cfgen.bench.gpu $(BENCH_GPU_ARGS)

bench-threads: install ## cfgen run alone vs two side by side, for each thread setting (BENCH_LIMIT samples)
	$(BIN)/python -m cfgen.bench.threads --config $(CONFIG) --limit $(BENCH_LIMIT)

bench-tune: install ## cfgen tune: epoch time with the feature cache vs re-encoding the images
	$(BIN)/cfgen tune --config $(CONFIG) $(OUT_FLAG) --bench

shapes: install ## synthetic benchmark: run, sweep and report -> runs/shapes/report/report.html
	$(BIN)/cfgen run --config pipelines/shapes.toml
	$(BIN)/cfgen sweep --config pipelines/shapes.toml
	$(BIN)/cfgen report runs/shapes

$(BENCH_VLM)/config.json: | install
	$(BIN)/cfgen train vlm --config $(BENCH_CONFIG) --out $(BENCH_VLM)

benchmark: install $(BENCH_VLM)/config.json ## class-flip and cue-flip pairs of train-split shots -> cfgen tune, 5 seeds
	$(BIN)/cfgen run --config $(BENCH_CONFIG) --out $(BENCH_RUN) $(BENCH_POOL)
	$(BIN)/cfgen run --config $(BENCH_TEXT_CONFIG) --out $(BENCH_TEXT_RUN) $(BENCH_TEXT_POOL)
	$(BIN)/cfgen tune --config $(BENCH_CONFIG) --out $(BENCH_RUN) $(BENCH_TUNE)

benchmark-cocoop: install $(BENCH_VLM)/config.json ## the benchmark's CoCoOp rows (same pairs, shots, seeds; ~3x the main table's time)
	$(BIN)/cfgen run --config $(BENCH_CONFIG) --out $(BENCH_RUN) $(BENCH_POOL)
	$(BIN)/cfgen tune --config $(BENCH_CONFIG) --out $(BENCH_RUN)-cocoop --pairs '$(BENCH_RUN)/pairs/pairs-*.tar' \
		--set 'tune.learners=["cocoop"]' --set 'tune.objectives=["augment", "dicap"]' --set 'tune.cf_sources=["generated"]' --set 'tune.rows=[]' \
		--set 'tune.kinds=["class"]' --set 'tune.project=[]'

# The prompt learners on the cue flips (issue 28): CoOp and CoOp-CSC with CF-aug on class flips, cue flips
# and both, same pools, shots and seeds as make benchmark; kept out of it for time (each shot with five cue
# flips makes a prompt learner's epoch ~3x as long: ~10 min).
BENCH_PROMPT_ROWS ?= ["coop+augment[generated]", "coop+augment[generated:cue]", "coop+augment[generated:both]", \
	"coop+augment[true:both]", "coop+augment[nearest:both]", "coop_csc+augment[generated]", \
	"coop_csc+augment[generated:cue]", "coop_csc+augment[generated:both]", "coop_csc+augment[true:both]", \
	"coop_csc+augment[nearest:both]"]

benchmark-prompts: install $(BENCH_VLM)/config.json ## the prompt learners' cue-flip rows (same pairs, shots, seeds; ~10 min)
	$(BIN)/cfgen run --config $(BENCH_CONFIG) --out $(BENCH_RUN) $(BENCH_POOL)
	$(BIN)/cfgen run --config $(BENCH_TEXT_CONFIG) --out $(BENCH_TEXT_RUN) $(BENCH_TEXT_POOL)
	$(BIN)/cfgen tune --config $(BENCH_CONFIG) --out $(BENCH_RUN)-prompts --pairs '$(BENCH_RUN)/pairs/pairs-*.tar' $(BENCH_TUNE) \
		--set 'tune.learners=["coop", "coop_csc"]' --set 'tune.project=[]' --set 'tune.rows=$(BENCH_PROMPT_ROWS)'

report: install ## HTML quality report of a run: make report RUN=runs/digits
	$(BIN)/cfgen report $(RUN)

clean: ## remove runs/ (not .venv)
	rm -rf runs
