# terradapt: `make demo` (embedded, no services) and `make test` (real services + every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVICES := bash deploy/local/services.sh
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-unit lint system-deps services-install services-up services-down services-status \
	torchserve-up torchserve-down docs bench-extras bench fuzz clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/terradapt demo

## make test: install, lint (ruff + mypy over packages, tests, bench), provision + start the real services,
## run every test, stop the services
## (TorchServe and Prometheus tests start their own servers on free loopback ports)
test: install services-install lint
	@$(SERVICES) up kafka minio; \
	eval "$$($(SERVICES) env)"; status=0; \
	$(PY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	$(SERVICES) down; exit $$status

test-unit: install
	$(PY) -m pytest -m "not services and not docs" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check terradapt stream serving adapters monitoring tests bench
	$(VENV)/bin/ruff format --check terradapt stream serving adapters monitoring tests bench
	$(VENV)/bin/mypy

## Debian packages the tests use: headless Chromium (dashboard screenshot); Prometheus comes with services-install
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

services-install: system-deps
	$(SERVICES) install all

services-up: services-install
	$(SERVICES) up kafka minio prometheus

services-down:
	$(SERVICES) down

services-status:
	$(SERVICES) status

torchserve-up: install
	bash deploy/torchserve/torchserve.sh start

torchserve-down:
	bash deploy/torchserve/torchserve.sh stop

## make fuzz: the fuzz tests (records, raster bytes, pipeline) with many more, randomly seeded examples
## (FUZZ_SCALE times the bounded, derandomized set that make test runs; a failure prints its seed and blob)
FUZZ_SCALE ?= 40
fuzz: install
	OMP_NUM_THREADS=1 TERRADAPT_HYPOTHESIS_PROFILE=fuzz TERRADAPT_FUZZ_SCALE=$(FUZZ_SCALE) \
		$(PY) -m pytest -m fuzz --timeout 3600 $(PYTEST_ARGS)

docs: install system-deps
	TERRADAPT_WRITE_DOCS=1 $(PY) -m pytest -m docs tests/test_dashboard.py

## benchmark-only extras: River in the project venv; alibi-detect pins numpy<2 while River needs numpy>=2.2.5,
## so it gets a venv of its own (.venv-alibi, torch from pip's cache) that bench/drift.py calls
ALIBI_VENV := .venv-alibi
bench-extras: install
	$(PY) -m pip install -q 'river==0.26.1'
	@test -x $(ALIBI_VENV)/bin/python || $(PYTHON) -m venv $(ALIBI_VENV)
	$(ALIBI_VENV)/bin/python -m pip install -q 'numpy<2' 'alibi-detect[torch]==0.13.0'

bench: install bench-extras
	$(PY) bench/serving.py
	$(PY) bench/model_serving.py
	$(PY) bench/drift.py
	$(PY) bench/adaptation.py
	$(PY) bench/selection.py
	$(PY) bench/stream.py
	$(PY) bench/crops_tuning.py
	$(PY) bench/crops.py

clean:
	rm -rf .terradapt report .pytest_cache .mypy_cache .ruff_cache
