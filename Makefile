# PoorViTs: one target per column of the paper's table (README). `make -n <target>` prints exactly the flags that
# column changes. Override on the command line: make mla-q EPOCHS=10 SEED=1 NPROC=8 DATA=/datasets OUT=runs
# DATASET=svhn (cifar100, tinyimagenet, imagefolder...) runs any column on that dataset (docs/datasets.md).
# A target run again continues its run from the checkpoint (--resume auto); a finished run just reports again.
# EXTRA="..." comes last, so it overrides any flag of any target: make lion-bs1024 EXTRA="--lr 1e-3"
PYTHON ?= python3
VENV := .venv
# PY runs everything. Its default builds .venv from requirements.txt; PY=python3 (or any Python that already has
# torch >= 2.11, torchvision >= 0.26, einops, tqdm) uses that environment as it is: no venv, no pip.
PY ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/installed)
DATASET ?= cifar10
EPOCHS ?= 100
NPROC ?= 4
SEED ?= 0
DATA ?= data
OUT ?= runs
DATASET ?= cifar10
# AMP= trains the table's columns in fp32 (the seed's default branch ran fp32 even with --amp: docs/faithfulness.md).
AMP ?= --amp
EXTRA ?=
# SEEDS: runs per column for the tables.
SEEDS ?= 3

# The paper's baseline is train.py's defaults, so a column lists only what it changes (FLAGS); the DDP columns run
# under torchrun. A run lives in OUT/<column>-seed<SEED> (on another dataset OUT/<column>-<dataset>-seed<SEED>);
# report.py groups runs by --tag and dataset.
BASE = --dataset $(DATASET) --data-dir $(DATA) $(FETCH) --epochs $(EPOCHS) $(AMP) --seed $(SEED) --tag $@ \
	--output-dir $(OUT)/$@$(call run-suffix,$(DATASET))-seed$(SEED) --resume auto
# --download where the dataset has files to fetch; the folder suffix of a run on another dataset than CIFAR-10.
FETCH = $(if $(filter cifar10 cifar100 svhn tinyimagenet,$(DATASET)),--download)
run-suffix = $(patsubst %,-%,$(filter-out cifar10,$(1)))
LAUNCH = $(PY)
TORCHRUN = $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC)

COLUMNS := baseline no-aa no-mixup no-cutmix sin whiten mla-qkv mla-kv mla-qk mla-q mla-k \
	ddp-bs256 ddp-bs1024 lion-bs1024 cls-2 cls-4
# The columns trained by torchrun on NPROC GPUs; each of the others trains on one.
DDP_COLUMNS := ddp-bs256 ddp-bs1024 lion-bs1024
# The demo model on digits, and two ablations of it: the example table and plots of the README.
DEMO_COLUMNS := demo-base demo-mla-qkv demo-cls-4
.PHONY: test demo own-images bench gpu-check table plots table-runs datasets-table demo-table analyze-demo no-hflip \
	table-jobs table-jobs-ddp demo-table-jobs $(COLUMNS) $(DEMO_COLUMNS)

test: $(SETUP)
	$(PY) -m pytest -q

# A small ViT on scikit-learn's bundled handwritten digits, on the CPU: offline, about a minute on a laptop.
DEMO_FLAGS = --dataset digits --patch-size 8 --dim 96 --depth 4 --heads 4 --batch-size 64 --lr 2e-3 --epochs 60 \
	--warmup-epochs 3 --no-hflip --auto-augment none --random-erase 0 --mixup-alpha 0 --cutmix-alpha 0 --ra-reps 1 \
	--eval-every 10 --device cpu
demo: RUN := $(OUT)/demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(SETUP)
	$(PY) train.py $(DEMO_FLAGS) --seed $(SEED) --output-dir $(RUN) $(EXTRA)
	@$(call next-steps,$(RUN),docs/example/digits)

# Your own images on the CPU: DATA/train/<class>/*, DATA/val/<class>/* (any size, resized to 32x32), a small ViT
# sized for a few hundred to a few thousand images. make own-images DATA=my_data [EPOCHS=50] [EXTRA="..."]
OWN_FLAGS = --dataset imagefolder --data-dir $(DATA) --img-size 32 --patch-size 8 --dim 96 --depth 4 --heads 4 \
	--batch-size 32 --lr 2e-3 --warmup-epochs 3 --auto-augment none --random-erase 0 --mixup-alpha 0 --cutmix-alpha 0 \
	--ra-reps 3 --eval-every 10 --device cpu
own-images: EPOCHS = 50
own-images: RUN := $(OUT)/$(notdir $(abspath $(DATA)))-$(shell date +%Y%m%d-%H%M%S)
own-images: $(SETUP)
	$(PY) train.py $(OWN_FLAGS) --epochs $(EPOCHS) --seed $(SEED) --output-dir $(RUN) $(EXTRA)
	@$(call next-steps,$(RUN),$(patsubst %/,%,$(DATA))/val)

# What to do with the run just trained, $(1): evaluate it, predict the images $(2) with it, analyze it.
define next-steps
	echo "next: $(PY) predict.py evaluate $(1) --device cpu"; \
	echo "      $(PY) predict.py predict $(1) $(2) --top-k 3 --out $(1)/predictions.csv --device cpu"; \
	echo "      $(PY) analyze.py $(1) --device cpu"
endef

# The table of every run under OUT (mean ± std over seeds, next to the paper), and its plots: OUT/report.
table: $(SETUP)
	$(PY) report.py $(OUT) --seeds $(SEEDS)
plots: $(SETUP)
	$(PY) report.py $(OUT) --seeds $(SEEDS) --plots

# $(call each-run,COLUMNS,DIR,DATASET,MAKE): `MAKE <column> SEED=<n> OUT=DIR DATASET=...` for every column on DATASET
# and seed 0..SEEDS-1, seed by seed, except the runs that are finished (said on stderr); any other continues from its
# checkpoint, or starts again if it died before its first one.
define each-run
	@for seed in $$(seq 0 $$(($(SEEDS) - 1))); do for column in $(1); do \
		if grep -qs '"complete": true' $(2)/$$column$(call run-suffix,$(3))-seed$$seed/summary.json; then \
			echo "done: $(2)/$$column$(call run-suffix,$(3))-seed$$seed" >&2; continue; fi; \
		$(4) $$column SEED=$$seed OUT=$(2) PY=$(PY) DATASET=$(3) || exit 1; \
	done; done
endef
# The runs one after another; or their commands, one a line and nothing else on stdout (make -n prints what
# `make <column>` runs; SETUP= leaves out the venv, which the list's target builds first, its output on stderr).
run-all = $(call each-run,$(1),$(2),$(3),$(MAKE) --no-print-directory)
define job-list
	$(if $(SETUP),@$(MAKE) -s --no-print-directory $(SETUP) >&2)
	$(call each-run,$(1),$(2),$(3),$(MAKE) --no-print-directory -n SETUP=)
endef

# The job lists of docs/parallel.md: the single-GPU runs, and the DDP runs (NPROC GPUs each), not yet complete.
table-jobs:
	$(call job-list,$(filter-out $(DDP_COLUMNS),$(COLUMNS)),$(OUT),$(DATASET))
table-jobs-ddp:
	$(call job-list,$(DDP_COLUMNS),$(OUT),$(DATASET))
demo-table-jobs:
	$(call job-list,$(DEMO_COLUMNS),$(OUT)/demo-table)

# On another dataset the table shows only its runs, the differences against its baseline (report.py's label).
table-runs: $(SETUP)
	$(call run-all,$(COLUMNS),$(OUT),$(DATASET))
	$(PY) report.py $(OUT) --seeds $(SEEDS) --plots \
		$(if $(call run-suffix,$(DATASET)),--only-run --baseline "baseline [$(DATASET)]")

# The baseline over SEEDS on the SPT/LSA paper's other datasets, SVHN also without flips (the digit-correct reading),
# into OUT/datasets: one table, each column next to its dataset's reference (docs/datasets.md).
datasets-table: $(SETUP)
	$(call run-all,baseline,$(OUT)/datasets,cifar100)
	$(call run-all,baseline no-hflip,$(OUT)/datasets,svhn)
	$(call run-all,baseline,$(OUT)/datasets,tinyimagenet)
	$(PY) report.py $(OUT)/datasets --seeds $(SEEDS) --only-run

demo-table: $(SETUP)
	$(call run-all,$(DEMO_COLUMNS),$(OUT)/demo-table)
	$(PY) report.py $(OUT)/demo-table --seeds $(SEEDS) --plots --baseline "demo-base [digits]" --only-run

demo-mla-qkv: FLAGS = --latent qkv --latent-dim 32
demo-cls-4: FLAGS = --num-cls 4
$(DEMO_COLUMNS): $(SETUP)
	$(PY) train.py $(DEMO_FLAGS) --seed $(SEED) --tag $@ --output-dir $(OUT)/$@-seed$(SEED) --resume auto $(FLAGS) $(EXTRA)

# The analysis plots of docs/analysis.md: the demo model (trained if missing: demo-base continues or reports its
# run), then analyze.py on it. Ranks from 1: this small model keeps most of its accuracy down to rank 4.
analyze-demo: demo-base
	$(PY) analyze.py $(OUT)/demo-base-seed$(SEED) --out docs/analysis --device cpu --min-rank 1 --rank-steps 12

# Throughput figures for this machine (docs/performance.md); on a CPU machine: make bench EXTRA="--device cpu".
bench: $(SETUP)
	$(PY) bench.py $(EXTRA)

# One command for a GPU machine, at most 8 minutes: every bench.py section into DIR (bench.md, bench.json, the
# train section's summary and metrics). It installs nothing: it runs PY if given, else .venv's Python if built, else
# python3, which must have torch >= 2.11. Anywhere, at a tiny size: make gpu-check EXTRA="--device cpu --smoke"
DIR ?= $(OUT)/gpu-check
CHECK_PY = $(if $(filter file,$(origin PY)),$(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON)),$(PY))
TORCH_2_11 = import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 11))
gpu-check:
	@$(CHECK_PY) -c '$(TORCH_2_11)' 2>/dev/null || { echo "make gpu-check: error: $(CHECK_PY) lacks torch >= 2.11 (PY=...)" >&2; exit 2; }
	$(CHECK_PY) bench.py --gpu-check --output-dir $(DIR) $(EXTRA)

# The table's columns: each adds its FLAGS to the baseline.
no-aa: FLAGS = --auto-augment none
no-mixup: FLAGS = --mixup-alpha 0
no-cutmix: FLAGS = --cutmix-alpha 0
sin: FLAGS = --pos-embed sincos
whiten: FLAGS = --whiten
mla-qkv: FLAGS = --latent qkv
mla-kv: FLAGS = --latent kv
mla-qk: FLAGS = --latent qk
mla-q: FLAGS = --latent q
mla-k: FLAGS = --latent k
# DDP: --batch-size is the global batch; each image's --ra-reps copies side by side in a batch, as the seed under torchrun
ddp-bs256 ddp-bs1024 lion-bs1024: LAUNCH = $(TORCHRUN)
ddp-bs256: FLAGS = --batch-size 256 --ra-mode in-batch
ddp-bs1024: FLAGS = --batch-size 1024 --ra-mode in-batch
lion-bs1024: FLAGS = --batch-size 1024 --ra-mode in-batch --opt lion --lr 1e-4 --weight-decay 0.5
# Several CLS tokens (the abstract's claim; no published numbers)
cls-2: FLAGS = --num-cls 2
cls-4: FLAGS = --num-cls 4
# No column of the paper's: the baseline without flips, as digits (SVHN) should be read.
no-hflip: FLAGS = --no-hflip

$(COLUMNS) no-hflip: $(SETUP)
	$(LAUNCH) train.py $(BASE) $(FLAGS) $(EXTRA)

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@
