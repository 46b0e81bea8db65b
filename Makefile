# Two commands do all set-up (see README): `make bench` and `make test`.
# Each builds what it needs; both are quick once everything is installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.package-built
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: bench test install

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Editable install: Python changes need no rebuild; the extension is rebuilt when csrc/ changes.
$(BUILT): $(DEPS) setup.py pyproject.toml $(EXT_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILT)

bench: $(BUILT)
	$(PY) -m resnet_fused bench $(ARGS)

test: $(BUILT)
	$(PY) -m pytest tests benchmarks --benchmark-disable -q $(ARGS)
