# The two commands of README.md's Quick start:
#   make run    set up .venv/ and run the main job
#   make test   set up .venv/ and run the whole test suite (slow tests included, as CI does)
#   make test-gpu  the CUDA tests, with an existing interpreter and the source tree (no venv, no install)
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
OUT ?= out/study

.PHONY: setup run test test-fast test-gpu bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: setup
	$(PY) -m lossscale study --quick --out $(OUT) --resume

# The test suite plus the docstring examples of every module (the library's and tests/oracle.py's).
TESTS := --doctest-modules src/lossscale tests

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup $(TESTS)

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" $(TESTS)

test-gpu:
	PYTHONPATH=src $(PYTHON) -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_layerwise.py -q

bench: setup
	$(PY) -m pip install --quiet -c constraints.txt torch-optimi torchao  # by name: never reinstall lossscale over the editable install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .hypothesis build src/*.egg-info
