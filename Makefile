# Developer entry points. The venv is rebuilt only when pyproject.toml changes (stamp files).
# The distribution's Python when it is 3.11 or newer, else python3 from PATH: Debian builds
# its Python with profile-guided optimisation, which answered 7-8% more queries per second
# here than a plain source build of 3.11 (pyenv's). `make PYTHON=...` picks another.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin

# Debian packages the tests drive: a real authoritative upstream (nsd), peers and tools
# (named-checkzone, promtool and a real Prometheus), and systemd-analyze for the unit in
# deploy/systemd (tests/test_systemd.py).
TEST_PACKAGES := make python3 python3-venv nsd unbound dnsperf bind9-dnsutils bind9-utils \
	knot-dnsutils curl prometheus systemd

.PHONY: run test test-unit lint deps clean

run: $(VENV)/.installed
	$(BIN)/resolver serve $(ARGS)

# Every test, pure and end-to-end (servers, processes, the wheel); tests/conftest.py sorts them
# into the two tiers. The lint and type checks first.
test: lint $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Only the pure tests (no server, no subprocess, no socket): a few seconds, for the edit loop.
test-unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

# ruff, then mypy (strict for resolver/, a lighter profile for tests/, bench/ and tools/; both
# configured in pyproject.toml), then what no mypy flag catches: a Callable[..., X] says nothing
# of what it is called with, so its parameters are written out, or it is a Protocol.
LINTED := resolver tests bench tools
lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy $(LINTED)
	@if grep -rn --include='*.py' -e 'Callable\[\.\.\.,' $(LINTED); then \
		echo "lint: Callable[..., X] above: write out its parameters, or make it a Protocol"; \
		exit 1; \
	fi

# Installs (as root) only the packages that are missing, then stops the system daemons the
# packages start on port 53: the tests run their own on free ports.
deps:
	@missing=$$(for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@for s in nsd unbound prometheus; do \
		if [ -x /etc/init.d/$$s ] && /etc/init.d/$$s status >/dev/null 2>&1; then /etc/init.d/$$s stop || true; fi; \
	done

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
