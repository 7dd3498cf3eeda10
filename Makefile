# Everything runs from virtualenvs that the targets build themselves, from hash-pinned locks:
# the same packages, byte for byte, on every machine and in CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip refuses a file whose hash is not in the lock, and any package the lock does not name.
PIP_LOCKED := -m pip install --quiet --disable-pip-version-check --require-hashes

.PHONY: venv lock demo local test lint security bench load clean

venv: $(STAMP)

# The lock pins pip itself too: the venv's own pip installs it with the rest, and the project is
# then installed with the pinned one. The project has no file to hash: it goes in on its own,
# editable, with nothing downloaded (its dependencies and its build backend come from the lock).
$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_LOCKED) -r requirements-dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh the locks after editing requirements-dev.txt or requirements-checkov.txt:
#   make lock                                     keeps every pin the inputs still allow, adds what is new
#   make lock LOCK_ARGS=--upgrade                 every package to its newest release
#   make lock LOCK_ARGS="--upgrade-package moto"  one package
# uv resolves once for every platform and for Python 3.10 and later (pyproject's requires-python),
# so the locks install alike on Linux, macOS and Windows. It runs from a throwaway virtualenv.
UV_VERSION ?= 0.13.9
LOCK_ARGS ?=
UV_COMPILE = "$$tmp/bin/uv" pip compile --quiet --universal --python-version 3.10 --generate-hashes \
	--custom-compile-command "make lock" $(LOCK_ARGS)

lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/python" -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) && \
	$(UV_COMPILE) --no-emit-package devbox -o requirements-dev.lock requirements-dev.txt && \
	$(UV_COMPILE) -o requirements-checkov.lock requirements-checkov.txt

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

# checkov pins its own boto3, so it lives in a virtualenv of its own, from its own lock.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed: requirements-checkov.lock
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python $(PIP_LOCKED) -r requirements-checkov.lock
	touch $@

security: $(STAMP) $(CHECKOV_VENV)/.installed
	$(PY) scripts/security_scan.py --checkov $(CHECKOV_VENV)/bin/checkov

bench: $(STAMP)
	$(PY) -m benchmarks.run

load: $(STAMP)
	$(PY) -m benchmarks.load

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache
