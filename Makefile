# lmtrain — the two commands of the quick start are `make demo` and `make test`.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
DATA_MIRROR ?=
RUN ?= runs/demo
DATA ?= data

.PHONY: help install demo test check docs data clean compare-cells results bench-distributed bench-gpu bench-encode gpu-check

help:
	@echo "make demo   train, evaluate and sample on the built-in corpus (creates $(VENV))"
	@echo "make test   run the test suite (creates $(VENV) with the test extras)"
	@echo "make check  a quick subset of the tests (the layout, configs, text, cells, engine, dispatch, schedules; under a minute)"
	@echo "make docs   regenerate docs/configuration.md from lmtrain/config.py (a test checks it is current)"
	@echo "make data   fetch PTB and WikiText-2 into data/ (DATA_MIRROR=DIR copies from a mirror)"
	@echo "make compare-cells   train every cell on a copy task with a known optimum, print a table"
	@echo "make reproduce-NAME DATA=DIR   train configs/NAME.toml on DIR/ptb or DIR/wikitext-2, write results/NAME.json (FORCE=1 replaces an earlier run)"
	@echo "make results   the table of every result beside the published numbers"
	@echo "make bench-distributed   training tokens/s of one process against --nproc 2 (about 10 minutes on 2 CPU cores)"
	@echo "make bench-gpu   our LSTM against cuDNN at issue 7's sizes, fp32 and bf16 (needs a CUDA GPU), a markdown table"
	@echo "make gpu-check   on a GPU machine, within 8 minutes: doctor, the CUDA tests, bench-gpu's sizes, ptb-medium for 2,000 steps;"
	@echo "                 a report in runs/gpu-check-TIME (GPU_CHECK_DIR=DIR); TORCH_INDEX=URL or TORCH_WHEELS=DIR install the CUDA torch; DATA=DIR holds ptb/"
	@echo "make bench-encode   encoding MB/s (1 vs 2 workers) and peak memory on generated 0.25-1 GB corpora"

# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA wheels.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lmtrain train --config configs/demo.toml --run-dir $(RUN) --force
	$(BIN)/lmtrain evaluate $(RUN) --split test
	$(BIN)/lmtrain generate $(RUN) --prompt "The" --max-tokens 80 --num-samples 3 --temperature 0.8 --seed 1

test: install
	$(BIN)/python -m pytest -q

# the quick subset, with the Python versions of the C++ ops (no build): 20-40 s on 2 CPU cores, by load
CHECK_TESTS := layout docs config dispatch schedules locks_atomic tokenizer streaming evaluate_run cells recurrence crafted_checkpoints
check: install
	LMTRAIN_COMPILE=0 $(BIN)/python -m pytest -q $(CHECK_TESTS:%=tests/test_%.py)

# every cell and variant on the copy task (lmtrain/tools/synth.py) at lags 5 and 13, the same number of steps: about 31 minutes on 2 CPU cores
compare-cells: install
	$(BIN)/python -m lmtrain.tools.compare

# a published setup (configs/NAME.toml): train, score valid and test, write results/NAME.json
reproduce-%: install
	$(BIN)/lmtrain reproduce $* --data $(DATA) $(if $(FORCE),--force)

results: install
	$(BIN)/lmtrain results

# tokens/s of one process against `lmtrain train --nproc 2`, the variants interleaved (benchmarks/distributed.py)
bench-distributed: install
	$(BIN)/python benchmarks/distributed.py --repeats 3 --steps 30

# issue 7's settings (lmtrain.tools.bench.PRESETS) on the GPU: the markdown table of docs/gpu.md
bench-gpu: install
	$(BIN)/lmtrain bench --preset issue7 --device cuda --dtypes fp32,bf16

# everything the first GPU machine should tell, within 8 minutes (lmtrain/tools/gpu_check.py, docs/gpu.md): no
# `install` first, as that machine may reach no registry. A Python whose torch has CUDA is used as it is;
# else torch==$(TORCH_VERSION)'s CUDA build goes into $(GPU_VENV), from TORCH_INDEX or the wheels in TORCH_WHEELS.
# Without a GPU: one line, exit code 2.
GPU_VENV ?= .venv-gpu
TORCH_INDEX ?=
TORCH_WHEELS ?=
GPU_CHECK_DIR ?=
gpu-check:
	@$(PYTHON) lmtrain/tools/gpu_check.py --torch-version $(TORCH_VERSION) --venv $(GPU_VENV) --cpu-venv $(VENV) \
		$(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX)) $(if $(TORCH_WHEELS),--torch-wheels $(TORCH_WHEELS)) \
		$(if $(GPU_CHECK_DIR),--out $(GPU_CHECK_DIR)) $(if $(filter-out file,$(origin DATA)),--data $(DATA))

# the config reference is generated: its meanings are the comments of lmtrain/config.py
docs: install
	$(BIN)/python -m lmtrain.tools.config_docs > docs/configuration.md.part && mv docs/configuration.md.part docs/configuration.md

data:
	$(PYTHON) data/fetch.py --dest data $(if $(DATA_MIRROR),--mirror $(DATA_MIRROR))

clean:
	rm -rf $(VENV) runs .pytest_cache

# encoding speed (1 vs 2 workers) and peak memory on generated 0.25/0.5/1 GB corpora under /tmp (deleted after):
# tens of minutes on 2 CPU cores; see docs/speed.md, "Encoding large corpora"
bench-encode: install
	$(BIN)/python -m lmtrain.tools.bench_encode --dir /tmp/lmtrain-bench-encode --sizes 0.25,0.5,1 --workers 1,2 --clean
