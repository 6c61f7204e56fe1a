# Two entry points for a fresh machine (see README):
#   make quickstart   install, then run the quickstart pipeline (local Ray, local MLflow, synthetic data, CPU)
#   make test         install, then run the test suite (every tier)
#   make test-fast    the unit tier only (no Ray): under 2 minutes
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-fast

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/mixmae run

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m fast
