# `make demo`: set up and run the whole pipeline on the embedded demo config (CPU, minutes).
# `make test`: set up and run the fast tier of the test suite (minutes; docs/testing.md).
# `make test-all`: set up and run every test, the slow end-to-end ones too (what CI runs; two parts, below).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the submitting side of a SLURM run (Snakemake + its SLURM executor; see envs/slurm.txt)
SLURM_VENV ?= .venv-slurm
SLURM_STAMP := $(SLURM_VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-all clean-results

setup: $(STAMP) $(SLURM_STAMP)

$(SLURM_STAMP): envs/slurm.txt pyproject.toml
	test -x $(SLURM_VENV)/bin/python || $(PYTHON) -m venv $(SLURM_VENV)
	$(SLURM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SLURM_VENV)/bin/python -m pip install --quiet -r envs/slurm.txt
	$(SLURM_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(SLURM_STAMP)

$(STAMP): envs/cpu.txt envs/verl-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/cpu.txt
	# verl's CPU-importable modules for the tests: its base dependencies (held to envs/cpu.txt's
	# versions), then verl itself without its transformers pin (see envs/verl-cpu.txt)
	grep -v '^verl==' envs/verl-cpu.txt | $(BIN)/python -m pip install --quiet -c envs/cpu.txt -r /dev/stdin
	$(BIN)/python -m pip install --quiet --no-deps $$(grep '^verl==' envs/verl-cpu.txt)
	# PyPI's torchvision/torchaudio/torchcodec that vLLM pulls are built for another torch and
	# break imports; text models need none of them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# scikit-learn (and skops), which mlflow pulls for its sklearn model flavour: nothing here uses
	# them, but transformers imports scikit-learn whenever it is installed, about 1.2 s of every
	# process's start on 2 cores (each stage, and each of a verl run's ten or so processes).
	$(BIN)/python -m pip uninstall --quiet --yes scikit-learn skops
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/snakemake --cores 2 --configfile config/config.yaml
	@cat results/report/results.md

test: setup
	$(BIN)/python -m pytest -m "not slow"

# Every test in two parts: first all but the `solo` ones, over two worker processes (pytest-xdist,
# one test file per worker at a time, the long files first: tests/conftest.py), then the `solo`
# ones, alone. Both parts run whatever the first's outcome; either failing fails the target.
test-all: setup
	status=0; \
	$(BIN)/python -m pytest -m "not solo" -n 2 --dist loadfile --no-loadscope-reorder || status=$$?; \
	$(BIN)/python -m pytest -m solo || status=$$?; \
	exit $$status

clean-results:
	rm -rf results mlflow.db
