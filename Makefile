# airysort: `make test` and `make demo` work on a fresh machine with Python >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test demo install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --no-cache-dir --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --no-cache-dir -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --no-cache-dir -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(BIN)/airysort demo --out demo-output

bench: $(VENV)/.installed-test
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-output
