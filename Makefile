# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs: torch==2.13.0 first (a CPU build that pip finds
# locally; any other torch requirement would pull GBs of CUDA packages), then the project,
# then the original LLaVA code with --no-deps. Versions are held to constraints.txt (the set last
# tested); delete .venv and edit that file to move to newer releases.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,llava]" -c constraints.txt
	$(PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	touch $(STAMP)

.PHONY: install test demo bench
install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) -m sparsezip_pl.demo.pipeline

bench: $(STAMP)
	$(PY) bench/compressor.py
	$(PY) bench/e2e.py
