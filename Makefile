# repmgr-vip: set-up, tests and the lab demo on a Debian 12 machine, as root.
VENV ?= /opt/repmgr-vip/venv
PY := $(VENV)/bin/python
# Every program the lab, the tests, the bench and the demo run comes from one of these
# (tests/lab/lab.py PREREQUISITES maps each program to its package; a unit test keeps the
# two in step).
DEBS := postgresql-15 postgresql-client-15 postgresql-15-repmgr openssh-server openssh-client \
        sudo passwd iputils-arping iputils-ping iproute2 procps psmisc python3 python3-venv \
        util-linux mount git
PYTEST_ARGS ?=

.PHONY: setup debs venv install lint test unit lab-test demo clean-labs

setup: debs venv install

debs:
	@if ! dpkg -s $(DEBS) >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); fi

# The venv lives outside the checkout with Debian's Python, so that the postgres user (which
# runs repmgr's hooks) can execute it even when the checkout is under /root.
venv:
	@test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null

# A real (non-editable) install: the hooks run the copy in the venv, readable by postgres.
install:
	@$(PY) -m pip install -q '.[test]'
	@$(PY) -m pip install -q --no-deps --force-reinstall . >/dev/null

lint:
	$(VENV)/bin/ruff check src tests demo
	$(VENV)/bin/mypy

unit:
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test: setup lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	@$(PY) -m pip install -q matplotlib >/dev/null
	$(PY) -m demo

clean-labs:
	/usr/bin/python3 -m tests.lab list

# Timings in the lab: a Markdown table, bench/results/latest.json and failover.png (~7 min).
# matplotlib only draws the picture; BENCH_RUNS=N repetitions per size (default 3 at 3 nodes,
# 2 at 7), BENCH_SIZES=3,7, BENCH_DAEMON_SECONDS=60.
.PHONY: bench
bench: setup
	@$(PY) -m pip install -q matplotlib >/dev/null
	$(PY) -m bench
