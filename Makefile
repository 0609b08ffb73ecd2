SHELL := /bin/bash
# One entry point for people and CI. `make test` works on a fresh clone: it creates .venv,
# installs torch 2.14.1 and the package with its [dev] extras, builds the extension, then runs
# ctest and pytest. `make gpu-check` is the prepared command for a lent GPU machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bv-blend-installed
TORCH_VERSION ?= 2.14.1

# nvcc compiles the CUDA kernels even where no GPU is visible; torch's own guess of the toolkit
# from the /usr/local/bin/nvcc wrapper is wrong, so point it at the real one when present.
CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test build ctest pytest test-verl train bench gpu-check clean

test: ctest pytest test-verl

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	mkdir -p build && touch build/.ext-fresh
	touch $@

# The editable install above compiled the extension (it leaves build/.ext-fresh); after a change
# under csrc/, rebuild it in place (ninja then recompiles only what changed).
build/.ext-built: $(STAMP) $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*)
	if [ -e build/.ext-fresh ]; then rm build/.ext-fresh; else $(PY) setup.py -q build_ext --inplace; fi
	touch $@

build: build/.ext-built

ctest: build
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DCUDA_TOOLKIT_ROOT_DIR=$(or $(CUDA_HOME),/usr/local/cuda) -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

pytest: build
	$(PY) -m pytest -q

# The verl integration is tested in its own venv: verl pins a transformers that the TRL in .venv
# cannot share. Same torch as .venv, so the extension built in place above loads there as is: the
# package reaches .venv-verl through a .pth (the checkout and python/ on sys.path) plus its
# egg-info metadata, which carries the verl.plugins entry point that `import verl` looks up.
# (`pip install -e .` there would compile the extension a second time.) cachetools, fastapi and
# uvicorn: verl's trainer imports them without declaring them; setup.py's [verl] extra lists all.
VERL_VENV := .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.bv-blend-installed
VERL_VERSION ?= 0.9.1

$(VERL_STAMP): setup.py pyproject.toml
	test -x $(VERL_PY) || python3 -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q torch==$(TORCH_VERSION) verl==$(VERL_VERSION) cachetools fastapi \
		uvicorn pytest setuptools
	site=$$($(VERL_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
		$(VERL_PY) setup.py -q egg_info --egg-base "$$site" && \
		printf '%s\n' "$(CURDIR)" "$(CURDIR)/python" > "$$site/bv-blend-ext.pth"
	touch $@

test-verl: build $(VERL_STAMP)
	$(VERL_PY) -m pytest -q tests/app/test_verl.py

train: build
	$(PY) -m bv_blend train --config configs/train_default.yaml

bench: build
	$(PY) benchmarks/bench_op.py

# On a lent GPU machine: its own python3 (no .venv there), built in place for Hopper, the CUDA
# tests, compute-sanitizer over the op's CUDA tests, and the op benchmark; see tools/gpu_check.sh.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build bv_blend_ext/*.so
