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

# Without native bf16 (x86 CPUs without AVX-512 or AMX) the demo computes in fp32, about 5x slower, so it trains
# one epoch instead of two (BENCHMARKS.md, "CPUs without native bf16"); DEMO_ARGS still override it.
DEMO_FP32_ARGS := train.epochs=1
demo: setup
	@root=$$(PYTHON=$(PY) scripts/get_fashion_mnist.sh) && \
	extra=$$($(PY) -c "import torch; from cmim.core.precision import native_bf16; \
	  print('' if native_bf16('cuda' if torch.cuda.is_available() else 'cpu') else '$(DEMO_FP32_ARGS)')") && \
	if [ -n "$$extra" ]; then echo "demo: no native bf16 here, so it computes in fp32 (about 5x slower) and trains one epoch ($$extra)"; fi && \
	echo "$(VENV)/bin/cmim pretrain configs/conmim_fmnist_cpu.yaml data.root=$$root $$extra $(DEMO_ARGS)" && \
	$(VENV)/bin/cmim pretrain configs/conmim_fmnist_cpu.yaml data.root=$$root $$extra $(DEMO_ARGS)
	@echo "next: the 30-minute recipes, against raw pixels and supervised training from scratch in benchmarks/RESULTS.md: cmim pretrain configs/conmim_fmnist_30min.yaml (ConMIM, 27-30 min on 2 cores), or configs/mocov3_fmnist_30min.yaml then configs/mimco_fmnist_30min.yaml (MimCo, 28-29 min: the best encoder there, above the raw pixels on k-NN and the linear probe)"

test: setup
	FASHION_MNIST_ROOT=$$(PYTHON=$(PY) scripts/get_fashion_mnist.sh) $(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .pytest_cache
