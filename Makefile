# agent-comms: every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BIND ?= 127.0.0.1:8080
DB ?= ./data/messages.db

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/.installed: service/pyproject.toml client/pyproject.toml tests/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./service -e ./client -r tests/requirements.txt
	touch $@

.PHONY: venv
venv: $(BIN)/.installed ## Create the virtualenv: the broker, agent-chat and the test tools

.PHONY: run
run: venv ## Run the broker in the foreground on $(BIND) with $(DB)
	mkdir -p $(dir $(DB))
	$(BIN)/agent-comms-broker serve --bind $(BIND) --db $(DB)

.PHONY: test
test: lint ## ruff, then the test suite (starts real brokers on loopback ports)
	$(BIN)/pytest

WHEELHOUSE ?= build/wheelhouse

.PHONY: wheelhouse
wheelhouse: venv ## Build wheels of the broker, agent-chat and every dependency (for hosts without internet)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELHOUSE) ./service ./client

.PHONY: bench
bench: venv ## Run the benchmarks and print their figures
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py

.PHONY: lint
lint: venv ## ruff over everything
	$(BIN)/ruff check service client tests bench

.PHONY: clean
clean: ## Remove the virtualenv and caches (keeps ./data)
	rm -rf $(VENV) .pytest_cache .ruff_cache
