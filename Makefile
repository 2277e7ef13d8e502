# repmgr-vip: set-up, tests and the lab demo on a Debian 12 machine, as root.
VENV ?= /opt/repmgr-vip/venv
PY := $(VENV)/bin/python
# Every program the lab, the tests, the bench and the demo run comes from one of these
# (lab/ PREREQUISITES maps each program to its package; a unit test keeps the
# two in step).
DEBS := postgresql-15 postgresql-client-15 postgresql-15-repmgr openssh-server openssh-client \
        sudo passwd iputils-arping iputils-ping iproute2 procps psmisc python3 python3-venv \
        util-linux mount git strace
PYTEST_ARGS ?=

.PHONY: setup debs venv install lint test unit lab-test demo clean-labs

setup: debs pkg-debs venv install promtool

debs:
	@if ! dpkg -s $(DEBS) >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); fi

# The venv lives outside the checkout with Debian's Python, so that the postgres user (which
# runs repmgr's hooks) can execute it even when the checkout is under /root.
venv:
	@test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null

# A real (non-editable) install: the hooks run the copy in the venv, readable by postgres.
# build/ is setuptools' in-tree staging: a module removed or moved in the source would
# otherwise be installed again from it.
install:
	@rm -rf build
	@$(PY) -m pip install -q '.[test]'
	@$(PY) -m pip install -q --no-deps --force-reinstall . >/dev/null

# ruff, mypy strict, and the layers (pyproject.toml [tool.importlinter]: cli -> app ->
# adapters -> config -> core, arrows pointing down only).
lint:
	$(VENV)/bin/ruff check src tests demo bench lab
	$(VENV)/bin/mypy
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache

unit:
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# Unit tests run the source tree (installed in the venv); the lab runs the Debian package,
# the artifact users install (RV_UNDER_TEST, read by tests/integration/vipconf.py).
test: setup lint deb-install
	RV_UNDER_TEST=/usr/bin/repmgr-vip RV_DEB=$(DEB) $(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	@$(PY) -m pip install -q matplotlib >/dev/null
	$(PY) -m demo

clean-labs:
	/usr/bin/python3 -m lab list

# Timings in the lab: a Markdown table, bench/results/latest.json and failover.png (~25 min),
# of the Debian package as a Debian 12 server runs it (/usr/bin/repmgr-vip). matplotlib only
# draws the picture; BENCH_RUNS=N repetitions per size (default 3), BENCH_SIZES=3,7,
# BENCH_DAEMON_SECONDS=60.
.PHONY: bench
bench: setup deb-install
	@$(PY) -m pip install -q matplotlib >/dev/null
	RV_UNDER_TEST=/usr/bin/repmgr-vip $(PY) -m bench

# --- The Debian package -------------------------------------------------------------------
# What `make deb` needs to build (debhelper, pybuild), what the package depends on, lintian
# and man for the package tests, and promtool for the alert-rule tests. promtool is taken out
# of Debian's prometheus package rather than installing it: no server, no service, no user.
PKG_DEBS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
            python3-psycopg python3-prometheus-client lintian man-db
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DIST ?= dist
DEB := $(DIST)/repmgr-vip_$(VERSION)_all.deb
PROMTOOL := $(VENV)/bin/promtool

.PHONY: pkg-debs promtool deb deb-install lintian
pkg-debs:
	@if ! dpkg -s $(PKG_DEBS) >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $(PKG_DEBS); fi

promtool:
	@if [ ! -x $(PROMTOOL) ]; then \
	  tmp=$$(mktemp -d) && chmod 755 $$tmp && cd $$tmp && \
	  { apt-get download -q -o APT::Sandbox::User=root prometheus >/dev/null || \
	    { apt-get update -q && apt-get download -q -o APT::Sandbox::User=root prometheus; }; } && \
	  dpkg-deb -x prometheus_*.deb root && mkdir -p $(VENV)/bin && \
	  install -m 755 root/usr/bin/promtool $(PROMTOOL) && rm -rf $$tmp; fi

# Built from a copy in $(DIST)/build so the checkout stays clean and checkouts side by side
# do not collide in their common parent; the .deb, .changes and .buildinfo land in $(DIST)/.
deb: pkg-debs
	rm -rf $(DIST)/build && mkdir -p $(DIST)/build/repmgr-vip
	tar -c --exclude=./dist --exclude=./.git --exclude=./build --exclude='*.egg-info' \
	  --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
	  --exclude=.pytest_cache --exclude=./bench/results -f - . \
	  | tar -x -C $(DIST)/build/repmgr-vip
	cd $(DIST)/build/repmgr-vip && env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	  dpkg-buildpackage -us -uc -b >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	mv $(DIST)/build/repmgr-vip_$(VERSION)_* $(DIST)/
	@echo "built $(DEB)"

deb-install: deb
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
	  --reinstall $(abspath $(DEB))

lintian: deb
	lintian --info --display-info $(DEB)
