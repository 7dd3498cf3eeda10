# Everything runs from a virtualenv that the targets build themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo local test lint security bench load clean

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
	$(VENV)/bin/mypy --disallow-untyped-defs --ignore-missing-imports app.py chalicelib devbox

# checkov pins its own boto3, so it lives in a virtualenv of its own.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov
	touch $@

security: $(STAMP) $(CHECKOV_VENV)/.installed
	$(PY) scripts/security_scan.py --checkov $(CHECKOV_VENV)/bin/checkov

bench: $(STAMP)
	$(PY) -m benchmarks.run

load: $(STAMP)
	$(PY) -m benchmarks.load

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache
