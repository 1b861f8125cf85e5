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
RUN      ?= $(shell ls -td runs/*/ 2>/dev/null | head -n 1)
OUT      ?= runs/$(VARIANT)$(if $(PRESET),-$(PRESET),)
EVAL_ARGS ?=

.PHONY: setup test shards train eval compare bench flops demo clean-venv

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
	$(PY) -m train --variant $(VARIANT) --shards $(SHARDS) --out $(OUT) $(if $(PRESET),--preset $(PRESET),) $(if $(STEPS),--steps $(STEPS),)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train --variant $(VARIANT) --shards $(SHARDS) --out $(OUT) $(if $(PRESET),--preset $(PRESET),) $(if $(STEPS),--steps $(STEPS),)
endif

eval: setup
	@test -n "$(RUN)" || { echo "no run found under runs/: train one first (make train) or pass RUN=runs/NAME"; exit 1; }
	$(PY) -m evaluate --run $(RUN) $(EVAL_ARGS)

bench: setup
	$(PY) -m train.bench --json bench-train.json

clean-venv:
	rm -rf $(VENV)
