# Set-up and everyday commands. Every target creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-all lint bench

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	touch $(STAMP)

serve: $(STAMP)  ## start the OpenAI-compatible server on the embedded default model
	$(BIN)/lightgate serve $(ARGS)

test: $(STAMP)  ## the default test tier (CPU, a few minutes)
	$(BIN)/ruff check engine openai_compat bench tests scripts
	$(BIN)/mypy  # engine, openai_compat, bench: [tool.mypy] in pyproject.toml
	$(BIN)/python -m pytest -q -x $(ARGS)

test-all: $(STAMP)  ## every tier that runs on this machine, slow tests included
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

bench: $(STAMP)  ## the offline benchmark against transformers on the default model
	$(BIN)/lightgate bench offline $(ARGS)
