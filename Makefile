# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TESTSTAMP := $(VENV)/.test-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

$(TESTSTAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	bash scripts/install-system-deps.sh
	bash scripts/install-cluster-deps.sh
	touch $@

install: $(STAMP)

demo: $(STAMP)
	bash scripts/install-system-deps.sh --demo || echo "make demo: bubblewrap could not be installed; the demo runs its kernel unsandboxed"
	$(BIN)/python -m handoff_magic.demo

# ruff + mypy, configured in pyproject.toml. From a checkout that borrows another venv:
#   make lint VENV=/path/to/.venv TESTSTAMP=     (TESTSTAMP= skips the install step)
lint: $(TESTSTAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: that is a broken suite, said out loud.
# PYTEST_ARGS narrows a local run, e.g. make test PYTEST_ARGS="-m unit".
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || { rc=$$?; [ $$rc -ne 5 ] || \
	  echo "make test: pytest collected no tests (exit 5): check testpaths and the tests/ tree" >&2; exit $$rc; }

bench: $(STAMP)
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/handoff.py
	$(BIN)/python benchmarks/load.py

clean:
	rm -rf $(VENV) build *.egg-info
