# rumor developer entry points. Every target creates .venv when missing and installs the
# project into it, with torch pinned so that pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.rumor-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow chaos lint format bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Chaos schedules against a real eight-node cluster in network namespaces (needs root):
# one line per schedule and a summary (tests/chaos_run.py). SCENARIO: runs of the named
# scenario per rule.
SEEDS ?= 5
SCENARIO ?= 0
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos_run --seeds $(SEEDS) --scenario $(SCENARIO)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

proto: $(STAMP)
	$(BIN)/python protocol/protogen.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache .ruff_cache
