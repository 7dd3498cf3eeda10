# Everything runs from a virtualenv that the targets build themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo local test lint clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The whole system on this machine (moto for AWS): start, status, stop, then exit.
demo: $(STAMP)
	$(PY) -m devbox local --demo

# The same stack, left running until Ctrl-C.
local: $(STAMP)
	$(PY) -m devbox local

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/cfn-lint infra/devbox.yaml

clean:
	rm -rf $(VENV) .pytest_cache
