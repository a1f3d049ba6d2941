# dncut — two commands on a fresh machine:
#   make demo   create .venv, install dncut, run the main job on the embedded default
#   make test   same set-up plus the dev extras, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dncut demo $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(ARGS)

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/ncut_layer.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
