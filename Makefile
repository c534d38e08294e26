# Two commands set everything up on a fresh clone:
#   make test   creates .venv (CPU torch), installs the package with its test extras, runs the whole suite
#   make demo   the same set-up (the test extra and the train extra: matplotlib for the plot), then the reference
#               distillation run (OPD vs TOPD vs TRD) on the CPU
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The dev set-up pins the local CPU torch wheel so that a fresh machine never downloads a CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench-quick memory clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" numpy triton pybind11 "setuptools>=77" wheel
	rm -rf build
	$(PIP) install -q --no-build-isolation -e ".[test,train]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m topd_kernels.info
	$(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/topd-train --compare --out runs/demo

bench-quick: $(STAMP)
	$(PY) benchmarks/bench_kl.py --quick

memory: $(STAMP)
	$(PY) benchmarks/memory_cpu.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
