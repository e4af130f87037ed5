# Two set-up commands: `make demo` and `make test`. Both create/refresh .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFICIAL := dinov2==0.0.1.dev2
PYTEST_ARGS ?=

.PHONY: install install-test test-data demo test test-fast test-portable lint bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(OFFICIAL)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Debian's Fashion-MNIST (70k images) for the test that regenerates the bundled subset from it: installed where apt-get
# works (as root, or through sudo without a password), else the test is skipped and says so.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
test-data:
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null \
		&& $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
		|| echo "note: dataset-fashion-mnist not installed (no apt-get or no root); its test will be skipped"

demo: install
	$(BIN)/dinoforge demo

# CPU kernel families (ATEN_CPU_CAPABILITY): fp32 and bf16 results differ between them in the last bits (another
# summation order), and the tests must hold on each. A plain run uses this CPU's best family (avx512 where
# /proc/cpuinfo lists avx512f, else avx2); OTHER_CAPABILITY is the second one here: avx2 on an AVX-512 CPU, else
# `default` (ATen's non-vectorised kernels). KERNEL_TESTS depend most on the kernels: mixed precision, the losses,
# parity with the official backbone, and the bf16/fp16 training runs. `make test` reruns them under the second family.
HAS_AVX512 := $(shell grep -qsw avx512f /proc/cpuinfo && echo yes)
OTHER_CAPABILITY := $(if $(HAS_AVX512),avx2,default)
PORTABLE_CAPABILITIES := avx2 $(if $(HAS_AVX512),avx512,default)
KERNEL_TESTS := tests/test_mixed_precision.py tests/test_losses.py tests/test_models.py \
	tests/test_train.py::test_bf16_autocast_tracks_fp32_and_fsdp2_mixed_precision_runs \
	tests/test_train.py::test_fp16_autocast_with_grad_scaler

test: install-test test-data
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=$(OTHER_CAPABILITY) $(BIN)/python -m pytest -q -n 2 -m "not slow" $(KERNEL_TESTS)

test-fast: install-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-portable: install-test
	for cap in $(PORTABLE_CAPABILITIES); do \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -c "import torch; print('CPU kernels:', torch.backends.cpu.get_cpu_capability())"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS) || exit 1; \
	done

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench: install-test
	$(BIN)/pip install -q -e ".[bench]"
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# The GPU check (benchmarks/gpu_check.py): --full on a CUDA device (one command, about 8 minutes), else --smoke.
gpu-check: install-test
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
