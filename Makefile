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
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hhlink generate --workspace $(WORKSPACE)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.ladder

clean:
	rm -rf $(WORKSPACE) .pytest_cache
