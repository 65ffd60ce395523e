# Entry points: `make test` (set up .venv and run the suite), `make demo` (set up .venv and run the demo).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test demo bench format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes; torch is pinned in the same install so pip takes the CPU build.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0" "monai==1.6.1" -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(PY) -m pip install --quiet black isort
	$(PY) -m isort msam_components tests benchmarks
	$(PY) -m black msam_components tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

demo: $(STAMP)
	$(PY) -m msam_components.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py --threads 2
