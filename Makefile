# The two commands of the README:
#   make demo   runs the main job on its bundled default
#   make test   runs the test suite
# Each creates the virtual environment .venv if there is none and installs the project.
#
# TORCH names the torch requirement installed first. The default, torch==2.13.0, is a
# CPU wheel on this project's machines; installing it before the project keeps pip from
# pulling a multi-gigabyte CUDA build to satisfy the plain `torch>=2.3` dependency.
# Everything after it is installed under a constraints file that pins the torch just
# installed, so no extra (lightning, transformers, ray, timm) can swap it for another build.
# Elsewhere, e.g.:  make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo findings test test-fast lint format clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layerwise ablate quickstart --out runs/quickstart --workers 2

# The project's current findings: the `findings` ablation (about 10 minutes on two
# cores; resumable: run it again after an interruption), then docs/findings.md and its
# figures under docs/findings/.
findings: $(STAMP)
	$(VENV)/bin/layerwise ablate findings --out runs/findings --workers 2
	$(PY) -m layerwise.experiments.findings runs/findings --out docs/findings.md

# The whole check CI runs: lint, format check, then every test (the doctests of every
# library module included, tests/test_doctests.py). Property tests run derandomized when
# CI is set (tests/conftest.py), exploring new examples locally.
test: lint
	$(PY) -m pytest -n 2 -q

# The inner loop: no lint, no slow end-to-end tests, stop at the first failure.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -x -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
