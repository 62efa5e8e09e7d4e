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

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
