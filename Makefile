# metalab: `make demo` runs the embedded default (MAML on sinusoids, tracked in ./mlflow.db);
# `make test` runs the test suite. Both set up `.venv` first; a second `make setup` is a no-op.
# Paths are the checkout's, so `make -f <checkout>/Makefile demo` from another folder runs there (the tests do).
ROOT   := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV   := $(ROOT)/.venv
BIN    := $(VENV)/bin
CACHE  := $(ROOT)/.cache/learn2learn
STAMP  := $(VENV)/.metalab-installed
HOST   ?= 127.0.0.1
PORT   ?= 5000
PYTEST_ARGS ?=
# `make test`'s pytest-xdist worker processes (most tests wait on a child process that keeps one core busy);
# TEST_WORKERS=0 runs the suite in one process (for `pdb`, `-s`).
TEST_WORKERS ?= 2
ARGS ?=          # overrides for `make demo`, e.g. ARGS="trainer.max_steps=100"

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-slow test-all lint ui lock clean

setup: $(STAMP)

# Re-run only when what defines the environment changes.
$(STAMP): $(ROOT)/pyproject.toml $(ROOT)/requirements/lock.txt $(ROOT)/scripts/build_learn2learn.py \
          $(ROOT)/scripts/build_qpth.py $(ROOT)/platform/hydra_plugins/metalab_optuna_sweeper.py
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else "metalab needs Python 3.11, found %d.%d: run `make PYTHON=python3.11 setup`" % v)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(ROOT)/requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps "$$($(BIN)/python $(ROOT)/scripts/build_learn2learn.py $(CACHE))"
	$(BIN)/python -m pip install --quiet --no-deps "$$($(BIN)/python $(ROOT)/scripts/build_qpth.py $(ROOT)/.cache/qpth)"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable $(ROOT)
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/metalab-train $(ARGS)

test: setup
	cd $(ROOT) && $(BIN)/ruff check platform tests scripts benchmarks
	cd $(ROOT) && $(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The long end-to-end runs (marked slow); .ci/run runs them after `make test`.
test-slow: setup
	cd $(ROOT) && $(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: setup
	cd $(ROOT) && $(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	cd $(ROOT) && $(BIN)/ruff check platform tests scripts benchmarks

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port $(PORT)

# Re-resolve the pinned set from pyproject.toml in a scratch venv (needs the package registry).
lock:
	rm -rf .cache/lock-venv
	$(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet Cython setuptools wheel hatchling
	.cache/lock-venv/bin/python -m pip install --quiet "$$(.cache/lock-venv/bin/python scripts/build_learn2learn.py $(CACHE))"
	.cache/lock-venv/bin/python -m pip install --quiet "$$(.cache/lock-venv/bin/python scripts/build_qpth.py .cache/qpth)"
	.cache/lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,2p' requirements/lock.txt; .cache/lock-venv/bin/python -m pip freeze --all \
	  | grep -ivE '^(learn2learn|qpth|metalab|pip)[= ]|^-e '; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt
	rm -rf .cache/lock-venv

clean:
	cd $(ROOT) && rm -rf $(VENV) .cache outputs multirun .pytest_cache
