# One-command entry points on a fresh clone (Python 3.11):
#   make demo   set up .venv and run the end-to-end demo on generated data (CPU, a few minutes)
#   make test   set up .venv and run the whole test suite (what CI runs), one pytest worker per core (at most 4)
PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup demo test verify package bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

demo: setup
	$(VENV_PYTHON) -m demo.run_demo --output-dir demo_output

test: setup
	$(VENV_PYTHON) -m pytest tests -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile

verify: setup
	$(VENV_PYTHON) ci/verify_bundle.py bundles/*

package: setup
	for bundle in bundles/*; do $(VENV_PYTHON) ci/package_bundle.py $$bundle --out build; done

bench: setup
	$(VENV_PYTHON) bench/bench_brats_ldm2d.py

clean:
	rm -rf build demo_output
