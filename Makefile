# `make demo`: set up and run the whole pipeline on the embedded demo config (CPU, minutes).
# `make test`: set up and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test clean-results

setup: $(STAMP)

$(STAMP): envs/cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/cpu.txt
	# PyPI's torchvision/torchaudio/torchcodec that vLLM pulls are built for another torch and
	# break imports; text models need none of them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/snakemake --configfile config/config.yaml
	@cat results/report/results.md

test: setup
	$(BIN)/python -m pytest

clean-results:
	rm -rf results mlflow.db
