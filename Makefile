# Two commands on a fresh machine with Python 3.11+:
#   make demo   create .venv, install moeprobe (locked versions), record the embedded demo model
#   make test   create .venv, install moeprobe with its test dependencies (locked versions), run the tests
# Versions come from requirements.lock (pip constraints, PyTorch's CPU build included); `make lock` refreshes it
# from the newest releases the package index serves, `make compat` runs the transformers matrix, and `make newest`
# runs the suite on the newest release of every dependency the index serves newer than the lock (CI runs both).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# The CPU build of PyTorch that `make lock` starts from (a plain `torch` may pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
# Releases `make compat` checks: a 4.x (refused in one line), the oldest supported, the newest served.
COMPAT ?= 4.57.6 5.0.0 latest

.PHONY: demo test install lock compat newest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) torch
	$(PIP) install -c $(LOCK) -e ".[dev]"
	touch $@

demo: install
	$(BIN)/moeprobe demo

test: install
	$(BIN)/python -m pytest -q -n auto

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check ".[dev]"
	(echo "# pip constraints: the versions the suite passed on; refresh with 'make lock'"; \
	 .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^moeprobe') > $(LOCK)
	rm -rf .lock-venv build

compat: install
	$(BIN)/python tools/compat_matrix.py --markdown $(COMPAT)

newest: install
	$(BIN)/python -m tools.newest_deps

clean:
	rm -rf $(VENV) .pytest_cache traces .tf .lock-venv .newest-venv
