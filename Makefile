# dpokit — `make demo` runs the main job, `make test` the test suite; both create/update .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo figures test test-slow lint clean

# The stamps re-install whenever pyproject.toml or constraints.txt change.
$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "dpokit needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed-run

demo: $(VENV)/.installed-run
	$(BIN)/dpokit demo --out out/demo

figures: $(VENV)/.installed-run
	$(BIN)/dpokit optimal
	$(BIN)/dpokit figures --out out/figures

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow" -n 2

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow -n 2

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
