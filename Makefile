# The two commands of the README, and the pieces they are made of.
#   make quantize   install, then quantize the built-in default model (`lowbit quantize`)
#   make test       install, then run the Python and C++ test suites
#   make bench      install, then the CPU speed table (bench/cpu_linear.py); with
#                   LLAMACPP=/path/to/coldbench, llama.cpp's k-quants in the same run; ARGS="--m 1"
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The torch to install when none is present (this build has CUDA 13.0 kernels
# for compiling lowbit's own; any torch >= 2.6 already installed is kept).
TORCH_SPEC ?= torch==2.14.1
CMAKE_BUILD := build/cmake
CMAKE_ASAN_BUILD := build/cmake-asan
INSTALL_STAMP := build/.installed
NATIVE_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: install build test test-python test-cpp test-slow quantize bench clean

$(INSTALL_STAMP): $(NATIVE_SOURCES)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-build-isolation -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

install: $(INSTALL_STAMP)

# Incremental in-place rebuild of lowbit._C for development (LOWBIT_CUDA=0 skips CUDA).
build:
	$(PYTHON) setup.py build_ext --inplace

test: install
	$(MAKE) test-python test-cpp

test-python:
	$(PYTHON) -m pytest

# The kernel cores alone, plain and under AddressSanitizer/UBSan.
test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure
	cmake -S . -B $(CMAKE_ASAN_BUILD) -G Ninja -DLOWBIT_SANITIZE=ON
	cmake --build $(CMAKE_ASAN_BUILD)
	ctest --test-dir $(CMAKE_ASAN_BUILD) --output-on-failure

test-slow: install
	$(PYTHON) -m pytest -m slow

# Flags for it: make quantize ARGS="--bits 2 --group-size 32"
quantize: install
	$(PYTHON) -m lowbit quantize $(ARGS)

bench: install
	$(PYTHON) bench/cpu_linear.py $(if $(LLAMACPP),--llamacpp $(LLAMACPP)) $(ARGS)

clean:
	rm -rf build lowbit/_C*.so
