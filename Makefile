# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ROOT := $(CURDIR)/.run
BIND ?= 127.0.0.1:8080

.PHONY: run test lint unit integration bench man sysdeps venv format clean

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

# The SmechVisor base image (as root): make image ROOT=root.json [VMM=cloud-hypervisor]
# [IMAGE=build/smechvisor-base.img]. Cached by its inputs under .cache/image; docs/image.md.
.PHONY: image
IMAGE ?= build/smechvisor-base.img
image: $(STAMP)
	@test -n "$(ROOT)" || { echo "make image: set ROOT=FILE (the OTA root.json to bake in)" >&2; exit 2; }
	$(PY) -m spk_visor image build --root '$(ROOT)' --out '$(IMAGE)' $(if $(VMM),--vmm '$(VMM)')
