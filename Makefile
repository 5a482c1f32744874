# Two commands on a fresh Debian/Ubuntu machine:
#   make demo   -> .venv, install, Fashion-MNIST, ConMIM pre-training (CPU recipe), k-NN before/after
#   make test   -> .venv, install, Fashion-MNIST, the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: setup demo test lint clean
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cmim pretrain configs/conmim_fmnist_cpu.yaml data.root=$$(PYTHON=$(PY) scripts/get_fashion_mnist.sh) $(DEMO_ARGS)
	@echo "next: the 30-minute recipes, against raw pixels and supervised training from scratch in benchmarks/RESULTS.md: cmim pretrain configs/conmim_fmnist_30min.yaml (ConMIM, 27-30 min on 2 cores), or configs/mocov3_fmnist_30min.yaml then configs/mimco_fmnist_30min.yaml (MimCo, 28-29 min: the best encoder there, above the raw pixels on k-NN and the linear probe)"

test: setup
	FASHION_MNIST_ROOT=$$(PYTHON=$(PY) scripts/get_fashion_mnist.sh) $(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .pytest_cache
