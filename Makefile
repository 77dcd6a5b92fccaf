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
	$(BIN)/python -m pytest tests/integration -q --durations=25

unit: setup
	$(BIN)/python -m pytest tests/unit -q

integration: setup
	$(BIN)/python -m pytest tests/integration -q --durations=25

MLFLOW_DIR  ?= $(CURDIR)/outputs/mlflow
MLFLOW_PORT ?= 5000
# A real MLflow server on 127.0.0.1 (SQLite backend, artifacts served through the server). Job execution is
# off: it would start 7 background workers, too many for a 2-core box and not needed for tracking.
mlflow: setup
	mkdir -p $(MLFLOW_DIR)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
		--backend-store-uri sqlite:///$(MLFLOW_DIR)/mlflow.db \
		--artifacts-destination $(MLFLOW_DIR)/mlartifacts --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

clean:
	rm -rf outputs .pytest_cache
