# ifvit: encode once (pipeline) -> train any variant (train) -> evaluate and compare (evaluate).
# Every target installs what it needs first through `setup` (a no-op when nothing changed). `make help` lists them.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.ifvit-installed
# -qq: pip prints errors only (its warnings about this machine's package indexes are not the user's business).
PIP    := $(PY) -m pip install -qq

export HF_HUB_OFFLINE ?= 0
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM = false

DATASET  ?= shapes
SHARDS   ?= shards/$(if $(filter coco,$(DATASET)),coco256,$(DATASET))
COCO_ROOT ?= data/coco
VARIANT  ?= if_concat
PRESET   ?=
NPROC    ?= 1
STEPS    ?=
# The newest run: the newest runs/*/config.json (a report folder such as runs/compare has none).
RUN      ?= $(patsubst %/config.json,%,$(shell ls -t runs/*/config.json 2>/dev/null | head -n 1))
OUT      ?= runs/$(VARIANT)$(if $(PRESET),-$(PRESET),)
EVAL_ARGS ?=
TRAIN_ARGS ?=

# The one training command (make train, make compare, make demo): torchrun when NPROC > 1. Callers add
# --variant, --out and, for compare, --seed.
LAUNCH := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC),$(PY))
TRAIN   = $(LAUNCH) -m train --shards $(SHARDS) $(if $(PRESET),--preset $(PRESET),) \
          $(if $(STEPS),--steps $(STEPS),) $(TRAIN_ARGS)

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast test-gpu shards train eval compare flops bench bench-pipeline demo wheelhouse \
	gpu-check clean-venv

help: ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATASET=shapes|coco SHARDS= VARIANT= PRESET=tiny|shapes|coco NPROC= STEPS= RUN= SEEDS= ..."

setup: $(STAMP) ## create .venv and install torch (pinned) and this package with its test extra

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_PINS)
	$(PIP) -e '.[dev]' $(TORCH_PINS)
	@touch $(STAMP)

test: setup ## the whole test suite on the CPU (a few minutes)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup ## the suite without the slow end-to-end tests (under 2 minutes)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu"

test-gpu: setup ## only the tests that need a CUDA device (skipped without one)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu -rs

flops: setup ## parameters and GFLOPs of every variant (the paper's Table 1)
	$(PY) -m train.flops

shards: setup ## encode DATASET (shapes | coco) into SHARDS
ifeq ($(DATASET),coco)
	$(PY) -m pipeline coco --coco-root $(COCO_ROOT) --out $(SHARDS)
else
	$(PY) -m pipeline $(DATASET) --out $(SHARDS)
endif

train: setup ## train VARIANT on SHARDS into OUT (resumes an existing OUT)
	$(TRAIN) --variant $(VARIANT) --out $(OUT)

eval: setup ## evaluate RUN (default: the newest run under runs/)
	@test -n "$(RUN)" || { echo "error: no run found under runs/: train one first (make train) or pass RUN=runs/NAME"; exit 2; }
	$(PY) -m evaluate --run $(RUN) $(EVAL_ARGS)

# The whole flow on a CPU, sized for 2 cores: the easier `demo` world of the shapes generator (3 colours,
# one group of 1-3 large objects, 16 px) in its own shard folder, the `demo`-preset if_concat run, its evaluation
# (ends with the judge's scores beside their chance levels and the path of the sample grid). `make shards`
# and `make compare` keep the full world. Re-running skips what is done.
DEMO_SHARDS := shards/shapes-demo
DEMO_RUN    := runs/if_concat-demo
demo: setup ## the whole flow on a CPU: demo-world shards, a tiny run, its evaluation
	$(PY) -m pipeline shapes --world demo --resolution 16 --train-images 5000 --val-images 500 \
	  --holdout-images 0 --out $(DEMO_SHARDS)
	$(MAKE) --no-print-directory train SHARDS=$(DEMO_SHARDS) VARIANT=if_concat PRESET=demo OUT=$(DEMO_RUN)
	$(MAKE) --no-print-directory eval RUN=$(DEMO_RUN)

# Side by side: the four variants (ABLATIONS=1 adds [n_text, n_image] = [0, 4] and [1, 0] of both
# conditionings), once per seed of SEEDS ("0 1 2" or 0,1,2), trained and evaluated one after another on
# one shard set, then one report: COMPARE_DIR/report.md. Re-running resumes where it stopped.
SEEDS       ?= 0
ABLATIONS   ?=
COMPARE_DIR ?= runs/compare
COMPARE_EVAL_ARGS ?= --checkpoints all --scales 0,0.5,1,2,3
comma := ,
SEED_LIST := $(subst $(comma), ,$(SEEDS))
COMPARE_VARIANTS := early_concat early_xattn if_concat if_xattn \
	$(if $(ABLATIONS),if_concat_t0i4 if_concat_t1i0 if_xattn_t0i4 if_xattn_t1i0,)
COMPARE_RUNS := $(foreach v,$(COMPARE_VARIANTS),$(foreach s,$(SEED_LIST),$(COMPARE_DIR)/$(v)-s$(s)))
compare: setup ## train and evaluate every variant x SEEDS, then one report (runs/compare/report.md)
	$(MAKE) --no-print-directory shards
	@set -e; for variant in $(COMPARE_VARIANTS); do for seed in $(SEED_LIST); do \
	  run=$(COMPARE_DIR)/$$variant-s$$seed; \
	  echo "== $$run: train $$variant, seed $$seed"; \
	  $(TRAIN) --variant $$variant --seed $$seed --out $$run; \
	  echo "== $$run: evaluate"; \
	  $(PY) -m evaluate --run $$run $(COMPARE_EVAL_ARGS) $(EVAL_ARGS); \
	done; done
	$(PY) -m evaluate.compare $(COMPARE_RUNS) --out $(COMPARE_DIR)

bench: setup ## training speed of the four variants -> bench-train.json
	$(PY) -m train.bench --json bench-train.json

bench-pipeline: setup ## encoder and loader throughput -> bench-pipeline.json
	$(PY) -m pipeline bench --json bench-pipeline.json

# The GPU campaign (docs/gpu-campaign.md). `wheelhouse` fetches the wheels a bare GPU image lacks into .whl/
# (ignored; carry it along); `gpu-check` runs every GPU figure in one budgeted command, never `setup`: on a
# bare GPU machine it uses the image's python3 and installs .whl/ offline into a private folder.
# GPU_OUT=DIR for the summary files, GPU_ARGS="--budget 420 --stages train,science" or "--smoke".
HOST_PY   = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_OUT  ?= runs/gpu-check
GPU_ARGS ?=
wheelhouse: ## the pinned wheels a bare GPU image lacks -> .whl/ (docs/gpu-campaign.md)
	$(HOST_PY) -m benchmarks.wheelhouse --dest .whl

gpu-check: ## every GPU figure in one budgeted command (GPU_OUT=, GPU_ARGS=)
	$(HOST_PY) -m benchmarks.gpu --out $(GPU_OUT) $(GPU_ARGS)

clean-venv: ## remove .venv
	rm -rf $(VENV)
