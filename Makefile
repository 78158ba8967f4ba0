# PoorViTs: one target per column of the paper's table (see README). `make -n <target>` prints exactly the flags
# that column changes. Override on the command line: make mla-q EPOCHS=10 SEED=1 NPROC=8 DATA=/datasets OUT=runs
# A target run again continues its run from the checkpoint (--resume auto); a finished run just reports again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EPOCHS ?= 100
NPROC ?= 4
SEED ?= 0
DATA ?= data
OUT ?= runs
# EXTRA adds flags to any target; SEEDS: runs per column for the tables.
EXTRA ?=
SEEDS ?= 3

# Where a target's run lives, named by the column (report.py groups runs by --tag).
RUN_FLAGS = --seed $(SEED) --tag $@ --output-dir $(OUT)/$@-seed$(SEED) --resume auto $(EXTRA)
# The paper's baseline is train.py's defaults, so a column lists only what it changes.
BASE = --dataset cifar10 --data-dir $(DATA) --download --epochs $(EPOCHS) --amp $(RUN_FLAGS)
TRAIN = $(PY) train.py $(BASE)
TORCHRUN = $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py $(BASE)

COLUMNS := baseline no-aa no-mixup no-cutmix sin whiten mla-qkv mla-kv mla-qk mla-q mla-k \
	ddp-bs256 ddp-bs1024 lion-bs1024 cls-2 cls-4
# The demo model on digits, and two ablations of it: the example table and plots of the README.
DEMO_COLUMNS := demo-base demo-mla-qkv demo-cls-4
.PHONY: test demo bench gpu-check table plots table-runs demo-table analyze-demo $(COLUMNS) $(DEMO_COLUMNS)

test: $(VENV)/installed
	$(PY) -m pytest -q

# A small ViT on scikit-learn's bundled handwritten digits: offline, about a minute on a laptop CPU.
DEMO_FLAGS = --dataset digits --patch-size 8 --dim 96 --depth 4 --heads 4 --batch-size 64 --lr 2e-3 --epochs 60 \
	--warmup-epochs 3 --no-hflip --auto-augment none --random-erase 0 --mixup-alpha 0 --cutmix-alpha 0 --ra-reps 1 \
	--eval-every 10
demo: $(VENV)/installed
	$(PY) train.py $(DEMO_FLAGS) --seed $(SEED) --output-dir $(OUT)/demo-$$(date +%Y%m%d-%H%M%S)

# The table of every run under OUT (mean ± std over seeds, next to the paper), and its plots: OUT/report.
table: $(VENV)/installed
	$(PY) report.py $(OUT) --seeds $(SEEDS)
plots: $(VENV)/installed
	$(PY) report.py $(OUT) --seeds $(SEEDS) --plots

# $(call run-all,COLUMNS,DIR): every column for seeds 0..SEEDS-1 into DIR, one run after another. A finished run is
# skipped; any other continues from its checkpoint, or starts again if it died before its first one.
define run-all
	@for seed in $$(seq 0 $$(($(SEEDS) - 1))); do for column in $(1); do \
		if grep -qs '"complete": true' $(2)/$$column-seed$$seed/summary.json; then \
			echo "done: $(2)/$$column-seed$$seed"; continue; fi; \
		$(MAKE) --no-print-directory $$column SEED=$$seed OUT=$(2) || exit 1; \
	done; done
endef

table-runs: $(VENV)/installed
	$(call run-all,$(COLUMNS),$(OUT))
	$(PY) report.py $(OUT) --seeds $(SEEDS) --plots

demo-table: $(VENV)/installed
	$(call run-all,$(DEMO_COLUMNS),$(OUT)/demo-table)
	$(PY) report.py $(OUT)/demo-table --seeds $(SEEDS) --plots --baseline demo-base --only-run

DEMO_TRAIN = $(PY) train.py $(DEMO_FLAGS) $(RUN_FLAGS)
$(DEMO_COLUMNS): $(VENV)/installed
demo-base:
	$(DEMO_TRAIN)
demo-mla-qkv:
	$(DEMO_TRAIN) --latent qkv --latent-dim 32
demo-cls-4:
	$(DEMO_TRAIN) --num-cls 4

# The README's analysis plots: the demo model (trained if missing: demo-base continues or reports its run), then
# analyze.py on it, into docs/analysis. Ranks from 1: this small model keeps most of its accuracy down to rank 4.
analyze-demo: demo-base
	$(PY) analyze.py $(OUT)/demo-base-seed$(SEED) --out docs/analysis --device cpu --min-rank 1 --rank-steps 12

# Throughput figures for this machine (README, Performance).
bench: $(VENV)/installed
	$(PY) bench.py

# One command for a GPU machine, at most 8 minutes: step, sync, pipeline and 1-epoch train.py figures in
# OUT/gpu-check/gpu-check.md and .json (gpu_check.py; with --device cpu --smoke it runs anywhere at a tiny size).
gpu-check: $(VENV)/installed
	$(PY) gpu_check.py --output-dir $(OUT)/gpu-check

$(COLUMNS): $(VENV)/installed

baseline:
	$(TRAIN)
# Augmentation
no-aa:
	$(TRAIN) --auto-augment none
no-mixup:
	$(TRAIN) --mixup-alpha 0
no-cutmix:
	$(TRAIN) --cutmix-alpha 0
# Patch embedding
sin:
	$(TRAIN) --pos-embed sincos
whiten:
	$(TRAIN) --whiten
# Low-rank latent attention (rank 64)
mla-qkv:
	$(TRAIN) --latent qkv
mla-kv:
	$(TRAIN) --latent kv
mla-qk:
	$(TRAIN) --latent qk
mla-q:
	$(TRAIN) --latent q
mla-k:
	$(TRAIN) --latent k
# DDP: --batch-size is the global batch; each image's --ra-reps copies side by side in a batch, as the seed under torchrun
ddp-bs256:
	$(TORCHRUN) --batch-size 256 --ra-mode in-batch
ddp-bs1024:
	$(TORCHRUN) --batch-size 1024 --ra-mode in-batch
lion-bs1024:
	$(TORCHRUN) --batch-size 1024 --ra-mode in-batch --opt lion --lr 1e-4 --weight-decay 0.5
# Several CLS tokens (the abstract's claim; no published numbers)
cls-2:
	$(TRAIN) --num-cls 2
cls-4:
	$(TRAIN) --num-cls 4

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@
