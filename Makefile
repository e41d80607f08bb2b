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

# The main job: a synthetic population through every stage. The key lives outside the
# workspace; the demo creates one (0600) the first time.
demo: $(STAMP)
	test -f $(KEY_FILE) || $(VENV)/bin/hhlink keys init --key-file $(KEY_FILE)
	$(VENV)/bin/hhlink generate --workspace $(WORKSPACE)
	$(VENV)/bin/hhlink ingest --workspace $(WORKSPACE)
	HHLINK_KEY_FILE=$(KEY_FILE) $(VENV)/bin/hhlink pseudonymise --workspace $(WORKSPACE)
	$(VENV)/bin/hhlink link --workspace $(WORKSPACE)
	HHLINK_KEY_FILE=$(KEY_FILE) $(VENV)/bin/hhlink evaluate --workspace $(WORKSPACE)
	@echo "outputs in $(WORKSPACE)/: landing/ staged/ quarantine/ pseudonymised/ linked/; reports in $(WORKSPACE)/reports/ (quality/, linkage/report.html, evaluation.json)"

test: $(STAMP)
	bash scripts/ensure-chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.ladder

clean:
	rm -rf $(WORKSPACE) .pytest_cache
