# Two commands: `make demo` and `make test` (`make test-fast` leaves out the tests marked slow). All create .venv
# when absent and reinstall only when pyproject.toml or requirements.lock changed (the stamp file).
PY ?= python3
# The embedded Prefect server sends no usage telemetry (machines here reach only package indexes)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean qgis

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the wheel is on local disk (a bare `torch` would pull several GB)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geo-dino run --config configs/demo.yaml
	$(BIN)/geo-dino run --config configs/demo_change.yaml
	$(BIN)/geo-dino change --config configs/demo_taizhou_change.yaml

# PYTEST_ARGS: extra pytest options (.ci/run asks for the slowest durations); the suite's wall time is printed last
PYTEST_ARGS ?=
test: $(STAMP) qgis
	@start=$$(date +%s); $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; \
	echo "test suite took $$(( $$(date +%s) - start )) s"; exit $$rc

# the suite without the tests marked slow (end-to-end training, CLI and Prefect runs, mypy, real QGIS): a few
# minutes on two cores; `make test` still runs everything
test-fast: $(STAMP)
	@start=$$(date +%s); $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS) tests; rc=$$?; \
	echo "fast test tier took $$(( $$(date +%s) - start )) s"; exit $$rc

# Real QGIS for the tests that open the outputs: Debian's python3-qgis under /usr/bin/python3 (installed when
# missing and we are root with apt; otherwise those tests are skipped outside CI).
qgis:
	@/usr/bin/python3 -c "import qgis.core" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing QGIS (python3-qgis) for the QGIS tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-qgis qgis-providers >/dev/null; \
	  else echo "QGIS (python3-qgis) not installed: the QGIS tests will be skipped"; fi; }

# the style checks alone (the test suite runs them too: tests/test_lint.py)
lint: $(STAMP)
	$(BIN)/python -m ruff check geo_dino flows tests bench
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/e2e.py

clean:
	rm -rf runs .pytest_cache
