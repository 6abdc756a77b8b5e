# darkroom: the two commands (make demo, make test) each set up .venv on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo ui test test-fast bench lint format docs docs-serve clean

# Installs the exact versions of constraints.txt (see docs/dependencies.md); reinstalls when
# either file changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

## Run the whole job on the embedded default: digits -> retrain -> score (local folder storage)
demo: $(STAMP)
	$(BIN)/darkroom demo --storage file://./data/bucket --cache-dir ./data/cache

## Serve the three deployments with the Prefect UI on http://127.0.0.1:4200 (starts a local
## server with SQLite when none runs there; Ctrl-C stops what it started)
ui: $(STAMP)
	$(BIN)/darkroom serve --demo --storage file://./data/bucket --cache-dir ./data/cache

## Run every test (unit, S3 on a local moto server, Prefect flows, end to end)
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

## Skip the tests marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## Measure throughput ratios side by side (training, scoring, sync, the demo's retrain);
## writes benchmarks/results/bench-<host>-<date>.json. BENCH_ARGS=--quick for a short check.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

## Build the documentation site into site/ (mkdocs.yml; --strict: a broken link or a missing
## page fails the build)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

## Serve the documentation on http://127.0.0.1:8000, rebuilt as you edit docs/
docs-serve: $(STAMP)
	$(BIN)/mkdocs serve -a 127.0.0.1:8000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/house_limits.py
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf data .pytest_cache site
