# STAMP developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3.11
VENV ?= .venv
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
PIP_ARGS ?=
BIN := $(VENV)/bin
INSTALL_STAMP := $(VENV)/.install-stamp

.PHONY: venv test demo stack-up stack-down stack-status clean

venv: $(INSTALL_STAMP)

# Reinstall only when the dependency list changes; the editable install picks up code edits.
$(INSTALL_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_ARGS) -e '.[test]'
	@touch $@

test: venv
	$(BIN)/python -m pytest -q --durations=25

demo: venv
	$(BIN)/stamp stack up
	$(BIN)/stamp demo

stack-up: venv
	$(BIN)/stamp stack up

stack-down: venv
	$(BIN)/stamp stack down

stack-status: venv
	$(BIN)/stamp stack status

# Build outputs and caches only: the venv and .stamp/ (stack data) are kept.
clean:
	rm -rf build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
