# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The cpu extra adds oneDNN convolutions for XLA:CPU (Linux x86-64; nothing elsewhere):
# `make demo` and `make test` run on a CPU. EXTRAS=test gives the plain install.
EXTRAS ?= test,cpu

.PHONY: demo test venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) run.py --config=configs/demo.py --workdir=workdirs/demo

# Two test processes (pytest-xdist), each test file in one of them (module fixtures are
# built once): on a 2-core machine compilation and subprocess start-up overlap.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q tests $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
