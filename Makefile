# Two environments, both tested: .venv (transformers 5.x + torchtitan 0.3) and .venv-titan01
# (transformers 4.57 + torchtitan 0.1, the generation flame pins). torch is the CPU build 2.13.0.
PYTHON ?= python3
VENV := .venv
VENV01 := .venv-titan01

.PHONY: demo lint test test-fast test-fast-a test-fast-b test-main test-titan01 bench clean

$(VENV)/.installed: pyproject.toml requirements/titan03.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/titan03.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(VENV01)/.installed: pyproject.toml requirements/titan01.txt
	$(PYTHON) -m venv $(VENV01)
	$(VENV01)/bin/pip install -q -r requirements/titan01.txt
	$(VENV01)/bin/pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/flame-ext demo

# ruff: pyflakes, import order, line length 120 and the formatting; mypy: the package's types (both configured in
# pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The two environments run side by side, one per core (most tests use one), each with its own pytest cache
# folder (its last failures, its trained tiny models); --output-sync prints each environment's report whole when
# it ends. The .venv-titan01 install overlaps the .venv tests. `make test-main` or `make test-titan01` runs one.
test: lint
	$(MAKE) -j2 --output-sync=target test-main test-titan01

# A quick lane while working: one environment (torchtitan 0.3), no multi-process, training or catalogue runs
# (marked slow), stop at the first failure; the five slowest tests of each half are listed at its end. The tests
# run in two halves side by side, one per core: FAST_B's folders, and everything else (a new folder lands there).
# Each half builds its own session fixtures; the trained tiny models in the pytest cache are shared (written
# atomically). `make test` is what CI runs: every test, both environments.
FAST_B := tests/guard tests/checks tests/titan tests/diagnose tests/model tests/convert tests/commands
FAST := $(VENV)/bin/python -m pytest -q -x -m "not slow" --durations=5

test-fast: $(VENV)/.installed
	$(MAKE) -j2 --output-sync=target test-fast-a test-fast-b

test-fast-a: $(VENV)/.installed
	$(FAST) tests $(addprefix --ignore=,$(FAST_B))

test-fast-b: $(VENV)/.installed
	$(FAST) $(FAST_B)

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

test-titan01: $(VENV01)/.installed
	$(VENV01)/bin/python -m pytest -q -o cache_dir=.pytest_cache-titan01

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/bench_convert.py

clean:
	rm -rf $(VENV) $(VENV01) .pytest_cache .pytest_cache-titan01
