# cbmflow: the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
# otb-bin: the independent calibration/noise oracle of the CARD-BS tests; chromium(-driver): the
# explorer's browser test (tests/e2e/test_explorer.py).
DEB_PACKAGES := postgresql-15 postgresql-15-postgis-3 rabbitmq-server cloud-init systemd proj-data otb-bin chromium chromium-driver
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages venv demo test test-unit lint typecheck bench bench-extract bench-api bench-card bench-chain chaos clean stack-down

setup: system-packages venv

# Debian packages: installed only when missing. policy-rc.d keeps apt from auto-starting the
# distribution's own RabbitMQ/PostgreSQL services: cbmflow runs its own, unprivileged, on loopback.
system-packages:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	  rc=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check cbmflow catalog_watcher provisioner worker card api tests

typecheck: venv
	$(BIN)/mypy

# Every layer: unit (no servers), integration (PostgreSQL, RabbitMQ, S3 endpoint), e2e (chain, faults, boot).
test: setup lint typecheck
	$(BIN)/pytest -q

# The unit layer alone: no Debian packages, no servers (a laptop is enough).
test-unit: venv
	$(BIN)/pytest -q tests/unit

demo: setup
	$(BIN)/cbmflow demo

bench: bench-extract bench-api

bench-extract: setup
	$(PY) -m cbmflow.dev.bench.extract

bench-api: setup
	@dpkg -s wrk >/dev/null 2>&1 || { $(SUDO) apt-get update -qq; DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends wrk; }
	$(PY) -m cbmflow.dev.bench.api

# Sentinel-1 CARD generation (GRD -> CARD-BS, SLC pair -> CARD-COH) against sarsen, 1 and 2 cores.
bench-card: setup
	$(PY) -m cbmflow.dev.bench.card $(BENCH_ARGS)

# A national-scale rehearsal (the Netherlands' season) through the real chain; BENCH_ARGS=--scale 0.1
bench-chain: setup
	$(PY) -m cbmflow.dev.bench.chain $(BENCH_ARGS)

# Minutes, bounded: the chain at 50 scenes x 5,000 parcels under a seeded schedule of faults, on
# servers of its own; prints the faults and the tally (docs/reliability.md). CHAOS_ARGS=--seed 7 ...
chaos: setup
	$(PY) -m cbmflow.dev.chaos $(CHAOS_ARGS)

stack-down: venv
	$(BIN)/cbmflow stack down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
