# Makefile: sets up .venv and runs the hub demo, the tests, the linters and the benchmarks.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo serve test test-fast lint format-check bench bench-quick chromium clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

# The dashboard tests drive Debian's Chromium; a browser download does not work here.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: $(VENV)/.installed
	$(VENV)/bin/tether demo

serve: $(VENV)/.installed
	$(VENV)/bin/tether serve

test: $(VENV)/.installed chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick inner loop: everything but the browser, slow and benchmark tests (markers in
# pyproject.toml); needs no Chromium. `make test` runs the whole suite, as CI does.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not browser and not slow and not benchmark" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy --strict src/tether

# Formatting, checked without rewriting anything (`ruff format` fixes it).
format-check: $(VENV)/.installed
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed
	$(VENV)/bin/tether bench

bench-quick: $(VENV)/.installed
	$(VENV)/bin/tether bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
