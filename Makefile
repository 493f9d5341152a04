# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ROOT := $(CURDIR)/.run
BIND ?= 127.0.0.1:8080

.PHONY: run test lint unit integration bench man sysdeps venv format clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Starts the daemon in the foreground, no root needed: state, sockets and token under .run/.
run: $(STAMP)
	mkdir -p $(RUN_ROOT)
	$(VENV)/bin/smechvisord --bind $(BIND) \
		--state-dir $(RUN_ROOT)/state --run-dir $(RUN_ROOT)/run \
		--token-file $(RUN_ROOT)/token

# Debian packages the integration tests use (as root); a no-op with a note otherwise.
sysdeps:
	scripts/install-sysdeps

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) sysdeps lint
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

# The property tests of tests/hostile, long: HYPOTHESIS_PROFILE=fuzz (tests/hostile/conftest.py).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/hostile/test_fuzz_parsers.py -q

bench: $(STAMP)
	$(PY) -m bench.daemon
	$(PY) -m bench.cli
	$(PY) -m bench.ota
	$(PY) -m bench.deploy

# Regenerates the committed man pages from the code; tests/unit/test_man_pages.py fails
# when they drift.
man: $(STAMP)
	$(PY) scripts/gen-man

clean:
	rm -rf $(VENV) $(RUN_ROOT) .pytest_cache .mypy_cache .ruff_cache
