# ifvit: encode once (pipeline) -> train any variant (train) -> evaluate and compare (evaluate).
# Every target installs what it needs first through `setup` (a no-op when nothing changed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.ifvit-installed

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

.PHONY: setup test shards train eval compare bench bench-pipeline flops demo wheelhouse gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	@touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

flops: setup
	$(PY) -m train.flops

shards: setup
ifeq ($(DATASET),coco)
	$(PY) -m pipeline coco --coco-root $(COCO_ROOT) --out $(SHARDS)
else
	$(PY) -m pipeline $(DATASET) --out $(SHARDS)
endif

train: setup
ifeq ($(NPROC),1)
	$(PY) -m train --variant $(VARIANT) --shards $(SHARDS) --out $(OUT) $(if $(PRESET),--preset $(PRESET),) $(if $(STEPS),--steps $(STEPS),) $(TRAIN_ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train --variant $(VARIANT) --shards $(SHARDS) --out $(OUT) $(if $(PRESET),--preset $(PRESET),) $(if $(STEPS),--steps $(STEPS),) $(TRAIN_ARGS)
endif

eval: setup
	@test -n "$(RUN)" || { echo "no run found under runs/: train one first (make train) or pass RUN=runs/NAME"; exit 1; }
	$(PY) -m evaluate --run $(RUN) $(EVAL_ARGS)

# The whole flow on the embedded shapes set, sized for a laptop CPU: shards, the tiny if_concat run, its
# evaluation (ends with the metrics summary and the path of the sample grid). Re-running skips what is done.
DEMO_RUN := runs/if_concat-tiny
demo: setup
	$(MAKE) --no-print-directory shards DATASET=shapes
	$(MAKE) --no-print-directory train DATASET=shapes VARIANT=if_concat PRESET=tiny OUT=$(DEMO_RUN)
	$(MAKE) --no-print-directory eval RUN=$(DEMO_RUN)

# Side by side: the four variants (ABLATIONS=1 adds [n_text, n_image] = [0, 4] and [1, 0] of both
# conditionings), once per seed of SEEDS ("0 1 2" or 0,1,2), trained and evaluated one after another on
# one shard set, then one report: runs/compare/report.md. Re-running resumes where it stopped.
SEEDS       ?= 0
ABLATIONS   ?=
COMPARE_DIR ?= runs/compare
COMPARE_EVAL_ARGS ?= --checkpoints all --scales 0,0.5,1,2,3
comma := ,
COMPARE_VARIANTS := early_concat early_xattn if_concat if_xattn \
	$(if $(ABLATIONS),if_concat_t0i4 if_concat_t1i0 if_xattn_t0i4 if_xattn_t1i0,)
COMPARE_RUNS := $(foreach v,$(COMPARE_VARIANTS),$(foreach s,$(subst $(comma), ,$(SEEDS)),$(COMPARE_DIR)/$(v)-s$(s)))
compare: setup
	$(MAKE) --no-print-directory shards
	@set -e; for run in $(COMPARE_RUNS); do \
	  name=$${run##*/}; variant=$${name%-s*}; seed=$${name##*-s}; \
	  echo "== $$run: train $$variant, seed $$seed"; \
	  $(PY) -m train --variant $$variant --shards $(SHARDS) --out $$run --seed $$seed \
	    $(if $(PRESET),--preset $(PRESET),) $(if $(STEPS),--steps $(STEPS),) $(TRAIN_ARGS); \
	  echo "== $$run: evaluate"; \
	  $(PY) -m evaluate --run $$run $(COMPARE_EVAL_ARGS) $(EVAL_ARGS); \
	done
	$(PY) -m evaluate.compare $(COMPARE_RUNS) --out $(COMPARE_DIR)

bench: setup
	$(PY) -m train.bench --json bench-train.json

bench-pipeline: setup
	$(PY) -m pipeline bench --json bench-pipeline.json

# The GPU campaign (docs/gpu-campaign.md). `wheelhouse` fetches the wheels a bare GPU image lacks into .whl/
# (ignored; carry it along); `gpu-check` runs every GPU figure in one budgeted command, never `setup`: on a
# bare GPU machine it uses the image's python3 and installs .whl/ offline into a private folder.
# GPU_OUT=DIR for the summary files, GPU_ARGS="--budget 420 --stages train,science" or "--smoke".
HOST_PY   = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_OUT  ?= runs/gpu-check
GPU_ARGS ?=
wheelhouse:
	$(HOST_PY) -m benchmarks.wheelhouse --dest .whl

gpu-check:
	$(HOST_PY) -m benchmarks.gpu --out $(GPU_OUT) $(GPU_ARGS)

clean-venv:
	rm -rf $(VENV)
