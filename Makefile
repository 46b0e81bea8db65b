# Two commands do all set-up (see README): `make bench` and `make test`.
# Each builds what it needs; both are quick once everything is installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.package-built
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: bench test test-all test-slow test-compat lint install compile-report cuda-report \
	kernel-report cudnn-frontend

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The cuDNN frontend's headers (header-only C++; the fused cuDNN graph op is built with them): only
# include/ of the pinned nvidia-cudnn-frontend wheel, not its Python package and dependencies.
# They land in the git-ignored build/cudnn_frontend, which setup.py finds; carry that folder to a
# machine without network (the GPU machine) to build the op there.
CUDNN_FRONTEND_VERSION := 1.32.0
CUDNN_FRONTEND := build/cudnn_frontend/include/cudnn_frontend.h
$(CUDNN_FRONTEND): $(DEPS)
	rm -rf build/cudnn_frontend build/cudnn_frontend.tmp
	$(PY) -m pip download --quiet --no-deps --only-binary :all: --dest build/cudnn_frontend.tmp \
		nvidia-cudnn-frontend==$(CUDNN_FRONTEND_VERSION) && \
	$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('build/cudnn_frontend.tmp/*.whl')[0]); \
		z.extractall('build/cudnn_frontend', [n for n in z.namelist() if n.startswith('include/')])" \
	|| echo "make: no cuDNN frontend headers (offline?): the extension builds without the fused cuDNN graph op"
	rm -rf build/cudnn_frontend.tmp

cudnn-frontend: $(CUDNN_FRONTEND)

# Editable install: Python changes need no rebuild; the extension is rebuilt when csrc/ changes.
$(BUILT): $(DEPS) setup.py pyproject.toml $(EXT_SOURCES) $(CUDNN_FRONTEND)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILT)

# pytest-xdist: one test worker per core, tests handed out as workers free up. XDIST= runs serially.
XDIST ?= -n auto --dist worksteal

# Writes the table, and (git-ignored) bench-out/bench.json and bench-out/bench.png; ARGS override.
bench: $(BUILT)
	$(PY) -m resnet_fused bench --json bench-out/bench.json --plot bench-out/bench.png $(ARGS)

# The fast suite (under 5 min on 2 cores from cold caches): `slow` tests are left out; each
# duplicates coverage of a faster default test (see pyproject's markers). pytest-xdist runs one
# worker per core (tests/conftest.py splits the intra-op threads among them). CI=true (CI sets it) or
# RESNET_FUSED_STRICT_TESTS=1: a missing component (extension, triton, oneDNN, ONNX) fails
# instead of skipping, unless opted out (tests/components.py).
test: $(BUILT)
	$(PY) -m pytest tests benchmarks --benchmark-disable -q -m "not slow" $(XDIST) $(ARGS)

# ruff (pyproject.toml: pyflakes + pycodestyle, 100 columns).
lint: $(DEPS)
	$(PY) -m ruff check .

# Everything, slow tests included.
test-all: $(BUILT)
	$(PY) -m pytest tests benchmarks --benchmark-disable -q $(XDIST) $(ARGS)

# Only the slow tests (CI runs them after `make test`, so together they are `make test-all`).
test-slow: $(BUILT)
	$(PY) -m pytest tests benchmarks --benchmark-disable -q -m slow $(XDIST) $(ARGS)

# Regenerate the committed static report of the Triton kernel (registers, spills, MMA kind).
compile-report: $(BUILT)
	RESNET_FUSED_COMPILE_REPORT=$(abspath benchmarks/results/triton_compile_report.md) \
		$(PY) -m pytest tests/test_triton_compile.py -q -k every_config

# Regenerate the committed static kernel report: every tuning candidate of every resnet50 conv at
# batch 1 and 256 (fp16, sm_90), compiled without a GPU. The committed copy is made with the GPU
# machine's stack: make kernel-report KERNEL_REPORT_PY=.venv-compat/bin/python
KERNEL_REPORT_PY ?= $(PY)
kernel-report: $(BUILT)
	$(KERNEL_REPORT_PY) -m resnet_fused kernels --target sm_90 --arch resnet50 --batch 1 256 \
		--dtype fp16 --markdown benchmarks/results/triton_kernel_report_sm90.md \
		--json benchmarks/results/triton_kernel_report_sm90.json

# Regenerate the committed static report of the extension's CUDA kernels (registers, spills,
# occupancy, vector width; cuobjdump on the built library, no GPU).
cuda-report: $(BUILT)
	$(PY) benchmarks/cuda_kernel_report.py --out benchmarks/results/cuda_kernel_report.md

# The GPU machine's stack (requirements-compat.txt) in a second venv, Python 3.12 where pyenv or
# PATH has it: the package built there with its CUDA kernels (sm_90), and the tests whose result
# can differ between stacks: op level for every backend, the Triton interpreter and AOT compile
# tests, the extension, and the GPU suite's plumbing (smoke mode).
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PYTHON ?= $(shell PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12 || echo $(PYTHON))
COMPAT_TESTS := tests/test_ops.py tests/test_onednn.py tests/test_ext.py tests/test_conv_triton.py \
	tests/test_models_triton.py tests/test_triton_compile.py tests/test_check.py \
	tests/test_nonfinite.py tests/test_warm_start.py tests/test_hooks.py tests/test_dropin.py \
	tests/test_kernel_report.py

$(COMPAT_VENV)/.deps-installed: requirements-compat.txt
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet -r requirements-compat.txt
	touch $@

$(COMPAT_VENV)/.package-built: $(COMPAT_VENV)/.deps-installed setup.py pyproject.toml $(EXT_SOURCES) \
		$(CUDNN_FRONTEND)
	RESNET_FUSED_REQUIRE_CUDA=1 \
		$(COMPAT_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# No onnx in requirements-compat.txt: RESNET_FUSED_NO_ONNX=1 is the opt-out that keeps the
# ONNX tests skips under strict mode. Slow tests run too (the full Triton compile sweep on triton 3.6),
# but the whole-model kernel report (5 min; `make kernel-report` makes it with this venv).
test-compat: $(COMPAT_VENV)/.package-built
	RESNET_FUSED_NO_ONNX=1 $(COMPAT_PY) -m pytest $(COMPAT_TESTS) -q -p no:cacheprovider \
		--deselect tests/test_kernel_report.py::test_whole_resnet50_report_sm90 $(XDIST) $(ARGS)
	SUITE_SMOKE=1 SUITE_RESULTS_DIR=$$(mktemp -d) PYTHON=$(abspath $(COMPAT_PY)) \
		bash benchmarks/gpu_suite.sh
