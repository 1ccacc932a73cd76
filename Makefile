# Two entry points (see README): `make demo` and `make test`. Both set up the project's virtual environment
# in .venv (created on first use, re-synced when pyproject.toml changes) and run inside it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The original unilm BEiT-3 code and its torchscale/fairscale pins, installed without their (stale) requirements.
ORACLE := beit3-gml==0.1.3 torchscale==0.3.0 fairscale==0.4.0
PYTEST_ARGS ?=

.PHONY: demo test test-all lint format bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

$(VENV)/.test-installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps --no-build-isolation $(ORACLE)
	touch $@

$(VENV)/.demo-installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e ".[train]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) examples/demo/run_demo.py

test: $(VENV)/.test-installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.test-installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

format: $(VENV)/.test-installed
	$(PY) -m ruff check --fix src tests benchmarks examples
	$(PY) -m ruff format src tests benchmarks examples

bench: $(VENV)/.test-installed
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
