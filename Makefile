# Two environments, both tested: .venv (transformers 5.x + torchtitan 0.3) and .venv-titan01
# (transformers 4.57 + torchtitan 0.1, the generation flame pins). torch is the CPU build 2.13.0.
PYTHON ?= python3
VENV := .venv
VENV01 := .venv-titan01

.PHONY: demo lint test test-fast test-main test-titan01 bench clean

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
# (marked slow), stop at the first failure; the ten slowest tests are listed at the end. `make test` is what CI
# runs: every test, both environments.
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -x -m "not slow" --durations=10

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

test-titan01: $(VENV01)/.installed
	$(VENV01)/bin/python -m pytest -q -o cache_dir=.pytest_cache-titan01

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/bench_convert.py

clean:
	rm -rf $(VENV) $(VENV01) .pytest_cache .pytest_cache-titan01
