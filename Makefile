# Two entry points for a fresh machine (see README):
#   make quickstart   install, then run the quickstart pipeline (local Ray, local MLflow, synthetic data, CPU)
#   make test         install, then run the test suite (every tier)
#   make test-fast    the unit tier only (no Ray, on every core): under 2 minutes
VENV ?= .venv
PY := $(VENV)/bin/python
# uv installs the pinned set in parallel (pip took 2:13 here, uv 1:01: README). It reads no pip
# configuration: it is handed the package sources pip is configured with on this machine, and
# pip's rule of taking the best version any of them offers
PIP_SOURCES := $(addprefix --index-url ,$(shell python3 -m pip config get global.index-url 2>/dev/null)) \
	$(addprefix --extra-index-url ,$(shell python3 -m pip config get global.extra-index-url 2>/dev/null)) \
	$(addprefix --find-links ,$(shell python3 -m pip config get global.find-links 2>/dev/null))

.PHONY: install quickstart test test-fast

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "uv==0.13.9"
	$(VENV)/bin/uv pip install --quiet --python $(PY) --native-tls --compile-bytecode --index-strategy unsafe-best-match \
		$(PIP_SOURCES) -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/mixmae run

# The unit tier runs on every core (pytest-xdist). The tiers on Ray run in two processes, each
# with a Ray cluster of its own and whole modules (their fixtures' pipeline runs are shared):
# one at a time, they left the cores idle a sixth of the time (processes starting, polls). The
# longest modules go first (LONGEST_FIRST in tests/conftest.py), in that order.
# Both tiers run whatever the first's verdict.
test: install
	status=0; $(PY) -m pytest -q -m fast -n auto || status=$$?; \
	$(PY) -m pytest -q -m "not fast" -n 2 --dist loadfile --no-loadscope-reorder || status=$$?; exit $$status

test-fast: install
	$(PY) -m pytest -q -m fast -n auto
