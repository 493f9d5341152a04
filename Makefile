# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ROOT ?= $(CURDIR)/.run
BIND ?= 127.0.0.1:8080
# make run: HW=real runs the real modprobe and reboot; SYSROOT=DIR reads host facts from a
# fixture tree (needed as root, see scripts/dev-run).
HW ?= dev
SYSROOT ?=
# make dist: the release tree `spk-visor ota build --daemon-tree` packs.
DIST ?= $(CURDIR)/dist/smechvisord
VERSION ?=
NODE_PYTHON ?= /usr/bin/python3
# Extra pytest arguments, e.g. PYTEST_ARGS=--randomly-seed=123 to replay an order.
PYTEST_ARGS ?=

.PHONY: run dist test lint unit integration bench man sysdeps venv format clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# A development run in the foreground, no root needed: state, sockets and token under
# .run/; modprobe and reboot are logged, not run; `. .run/env` points spk-visor at it.
run: $(STAMP)
	$(PY) scripts/dev-run --bind '$(BIND)' --run-root '$(RUN_ROOT)' --hw '$(HW)' \
		$(if $(SYSROOT),--sysroot '$(SYSROOT)')

# The daemon's release tree from this checkout (bin/smechvisord, lib/, VERSION).
dist:
	$(PYTHON) scripts/build-dist --out '$(DIST)' --python '$(NODE_PYTHON)' \
		$(if $(VERSION),--version '$(VERSION)')

# Debian packages the integration tests use (as root); a no-op with a note otherwise.
sysdeps:
	scripts/install-sysdeps

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	# Commands without a .py suffix: one mypy run each (each is a __main__ module).
	for f in scripts/dev-run scripts/dev-noop scripts/build-dist; do \
		$(VENV)/bin/mypy --strict --no-error-summary "$$f" || exit 1; done

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Random order (pytest-randomly); the seed line replays it: PYTEST_ARGS=--randomly-seed=N.
test: $(STAMP) sysdeps lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

integration: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests/integration

# Every property test (marked `fuzz`), with the long hypothesis profile; `make test` runs
# the same tests with a bounded number of examples.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m fuzz -q

bench: $(STAMP)
	$(PY) -m bench.daemon
	$(PY) -m bench.daemon_hostile
	$(PY) -m bench.cli
	$(PY) -m bench.ota
	$(PY) -m bench.deploy

# Regenerates the committed man pages from the code; tests/unit/test_man_pages.py fails
# when they drift.
man: $(STAMP)
	$(PY) scripts/gen-man

clean:
	rm -rf $(VENV) $(RUN_ROOT) dist .pytest_cache .mypy_cache .ruff_cache

# The SmechVisor base image (as root): make image ROOT=root.json [VMM=cloud-hypervisor]
# [IMAGE=build/smechvisor-base.img]. Cached by its inputs under .cache/image; docs/image.md.
.PHONY: image
IMAGE ?= build/smechvisor-base.img
image: $(STAMP)
	@test -n "$(ROOT)" || { echo "make image: set ROOT=FILE (the OTA root.json to bake in)" >&2; exit 2; }
	$(PY) -m spk_visor image build --root '$(ROOT)' --out '$(IMAGE)' $(if $(VMM),--vmm '$(VMM)')
