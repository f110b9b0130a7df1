# Two commands do all set-up on a fresh machine:
#   make demo   - creates .venv, installs the runtime, runs the daemon on the embedded default
#   make test   - installs the runtime with the dev, train, augment and plc extras, runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_SECONDS ?=
DEMO_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# Test processes (pytest-xdist): 2 halves the suite's time on a 2-core machine; 0 runs it in this
# process, the way to read one failing test's output in order.
TEST_WORKERS ?= 2
TEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: demo test test-slow bench lint clean help

help:
	@echo "make demo   run the daemon on the synthetic strip with the shipped demo model (Ctrl-C stops;"
	@echo "            DEMO_SECONDS=N stops after N seconds)"
	@echo "make test   install the dev, train, augment and plc extras and run the test suite"
	@echo "            (two test processes; TEST_WORKERS=0 runs them in one, TEST_WORKERS=N in N)"
	@echo "make bench  latency benchmark of the demo config (bench-out/bench.json, bench.png)"
	@echo "make lint   pyflakes checks (undefined names, unused imports) and syntax errors"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime only: what a line PC installs (no torch).
$(VENV)/.runtime: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

# Runtime + tests + training (torch==2.13.0 takes the CPU wheel) + defect synthesis (diffusers) +
# the PLC packages, whose real protocol servers the alarm tests run.
$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[dev,train,augment,plc]'
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/inspector run --config $(DEMO_CONFIG) $(if $(DEMO_SECONDS),--seconds $(DEMO_SECONDS),)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(TEST_PARALLEL) $(PYTEST_ARGS)

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m slow $(TEST_PARALLEL) $(PYTEST_ARGS)

bench: $(VENV)/.runtime
	$(BIN)/inspector bench --config $(DEMO_CONFIG) --frames 200 --out bench-out

# pyflakes' checks (F) and syntax errors (E9) only: they find bugs, not style
lint: $(VENV)/.dev
	$(BIN)/python -m flake8 --select=F,E9 inspector export calibration benchmarks deploy tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-out
