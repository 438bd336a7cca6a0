# Entry points (README): `make demo` (the main job), `make test` (what CI runs).
# Every target that needs the environment runs `setup` first; it is idempotent and quick when
# nothing changed. Extra pytest arguments: make test PYTEST_ARGS="-k messages -x";
# a subset of files: make test TESTS="test/test_messages.py test/test_cli_info.py".
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
IN_ENV := cd $(ROOT) && . ./env.sh &&
PYTEST_ARGS ?=
TESTS ?= test
# pytest workers (pytest-xdist), a test file per worker at a time: module fixtures (a node process, an export) are
# built once per file; ROS tests each hold a DDS domain of their own (domain_coordinator), so workers never meet
JOBS ?= 2
XDIST := $(if $(filter-out 0 1,$(JOBS)),-n $(JOBS) --dist loadfile)

# The generic-CPU kernels: PyTorch's ATen, oneDNN and MKL capped to what every x86-64 CPU has, so a
# parity run here behaves like one on a CPU unlike ours (docs/parity.md)
CPU_CAP_ENV ?= ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2

.PHONY: setup test test-fast test-capped demo lint typecheck bench-ros clean distclean help

help:
	@echo "make setup      create .venv, install pinned requirements, build + install the package into install/"
	@echo "make demo       the matcher node on a bundled stereo pair, writing a PNG of the matches"
	@echo "make test       setup, then the test suite (what CI runs; JOBS=2 workers; SHUFFLE=<seed> shuffles the order)"
	@echo "make test-fast  the tests not marked slow (a few minutes on 2 cores); SHUFFLE=<seed> shuffles their order"
	@echo "make test-capped  the parity tests with PyTorch's CPU kernels capped to the generic path (CPU_CAP_ENV)"
	@echo "make bench-ros  the node's per-pair ROS overhead (README figure)"
	@echo "make soak       the node's 10-minute soak with injected faults (CI runs 2 minutes of it)"
	@echo "make lint       ruff;  make typecheck: mypy on matchanything_ros (core, cli, ros)"
	@echo "make clean      remove build/ install/ log/;  make distclean: also .venv"

setup:
	@bash $(ROOT)/tools/setup.sh

# pytest exits 5 when it collects no test: that is a failure, say so
test: setup
	@$(IN_ENV) rc=0; python -m pytest $(TESTS) $(XDIST) $(if $(SHUFFLE),--shuffle-seed=$(SHUFFLE)) $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: setup
	@$(IN_ENV) python -m pytest $(TESTS) -m "not slow" $(XDIST) $(if $(SHUFFLE),--shuffle-seed=$(SHUFFLE)) $(PYTEST_ARGS)

test-capped: setup
	@$(IN_ENV) env $(CPU_CAP_ENV) python -m pytest $(TESTS) -m parity $(XDIST) $(PYTEST_ARGS)

bench-ros: setup
	@$(IN_ENV) python bench/ros_overhead.py

demo: setup
	@$(IN_ENV) matchanything demo

lint: setup
	@$(IN_ENV) ruff check .

typecheck: setup
	@$(IN_ENV) mypy

clean:
	rm -rf $(ROOT)/build $(ROOT)/install $(ROOT)/log

distclean: clean
	rm -rf $(ROOT)/.venv $(ROOT)/*.egg-info

# The node's soak test for 10 minutes (CI runs it for 2): 30 Hz stereo, CPU matcher, faults injected;
# prints RSS/threads/fds and latency p50/p99 (docs/node.md, "Soak").
.PHONY: soak
soak: setup
	@$(IN_ENV) MATCHANYTHING_SOAK_S=600 python -m pytest test/test_node_soak.py -s $(PYTEST_ARGS)
