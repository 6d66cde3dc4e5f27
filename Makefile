# Kozan: the two quick-start commands, and the rest of the developer's loop.
#   make run    set up the runtime and run the station on its built-in simulated line
#   make test   set up the test environment and run the whole suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: run test sim train-env clean-venv

$(VENV)/.runtime: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kozan needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install -q -e '.[dev]'
	@# the HMI's browser tests drive Debian's chromium (Playwright's own download is not used)
	@test -x /usr/bin/chromium || { apt-get update && apt-get install -y chromium fonts-noto-cjk; }
	@# the plant-link tests start a real MQTT broker and PostgreSQL server on loopback (docs/PLANT.md)
	@test -x /usr/sbin/mosquitto && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto postgresql; }
	@touch $@

run: $(VENV)/.runtime
	$(VENV)/bin/kozan run

# the loop-closing test (tests/loop) fine-tunes a detector: CI needs the pinned train extra too
# (torch/torchvision wheels come from the machine's disk, so this takes a minute or two, once)
$(VENV)/.train: $(VENV)/.dev
	$(PIP) install -q -e '.[train,dev]'
	@touch $@

test: $(VENV)/.train
	$(VENV)/bin/python -m pytest

sim: $(VENV)/.runtime
	$(VENV)/bin/kozan sim --items 1000 --seed 7 --fast --json

# Training and export: torch + ultralytics (about 6 GB), never needed by the station itself.
train-env: $(VENV)/.train

clean-venv:
	rm -rf $(VENV)
