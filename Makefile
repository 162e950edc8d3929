# eagle-dr: everything a fresh Debian machine with only Python needs goes through here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SYSTEM_PACKAGES := postgresql redis-server redis-sentinel prometheus-alertmanager prometheus pgbackrest openssl
# The Temporal UI browser test (tests/test_ui_browser.py, helper tests/browser.py) drives Debian's
# Chromium through Playwright's executable_path, so no browser is downloaded. chromium-driver is
# /usr/bin/chromedriver of the same version, for WebDriver clients (Selenium). The emoji font makes
# the runbooks' step marks legible in the screenshots the test keeps.
TEST_PACKAGES   := chromium chromium-driver fonts-noto-color-emoji
BENCH_PACKAGES  := patroni etcd-server

.PHONY: setup system venv lab lab-down drill status test test-long faults bench clean

setup: system venv

# Debian packages for the lab's real servers and the browser test (installed only when missing; needs root).
system:
	@missing=""; for p in $(SYSTEM_PACKAGES) $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 2; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

lab: setup
	$(BIN)/eagle-dr lab up

# The whole DR drill on a fresh lab: switchover, a real outage, detection, failover, report.
drill: setup
	$(BIN)/eagle-dr lab reset
	$(BIN)/eagle-dr lab up
	$(BIN)/eagle-dr drill

lab-down:
	$(BIN)/eagle-dr lab down

status:
	$(BIN)/eagle-dr status

# pytest exits 5 when it collects nothing; that must not pass silently as green, nor
# fail the run as if a test had failed: it is reported.
# Three pytest-xdist processes, each with a lab and dev server of its own 350 ports apart
# (tests/conftest.py); a file's tests stay in order in one process. On this 2-core machine the
# suite waits on servers more than it computes: one process took 33 min, over CI's 30; two
# took 24.5-25.5 min; three 19 min (860 tests, the same run's slowest tests as slow as with
# two). TEST_PROCS=0 runs in this process (pdb, -x).
TEST_PROCS ?= 3
TEST_DIST = $(if $(filter 0,$(TEST_PROCS)),,-n $(TEST_PROCS) --dist loadfile)
test: setup
	$(BIN)/python -m pytest $(TEST_DIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

# The long variants `make test` leaves out to stay within CI's 30 minutes (marked `long`).
test-long: setup
	EAGLE_DR_LONG=all $(BIN)/python -m pytest -m long $(PYTEST_ARGS)

# The whole fault-injection suite (tests/faults): every fault x runbook, with its table.
# `make test` runs only its representative subset (the rest is marked slow_fault).
faults: setup
	EAGLE_DR_FAULTS=all $(BIN)/python -m pytest tests/faults -m faults -v $(PYTEST_ARGS)

# Not a test: timings beside Patroni + etcd measured in the same run (Debian packages).
bench: setup
	@for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(BIN)/python -m bench.failover --runs $${RUNS:-5}
	$(BIN)/python -m bench.conflicts --sizes $${CONFLICT_SIZES:-100000,1000000}
	$(BIN)/python -m bench.failback --gb $${FAILBACK_GB:-1.0}
	$(BIN)/python -m bench.wal_scan --mb $${WAL_MB:-100,400}
	$(BIN)/python -m bench.backup --gb $${BACKUP_GB:-1.0}
	$(BIN)/python -m bench.alerts --alerts $${ALERTS:-500}
	$(BIN)/python -m bench.consistency --rows $${ROWS:-10000000}

# Root running from a clone the lab user cannot enter keeps the state in /var/lib/eagle-dr-lab
# (lab/osuser.py reachable_state_dir): remove that too, and nothing else outside the checkout.
clean: lab-down
	rm -rf .eagle-dr
	-@$(BIN)/python -c 'import shutil; from pathlib import Path; from eagle_dr.config import load_config; \
	  from lab.osuser import RELOCATED_STATE_ROOT; s = Path(load_config().lab.state_dir); \
	  s.parent == RELOCATED_STATE_ROOT and shutil.rmtree(s, ignore_errors=True)'
