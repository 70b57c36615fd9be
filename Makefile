# Set-up, demo and tests. `make demo` and `make test` create .venv when missing and install
# the exact versions of requirements-dev.txt into it, so both work on a fresh machine.
PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# This machine's pip prints a warning per package for its local index; keep real errors only.
QUIET_PIP := 2>&1 | { grep -v '^WARNING: Location' || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt $(QUIET_PIP)
	$(BIN)/pip install --quiet --no-deps -e . $(QUIET_PIP)
	$(BIN)/python -c "import trainer, data_pipelines, torch, pytorch_lightning, omegaconf"
	touch $(STAMP)

# Generates the bundled sample data (deterministic), trains a small ResNet on the CPU (about
# a minute on 2 cores once .venv exists), and prints the val top-1 and where the checkpoint is.
demo: setup
	test -d data/sample/train || $(BIN)/imagenet-trainer sample-data data/sample --train-per-class 200 --val-per-class 50
	$(BIN)/imagenet-trainer fit experiment=demo data.root=data/sample

# Everything (CI's .ci/run runs this): the subprocess fits, DDP and the SLURM cluster included.
test: setup
	$(BIN)/python -m pytest tests

# The fast tier, between commits: every test not marked slow (pytest.ini), about 2 min on 2 cores.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" tests

clean:
	rm -rf $(VENV) runs data/sample .pytest_cache
