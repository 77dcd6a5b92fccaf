# Quick start: `make demo` (set up + train the embedded default) and `make test` (set up + all tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test unit integration mlflow clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/orpo-ray train configs/demo.yaml

# Fast unit tests first (seconds), then integration tests (real Ray, real MLflow server, subprocesses).
test: setup
	$(BIN)/python -m pytest tests/unit -q
	$(BIN)/python -m pytest tests/integration -q

unit: setup
	$(BIN)/python -m pytest tests/unit -q

integration: setup
	$(BIN)/python -m pytest tests/integration -q

MLFLOW_DIR  ?= $(CURDIR)/outputs/mlflow
MLFLOW_PORT ?= 5000
mlflow: setup
	mkdir -p $(MLFLOW_DIR)
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(MLFLOW_DIR)/mlflow.db \
		--default-artifact-root $(MLFLOW_DIR)/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

clean:
	rm -rf outputs .pytest_cache
