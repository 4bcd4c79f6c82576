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

# The self-contained benchmarks; cnn_accuracy.py and cross_simulator.py need a store or a model.
bench: $(VENV)/.installed-test
	for b in ingest preprocess cluster summary cnn train_input simulate watch; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) demo-output
