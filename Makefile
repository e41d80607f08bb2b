# hhlink: two commands on a fresh machine (Python 3.11):
#   make demo   - install into .venv, then run the main job on the default synthetic population
#   make test   - install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKSPACE ?= workspace

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,spark]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

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

test: $(STAMP)
	bash scripts/ensure-chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.ladder

clean:
	rm -rf $(WORKSPACE) .pytest_cache
