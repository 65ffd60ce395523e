# Entry points: `make test` (set up .venv and run the suite), `make demo` (set up .venv and run the demo).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test test-portable demo bench format clean

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

# The tests marked `numerics` (floating-point comparisons, learning tests) again on torch's generic kernels, which stand
# in for another CPU generation: they must pass on any x86-64 CPU, not only on the one they were written on.
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m numerics $(PYTEST_ARGS)

format: $(STAMP)
	$(PY) -m pip install --quiet black isort
	$(PY) -m isort msam_components tests benchmarks experiments
	$(PY) -m black msam_components tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

demo: $(STAMP)
	$(PY) -m msam_components.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py --threads 2

# MONAI Label app (monailabel_app/): its own venv, since monailabel 0.8.5 needs numpy<2 and its declared deps pull
# torchvision/sam2 builds that do not load beside the CPU torch; monailabel is installed --no-deps with the runtime deps
# it imports listed in monailabel_app/requirements.txt.
LABEL_VENV := .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
LABEL_STAMP := $(LABEL_VENV)/.installed-stamp

.PHONY: label-venv test-label

$(LABEL_STAMP): monailabel_app/requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --quiet --upgrade pip
	$(LABEL_PY) -m pip install --quiet "torch==2.13.0" "monai==1.6.1" "numpy==1.26.4"
	$(LABEL_PY) -m pip install --quiet --no-deps "monailabel==0.8.5"
	grep -v -E '^(#|monailabel)' monailabel_app/requirements.txt | xargs -d '\n' $(LABEL_PY) -m pip install --quiet
	$(LABEL_PY) -m pip install --quiet --no-deps -e .
	$(LABEL_PY) -c "import monailabel.interfaces.app, monailabel.endpoints.infer"
	touch $(LABEL_STAMP)

# monailabel 0.8.5 installs bin/monailabel as a bash script running `python -m monailabel.main $*`: whichever `python`
# comes first on PATH (so it fails with "No module named 'monailabel'" unless the venv is activated), with the arguments
# re-split on spaces. Replace it with a launcher that runs this venv's interpreter with the arguments intact (PYTHONPATH
# stays exported, as in the original: monailabel's training subprocess reads it).
LABEL_LAUNCHER := $(LABEL_VENV)/.launcher-stamp

$(LABEL_LAUNCHER): $(LABEL_STAMP) Makefile
	printf '%s\n' '#!/bin/sh' '# written by make label-venv: run MONAI Label with this venv'"'"'s python, whatever PATH holds' \
		'export PYTHONPATH="$${PYTHONPATH:-}"' 'exec "$$(dirname "$$0")/python" -m monailabel.main "$$@"' \
		> $(LABEL_VENV)/bin/monailabel.tmp
	chmod +x $(LABEL_VENV)/bin/monailabel.tmp
	mv $(LABEL_VENV)/bin/monailabel.tmp $(LABEL_VENV)/bin/monailabel
	touch $@

label-venv: $(LABEL_STAMP) $(LABEL_LAUNCHER)

test-label: $(LABEL_STAMP) $(LABEL_LAUNCHER)
	$(LABEL_PY) -m pytest tests/test_monailabel_app.py tests/test_bbox_inversion.py $(PYTEST_ARGS)

# Browser test (tests/test_browser_ohif.py): a private Orthanc with its DICOMweb plugin, the app's server with --studies
# at it, and MONAI Label's OHIF viewer in headless Chromium driven by Selenium. Debian packages are installed only when
# dpkg says they are missing (so a machine that has them touches no network; apt needs root, else sudo); the Python
# pins (tests/browser/requirements.txt) go into .venv-label once. MSAM_TEST_ARTEFACTS names where the viewer
# screenshots go (default test-artefacts/).
BROWSER_DEBS := orthanc orthanc-dicomweb chromium chromium-driver
BROWSER_STAMP := $(LABEL_VENV)/.browser-stamp
BROWSER_TESTS := tests/test_browser_ohif.py $(wildcard tests/test_monailabel_dicomweb.py)

.PHONY: browser-debs test-browser

browser-debs:
	@missing=""; for p in $(BROWSER_DEBS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing Debian packages:$$missing"; \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(BROWSER_STAMP): $(LABEL_STAMP) tests/browser/requirements.txt
	$(LABEL_PY) -m pip install --quiet -r tests/browser/requirements.txt
	touch $@

test-browser: browser-debs $(LABEL_STAMP) $(LABEL_LAUNCHER) $(BROWSER_STAMP)
	SE_OFFLINE=true $(LABEL_PY) -m pytest $(BROWSER_TESTS) $(PYTEST_ARGS)
