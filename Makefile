# hhlink: two commands on a fresh machine (Python 3.11):
#   make demo   - install hhlink into .venv (no test or Spark extras), then run the main job
#   make test   - install hhlink with its test and Spark extras into .venv, then run the tests
# Every install takes the versions in constraints.txt (the tested set; `make constraints`
# rewrites it from .venv). A stamp names the inputs' checksum, so editing pyproject.toml or
# constraints.txt reinstalls.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONSTRAINTS = constraints.txt
INPUTS  = $(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)
STAMP   = $(VENV)/.installed-run-$(INPUTS)
STAMP_TEST = $(VENV)/.installed-test-$(INPUTS)
PIP     = $(PY) -m pip install -q -c $(CONSTRAINTS)
WORKSPACE ?= workspace

.PHONY: demo test bench install install-test constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) pip
	$(PIP) -e .
	rm -f $(VENV)/.installed-run-* && touch $(STAMP)

$(STAMP_TEST): $(STAMP)
	$(PIP) -e ".[test,spark]"
	rm -f $(VENV)/.installed-test-* && touch $(STAMP_TEST)

install: $(STAMP)

install-test: $(STAMP_TEST)

# After changing dependencies and passing the tests: pin what .venv holds.
constraints: $(STAMP_TEST)
	$(PY) scripts/lock-constraints $(CONSTRAINTS)

KEY_FILE ?= $(HOME)/.config/hhlink/master.key

# The main job: the default synthetic population (hhlink.toml: 20,000 persons, seed 42) through
# every stage as the Prefect flow household-linkage (`hhlink run`), which prints where the
# outputs and reports are. The key lives outside the workspace; the demo creates one (0600)
# the first time. A second `make demo` skips every stage whose inputs are unchanged.
PERSONS ?= 20000
SEED    ?= 42
demo: $(STAMP)
	test -f $(KEY_FILE) || $(VENV)/bin/hhlink keys init --key-file $(KEY_FILE)
	$(VENV)/bin/hhlink run --workspace $(WORKSPACE) --persons $(PERSONS) --seed $(SEED) --key-file $(KEY_FILE)

# PYTEST_ARGS: extra pytest arguments (.ci/run passes --durations so each CI log shows the slowest tests)
PYTEST_ARGS ?=
# Two pytest-xdist workers, one a core: much of the suite is single-threaded Python (Splink's and
# Prefect's orchestration, pandas, subprocesses starting up), so one process leaves a core idle.
# loadfile keeps each module in one worker, and tests/conftest.py's scheduler keeps the modules
# that share an expensive session fixture together and orders the groups longest first (which
# --no-loadscope-reorder keeps). XDIST= runs the tests in one process.
XDIST   ?= -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP_TEST)
	bash scripts/ensure-chromium
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

bench: $(STAMP_TEST)
	$(PY) -m bench.ladder

clean:
	rm -rf $(WORKSPACE) .pytest_cache
