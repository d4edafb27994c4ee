# Two entry points (see README): `make run` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := sample_data/planted.h5
RESULT := out/sample_result.h5

.PHONY: run test bench bench-compression clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	@mkdir -p out
	$(BIN)/matclust cluster $(SAMPLE) -o $(RESULT) --config configs/incremental.toml --overwrite
	$(BIN)/matclust verify $(RESULT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# Long (about 10 minutes, 2.3 GB in bench/data): BENCH_ARGS="--quick" or "--paper-src DIR".
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

# Bytes on disk against SZ3 / ZFP / float16 at a checked error guarantee (about 2 minutes;
# BENCH_ARGS="--only gray pde" or '--matclust-config "NAME=ARGS"').
bench-compression: $(VENV)/.installed-bench
	$(BIN)/python bench/compression.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
