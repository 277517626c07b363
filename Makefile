# The README's two commands, each self-contained and idempotent on a fresh machine:
#   make demo   set up .venv, build, run the main job (train + evaluate on the embedded dataset)
#   make test   set up .venv, build CPU + CUDA (when nvcc exists) + SIMT, run every test,
#               then the SIMT tests again under AddressSanitizer + UBSan
# Quick local loop: VSE_CUDA=0 make test   (skips nvcc; CPU and SIMT only)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: demo test build sanitize-test

# VSE++ (1 warm-up epoch of VSE0), Adam 2e-4, batch 128, clip 2, 20 epochs with lr x0.1 at 10 (the
# AOQ/VSRN schedule: the official 30 epochs take ~4 min of training here). One torch thread: steps are
# small, and on a shared 2-core machine a second thread mostly waits for the first.
demo: build
	$(PY) -m vse_cuda.train --run-dir runs/demo --overwrite --threads 1 --epochs 20 --lr-update 10

test: build
	@echo "== ptxas resource report (registers, spills) per kernel: build/ptxas-report.txt"
	@grep -h -E "Compiling entry|registers|spill" build/*/build.log > build/ptxas-report.txt || true
	@cat build/ptxas-report.txt
	$(PY) -c "import vse_cuda; print('vse_cuda backends built:', vse_cuda.backends())"
	$(PY) -m pytest python_tests -q
	$(MAKE) sanitize-test

# The venv is rebuilt only when requirements-dev.txt changes.
$(VENV)/.requirements: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	cp requirements-dev.txt $@

# No build isolation: the build uses the venv's torch instead of installing a second copy.
build: $(VENV)/.requirements
	$(PIP) install -q --no-build-isolation --no-deps -e .

# The SIMT library alone, built with sanitizers into build/asan and loaded in its place.
# libstdc++ is preloaded too: with libasan alone the first C++ throw aborts in __cxa_throw.
ASAN_PRELOAD := $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so.6)
sanitize-test: $(VENV)/.requirements
	cmake -S . -B build/asan -DPython_EXECUTABLE=$(abspath $(PY)) -DVSE_WITH_CUDA=OFF \
	      -DVSE_SANITIZE=address,undefined > build/asan-configure.log
	cmake --build build/asan --target _simt --parallel
	VSE_SIMT_LIBRARY="$$(ls $(abspath build/asan/vse_cuda)/_simt*.so)" LD_PRELOAD="$(ASAN_PRELOAD)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(PY) -m pytest python_tests -q -k simt -p no:cacheprovider --capture=sys
