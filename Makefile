# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Main job on the built-in synthetic data (no download): train a lite model, evaluate, write overlays.
demo: venv
	$(PY) -m donuseg_jax.main --config=configs/demo.py:lite --workdir=$(WORKDIR)

# The whole test suite, on CPU, with 4 fake devices for the sharding tests (set in tests/conftest.py).
test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
