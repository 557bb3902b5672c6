# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(BIN)/python:
	@echo "creating the virtual environment $(VENV) and upgrading pip in it: under a minute"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar on --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	@echo "installing gradpipe and its dependencies (dask, zarr, prefect, pyarrow...) into $(VENV): about 3 minutes on a fresh machine"
	$(BIN)/pip install --progress-bar on -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	@echo "installing gradpipe with its dev extras into $(VENV): about 3-4 minutes on a fresh machine"
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@ $(STAMP_RUN)

DEMO_RAW := data/raw/demo

demo: $(STAMP_RUN)
	@test -f $(DEMO_RAW)/truth.json || echo "writing the demo data (1,000,000 rows × 20 features, 8 CSV files) to $(DEMO_RAW): it may take a minute"
	test -f $(DEMO_RAW)/truth.json || $(BIN)/gradpipe make-data --kind linear --rows 1000000 --features 20 \
		--files 8 --format csv --out $(DEMO_RAW)
	$(BIN)/gradpipe run

lint: $(STAMP_DEV)
	$(BIN)/ruff check .

test: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=20

bench: $(STAMP_DEV)
	@echo "installing the bench extras (dask-ml) into $(VENV): a few minutes the first time"
	$(BIN)/pip install --quiet --progress-bar on -e '.[dev,bench]'
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/solvers.py
	$(BIN)/python bench/tune.py
	$(BIN)/python bench/object_store.py

clean:
	rm -rf $(VENV) data/datasets data/runs data/raw data/models
