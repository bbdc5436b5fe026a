# Two commands set up and use mnn on a fresh machine:
#   make train   creates .venv, installs mnn with MPI from PyPI, trains on 2 ranks
#   make test    runs every test: the serial suite, then the MPI suite on 1, 2 and 3 ranks
#   make docs    builds the API reference with the rendered math into docs/_build/html
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
RANKS ?= 2
# The job is examples/digits.toml; TRAIN_ARGS adds or overrides options, e.g.
#   make train RANKS=3 TRAIN_ARGS="--epochs 20"
TRAIN_ARGS ?=
TRAIN_OUTPUT ?= runs/digits

.PHONY: setup train test test-serial test-mpi bench docs clean

# One BLAS thread per process in the tests: several ranks share the cores, and
# BLAS threads on top of them only make every rank slower.
test-serial test-mpi: export OMP_NUM_THREADS = 1
test-serial test-mpi: export OPENBLAS_NUM_THREADS = 1

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[mpi,data,test]'
	touch $@

train: setup
	$(BIN)/mnn-launch -n $(RANKS) -- $(BIN)/mnn-train --config examples/digits.toml --output $(TRAIN_OUTPUT) $(TRAIN_ARGS)

test: test-serial test-mpi

test-serial: setup
	$(PY) -m pytest -q tests --ignore=tests/mpi

# Each MPI test runs on every rank; pytest-mpi skips those needing more ranks.
test-mpi: setup
	for n in 1 2 3; do \
	  echo "== MPI suite on $$n rank(s)"; \
	  $(BIN)/mpiexec -n $$n $(PY) -m pytest -q --with-mpi -p no:cacheprovider tests/mpi || exit 1; \
	done

bench: setup
	$(BIN)/mnn-bench

# Sphinx is an optional extra ("docs"), installed into the venv on first use.
# -W: a docstring that does not parse fails the build instead of rendering wrong.
# MathJax comes from a CDN; to read offline, point MNN_MATHJAX_PATH at a local
# tex-mml-chtml.js (see docs/conf.py).
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

clean:
	rm -rf $(VENV) runs build *.egg-info docs/_build docs/api
