# prunelab — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv train test test-slow lint format sweep report regress ui bench docs docs-serve clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(PY) || { echo "make venv: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "make venv: installing prunelab and its pinned dependencies (constraints.txt: torch, Lightning, MLflow, ...)"
	@echo "make venv: the first time this downloads and unpacks several GB and takes minutes; pip lists each package"
	set -o pipefail; $(PIP) install --progress-bar off -c constraints.txt -e '.[dev,ray]' \
	  | { grep --line-buffered -E '^(Collecting|Installing|Successfully)' || true; }
	@touch $(STAMP)
	@echo "make venv: ready ($(VENV))"

venv: $(STAMP) ## create the virtual environment (pinned by constraints.txt) if missing

train: $(STAMP) ## run the main job: mnist5k + lenet5 + gradual magnitude pruning at 8×, recorded in MLflow (ARGS=overrides)
	$(PY) -m prunelab.train $(ARGS)

test: $(STAMP) ## run the tests (without the slow ones), one pytest-xdist worker per CPU core
	$(PY) -m pytest -q -p no:cacheprovider -n auto

test-slow: $(STAMP) ## run only the slow tests
	$(PY) -m pytest -q -p no:cacheprovider -m slow

lint: $(STAMP) ## ruff: lint and format checks, changing nothing (rules: pyproject.toml [tool.ruff])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff: fix what the lint rules can fix, then format every file
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

sweep: $(STAMP) ## the default sweep: every method × ratios 2–64 × mnist5k, digits; report on the parent run
	$(PY) -m prunelab.train sweep=default $(ARGS)

report: $(STAMP) ## rebuild the latest sweep's report into outputs/reports/<sweep id>/ (ARGS="--sweep-id <id>")
	$(PY) -m prunelab.tracking.sweeps.report $(ARGS)

regress: $(STAMP) ## regression gate: run the fixed grid, compare with regress/baseline.json, exit 1 on a regression
	$(PY) -m prunelab.tracking.sweeps.regress $(ARGS)

ui: $(STAMP) ## serve the MLflow UI for the local store on http://127.0.0.1:5000 (prints the page to open)
	$(PY) -m prunelab.tracking.server.ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/outputs/mlflow.db}" $(ARGS)

bench: $(STAMP) ## time `make train` with a fresh and with a cached dense baseline
	$(PY) bench/train_time.py

docs: $(STAMP) ## build the documentation site into site/ (mkdocs build --strict: broken links and pages off the nav fail)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP) ## serve the documentation on http://127.0.0.1:8000, rebuilt on every save
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8000

clean: ## remove outputs (runs, MLflow store, dense cache); keeps the venv
	rm -rf outputs
