# The README's two commands, each self-contained and idempotent on a fresh machine:
#   make demo   set up .venv, build, run the main job (train + evaluate on the embedded dataset)
#   make test   set up .venv, build CPU + CUDA (when nvcc exists) + SIMT, run every test, then
#               the GPU check's dry run (benchmarks/gpu_check.sh --dry-run build/gpu_check), then
#               `make sanitize-test`: CPU-only builds with sanitizers, each in its own folder,
#               loaded in place of the product libraries (details at the targets below):
#                 sanitize-address  _C + _simt with AddressSanitizer + UBSan (build/asan): the
#                                   CPU ops' tests and the SIMT tests
#                 sanitize-thread   _simt with ThreadSanitizer (build/tsan): test_simt.py and a
#                                   subset of the ops' simt tests launching every kernel; a
#                                   planted race in a test kernel must be reported
#               Any sanitizer report fails the run (halt_on_error=1).
# Quick local loop: VSE_CUDA=0 make test   (skips nvcc; CPU and SIMT only)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
, := ,
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: demo test build check-install sanitize-test sanitize-address sanitize-thread

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
	# The 460 s total is the GPU machine's budget; a loaded CI machine gets more room.
	TOTAL_S=900 bash benchmarks/gpu_check.sh --dry-run build/gpu_check
	$(MAKE) sanitize-test

# The venv is rebuilt only when requirements-dev.txt or requirements-nodeps.txt changes; the
# latter's test-only packages are installed without their dependencies (see the file).
$(VENV)/.requirements: requirements-dev.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	cat requirements-dev.txt requirements-nodeps.txt > $@

# No build isolation: the build uses the venv's torch instead of installing a second copy.
build: $(VENV)/.requirements
	$(PIP) install -q --no-build-isolation --no-deps -e .

# One install the way a pip user does it, in a fresh temporary venv, then a smoke test of the
# installed copy (benchmarks/check_install.sh; minutes each, so not part of `make test`):
#   make check-install                 pip install .  (build isolation)
#   make check-install TORCH=2.13.0    pip install torch==2.13.0, then pip install --no-build-isolation .
TORCH ?= isolated
check-install:
	bash benchmarks/check_install.sh $(TORCH)

# ---------------------------------------------------------------------------------------------
# Sanitizers. Each run builds the libraries CPU-only with -DVSE_SANITIZE into its own build
# folder, loads them in place of the product ones (VSE_C_LIBRARY, VSE_SIMT_LIBRARY; see
# vse_cuda/_lib.py) and preloads the sanitizer runtime, which must come first in the process.
# VSE_SANITIZER tells the tests which sanitizer is active (test_simt.py's race test needs TSan).
sanitize-test: sanitize-address sanitize-thread

# Extra pytest arguments of every sanitizer run: the property tests' "sanitize" profile draws
# fewer examples (python_tests/conftest.py), as every example runs several times slower there.
SANITIZE_PYTEST_ARGS ?= --hypothesis-profile=sanitize
SANITIZE_JOBS ?= $(shell nproc)
# --capture=sys: a report goes to the real stderr; with fd capture a halting report is lost.
SANITIZE_PYTEST = $(PY) -m pytest python_tests -q -p no:cacheprovider --capture=sys $(SANITIZE_PYTEST_ARGS)

# $(call sanitize_build,folder,sanitizers,targets)
define sanitize_build
	mkdir -p $(1)
	cmake -S . -B $(1) -DPython_EXECUTABLE=$(abspath $(PY)) -DVSE_WITH_CUDA=OFF \
	      -DVSE_SANITIZE=$(2) > $(1)-configure.log
	cmake --build $(1) --target $(3) --parallel $(SANITIZE_JOBS)
endef
san_library = $$(ls $(abspath $(1)/vse_cuda)/$(2)*.so)

# AddressSanitizer + UBSan, one process: the CPU ops' tests (every op test on the `cpu` backend,
# which runs _C's kernels) and the SIMT tests (`simt` backend and test_simt.py). The rest of the
# suite (oracle, data, harness) calls no kernel those do not. Slow tests are deselected: the
# one there caps the address space at 8 GiB, which ASan's shadow memory alone exceeds.
# libstdc++ is preloaded too: with libasan alone the first C++ throw aborts in __cxa_throw.
ASAN_PRELOAD := $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so.6)
sanitize-address: $(VENV)/.requirements
	$(call sanitize_build,build/asan,address$(,)undefined,_C _simt)
	VSE_SANITIZER=address,undefined LD_PRELOAD="$(ASAN_PRELOAD)" \
	VSE_C_LIBRARY="$(call san_library,build/asan,_C)" \
	VSE_SIMT_LIBRARY="$(call san_library,build/asan,_simt)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(SANITIZE_PYTEST) -k "cpu or simt" -m "not slow"

# ThreadSanitizer, with the product _C: a missing __syncthreads is a race between the fibers of
# a block (csrc/simt/executor.cpp), and test_simt.py checks that a planted one is reported.
# TSan slows the executor down several times, so not every simt test runs: test_simt.py (the executor, all of
# it) and, per op, the simt tests that compare with the CPU kernels tile by tile and across
# worker counts, plus topk's and mining's. Together they launch every kernel instantiation that
# the whole `-k simt` set does (check: VSE_SIMT_KERNEL_LOG=file, see csrc/simt/executor.cpp).
# OMP_NUM_THREADS=1: torch's OpenMP pool (libgomp) is not TSan-instrumented, so its barriers
# are invisible to TSan and work handed between its threads would look like races.
TSAN_TESTS := test_simt.py or simt_kernels_match_the_cpu_kernels \
              or simt_bitwise_deterministic_across_worker_counts \
              or (simt and (test_topk.py or test_mining.py))
TSAN_PRELOAD := $(shell gcc -print-file-name=libtsan.so) $(shell gcc -print-file-name=libstdc++.so.6)
sanitize-thread: $(VENV)/.requirements
	$(call sanitize_build,build/tsan,thread,_simt)
	VSE_SANITIZER=thread LD_PRELOAD="$(TSAN_PRELOAD)" OMP_NUM_THREADS=1 \
	VSE_SIMT_LIBRARY="$(call san_library,build/tsan,_simt)" \
	TSAN_OPTIONS=halt_on_error=1 \
	    $(SANITIZE_PYTEST) -k "$(TSAN_TESTS)" -m "not slow"
