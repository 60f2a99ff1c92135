# Two entry points, each doing all set-up on a fresh machine:
#   make demo   - the main job: block caching on the shipped model
#   make test   - the test suite (what CI runs; tests marked slow are left to test-all)
#   make test-all - every test, the slow ones included
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bcc-installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch 2.13.0 installs from local disk here; a looser pin would
	# pull a multi-GB CUDA build. pyproject.toml keeps the range loose for users.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	# Two workers: most test time is single-threaded inductor compilation.
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=15 -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
