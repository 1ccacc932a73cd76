# Two entry points (see README): `make demo` and `make test`. Each sets up its virtual environment on first use
# (re-synced when pyproject.toml or the lock file changes) and runs inside it. `make test-compat` runs the same suite
# on the oldest transformers that pyproject.toml allows and on the newest 5.x on the index; CI runs both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Exact versions of everything `make test` installs; `make lock` regenerates it from a fresh environment.
LOCK := requirements/lock.txt
# The original implementations, numerical oracles of the parity tests, installed without their stale requirements:
# unilm BEiT-3 with its torchscale / fairscale pins, and OpenAI's DALL-E dVAE.
ORACLE := beit3-gml==0.1.3 torchscale==0.3.0 fairscale==0.4.0 dall-e==0.1
# The transformers floor, read from pyproject.toml (`transformers>=X,<6`), so the two cannot drift apart.
TRANSFORMERS_FLOOR := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\),<6",*$$/\1/p' pyproject.toml)
COMPAT_VENVS := .venv-floor .venv-latest
PYTEST_ARGS ?=
# transformers' common model tests (tests/test_common.py) come from the sdist of the installed transformers, fetched
# from the package index at install time into ~/.cache/beit3-hf, so that the test run itself stays offline.
FETCH_COMMON_TESTS := -c "import sys; sys.path[:0] = ['tests']; import test_common"
LINT_PATHS := src tests benchmarks examples scripts

.PHONY: demo test test-all test-compat lint format bench lock clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

$(VENV)/.test-installed: $(VENV)/.created pyproject.toml $(LOCK)
	$(PIP) install -q -c $(LOCK) -e ".[test]"
	$(PIP) install -q -c $(LOCK) --no-deps --no-build-isolation $(ORACLE)
	$(PY) $(FETCH_COMMON_TESTS)
	touch $@

$(VENV)/.demo-installed: $(VENV)/.created pyproject.toml $(LOCK)
	$(PIP) install -q -c $(LOCK) -e ".[train]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) examples/demo/run_demo.py

test: $(VENV)/.test-installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.test-installed
	$(PY) -m pytest $(PYTEST_ARGS)

# The compatibility environments use the main environment's torch stack (scripts/share_torch.py: links, not a second
# and third 5.5 GB copy, which ran a CI machine out of disk) pinned by the lock, and let pip resolve the rest around
# the transformers under test.
.venv-floor/.installed: pyproject.toml $(LOCK) $(VENV)/.test-installed
	rm -rf .venv-floor && $(PYTHON) -m venv .venv-floor
	.venv-floor/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(PY) scripts/share_torch.py .venv-floor
	grep -E '^(torch|torchvision)==' $(LOCK) > .venv-floor/torch.txt
	.venv-floor/bin/python -m pip install -q -c .venv-floor/torch.txt -e ".[test]" "transformers==$(TRANSFORMERS_FLOOR)"
	.venv-floor/bin/python -m pip install -q --no-deps --no-build-isolation $(ORACLE)
	.venv-floor/bin/python $(FETCH_COMMON_TESTS)
	touch $@

.venv-latest/.installed: pyproject.toml $(LOCK) $(VENV)/.test-installed
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(PY) scripts/share_torch.py .venv-latest
	touch $@

test-compat: .venv-floor/.installed .venv-latest/.installed
	@# "The newest 5.x on the index" is looked up on every run, not frozen at the environment's creation. The second
	@# install puts that release itself in place even when the index lacks one of its new requirements, where the
	@# resolver would silently settle on an older release (5.25.0 needs kernels>=0.19.1, which the CI index lacks);
	@# `pip check` then names what is missing.
	grep -E '^(torch|torchvision)==' $(LOCK) > .venv-latest/torch.txt
	.venv-latest/bin/python -m pip install -q --upgrade -c .venv-latest/torch.txt -e ".[test]" "transformers>=5,<6"
	.venv-latest/bin/python -m pip install -q --upgrade --no-deps "transformers>=5,<6"
	.venv-latest/bin/python -m pip check || echo "warning: .venv-latest lacks requirements of its transformers (above)"
	.venv-latest/bin/python -m pip install -q --no-deps --no-build-isolation $(ORACLE)
	.venv-latest/bin/python $(FETCH_COMMON_TESTS)
	@# transformers >= 5.25 turns Hub kernels on in every from_pretrained and raises when the `kernels` package is
	@# missing (the CI index lacks the kernels >= 0.19.1 it requires); BEiT-3 has no kernel layers, so a run without a
	@# usable package turns them off (USE_HUB_KERNELS=0) and says so.
	@for venv in $(COMPAT_VENVS); do \
		echo "== $$venv: transformers $$($$venv/bin/python -c 'import transformers; print(transformers.__version__)')"; \
		kernels=; $$venv/bin/python -c "from transformers.utils import is_kernels_available as k; assert k()" \
			2>/dev/null || { kernels=0; echo "   no usable kernels package: USE_HUB_KERNELS=0"; }; \
		USE_HUB_KERNELS=$${kernels:-1} $$venv/bin/python -m pytest -m "not slow" -q $(PYTEST_ARGS) || exit 1; \
	done

lint: $(VENV)/.test-installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

format: $(VENV)/.test-installed
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

bench: $(VENV)/.test-installed
	$(PY) benchmarks/throughput.py

# Regenerate the lock from a fresh environment resolved from pyproject.toml alone.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	{ echo "# Exact versions of every package \`make test\` installs (pip constraints). Regenerate with \`make lock\`."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(COMPAT_VENVS) .pytest_cache .ruff_cache
