# tinyprop: the two commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0

.PHONY: demo test docs system-deps lint format bench bench-finetune bench-scratch speed fuzz-native clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH) -e .
	touch $@

$(VENV)/.installed-test: $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH) -e ".[test,dev,docs]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tinyprop demo

test: $(VENV)/.installed-test system-deps
	$(PY) -m pytest

# The documentation site (build/site): the results page and the README table are written from the
# records first; any MkDocs warning fails the build. make test checks both (tests/test_docs.py).
docs: $(VENV)/.installed-test
	$(PY) scripts/results_page.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Debian packages the tests use (espeak-ng, flite, dataset-fashion-mnist); a no-op when present.
system-deps:
	./scripts/install-system-deps.sh

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

speed: $(VENV)/.installed
	$(PY) benchmarks/speed.py

# libFuzzer (clang, ASan + UBSan) on the native kernels for FUZZ_SECONDS (default 600).
fuzz-native:
	./benchmarks/fuzz_native.sh

# The paper's evaluation, small suite, both protocols (hours on 2 cores; resumable).
bench: bench-finetune bench-scratch

bench-finetune: $(VENV)/.installed-test system-deps
	$(VENV)/bin/tinyprop bench --suite small --protocol finetune --ray local --results benchmarks/results/small-finetune
	$(VENV)/bin/tinyprop report benchmarks/results/small-finetune

bench-scratch: $(VENV)/.installed-test system-deps
	$(VENV)/bin/tinyprop bench --suite small --protocol scratch --ray local --results benchmarks/results/small-scratch
	$(VENV)/bin/tinyprop report benchmarks/results/small-scratch

clean:
	rm -rf $(VENV) build src/*.egg-info
