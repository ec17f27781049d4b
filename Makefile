# Load-sharing EV charger: firmware (MicroPython) and PC tools.
# Every target sets itself up: the first use creates .venv and installs the
# pinned dependencies of requirements-dev.txt and the tools/ package.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed
UMQTT  := lib/umqtt/simple.py
MPY_BUILD := build/mpy

# Device-side files: compiled by mpy-cross and type-checked by pyright.
DEVICE_PY := boot.py main.py $(wildcard firmware/*.py)
# MicroPython's module path (it replaces the default, so .frozen stays first).
FW_PATH := .frozen:$(CURDIR):$(CURDIR)/lib

.PHONY: help sim charger test test-cpython test-mpy check lib venv clean bench faults flash deploy repl provision sysdeps

# System packages: mosquitto (the broker of the tests and of make sim) and
# Node.js (pyright runs on it). Installed with apt-get when missing and root,
# else the exact command is printed and make stops.
SYSDEPS := tools/setup/system-packages.sh
sysdeps:
	@$(SYSDEPS) mosquitto nodejs

help:
	@echo "make sim         the simulated load group (SCENARIO=garage|shortage|busy-day|gfci)"
	@echo "make charger     one simulated charger, no server"
	@echo "make test        all tests: CPython, MicroPython unix port, make check"
	@echo "make test-cpython / make test-mpy   the two halves of make test"
	@echo "make check       mpy-cross + pyright on every device-side file"
	@echo "make venv        create .venv with the pinned tools (every target does it first)"
	@echo "make bench       benchmarks: tables on stdout, JSON in out/bench.json (QUICK=1: a smoke run)"
	@echo "make faults      fault-injection suite: table on stdout, JSON in out/faults.json (QUICK=1: the CI size)"
	@echo "make lib         install device libraries (umqtt.simple) into lib/"
	@echo "make clean       remove .venv, build/ and installed lib/ code"
	@echo "make flash       write MicroPython to a charger: IMAGE=file.bin PORT=/dev/ttyUSB0 [CHIP=esp32s3]"
	@echo "make deploy      compile and copy the firmware to a charger: PORT=... [OTA_KEY=pub.json]"
	@echo "make repl        the charger's serial REPL: PORT=..."
	@echo "make provision   write a charger's settings and secrets: PORT=... ARGS=\"--id garage-1 ...\""
	@echo "                 (each takes DRY_RUN=1: print the exact commands, touch no device)"

venv: $(STAMP)
$(STAMP): requirements-dev.txt tools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q -e tools
	touch $@

lib: $(UMQTT)
$(UMQTT): lib/manifest.json | $(STAMP)
	$(BIN)/evse-fetch-lib --lib lib

# The main job: a simulated load group end to end (DESIGN.md §7).
SCENARIO ?= garage
sim: $(STAMP) $(UMQTT)
	@$(SYSDEPS) mosquitto
	$(BIN)/evse-sim $(SCENARIO) --out out

# One charger on the unix port with its simulated board, and no server.
charger: $(STAMP) $(UMQTT)
	$(BIN)/evse-charger

test: $(STAMP) $(UMQTT) sysdeps
	$(MAKE) --no-print-directory test-cpython
	$(MAKE) --no-print-directory test-mpy
	$(MAKE) --no-print-directory check

test-cpython: $(STAMP)
	@echo "== firmware logic and tools under CPython (pytest)"
	$(BIN)/python -m pytest -q

# Signed OTA bundles for the firmware tests: made fresh by CPython (the key is
# thrown away), read by both runtimes.
OTA_FIXTURES := $(CURDIR)/build/ota-fixtures

test-mpy: $(STAMP)
	@echo "== firmware logic under the MicroPython unix port"
	$(BIN)/python tests/make_fixtures.py $(OTA_FIXTURES)
	EVSE_FIXTURES=$(OTA_FIXTURES) MICROPYPATH=$(FW_PATH):$(CURDIR)/tests/fw $(BIN)/micropython tests/mpy_run.py

check: $(STAMP)
	@echo "== mpy-cross on $(words $(DEVICE_PY)) device-side files"
	@rm -rf $(MPY_BUILD)
	@set -e; for f in $(DEVICE_PY); do \
		mkdir -p $(MPY_BUILD)/$$(dirname $$f); \
		$(BIN)/mpy-cross -o $(MPY_BUILD)/$${f%.py}.mpy $$f; \
	done; echo "compiled: $$(find $(MPY_BUILD) -name '*.mpy' | wc -l) files, $$(cat $$(find $(MPY_BUILD) -name '*.mpy') | wc -c) bytes"
	@echo "== pyright (micropython-esp32-stubs)"
	$(BIN)/pyright --typeshedpath "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" $(DEVICE_PY)

# Benchmarks print figures; they are never timed assertions in tests.
bench: $(STAMP) $(UMQTT)
	@$(SYSDEPS) mosquitto
	$(BIN)/python -m evse_tools.bench.run --out out/bench.json $(if $(QUICK),--quick,)

# Fault injection end to end (issue 6): about 14 minutes; QUICK=1 about 4.
faults: $(STAMP) $(UMQTT)
	@$(SYSDEPS) mosquitto
	$(BIN)/python -m evse_tools.faultsuite --out out/faults.json $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build out .pytest_cache .hypothesis lib/umqtt

# Deployment to a real charger (evse-deploy, tools/evse_tools/deploy.py).
# PORT defaults to auto (the only /dev/ttyUSB* or /dev/ttyACM* present);
# DRY_RUN=1 prints the exact esptool/mpremote commands and touches no device.
PORT ?= auto
DEPLOY = $(BIN)/python -m evse_tools.deploy
DRY = $(if $(filter 1,$(DRY_RUN)),--dry-run)

flash: $(STAMP)
	$(if $(IMAGE),,$(error usage: make flash IMAGE=path/to/micropython.bin PORT=/dev/ttyUSB0 [CHIP=esp32s3]))
	$(DEPLOY) flash $(DRY) --port $(PORT) --image $(IMAGE) $(if $(CHIP),--chip $(CHIP))

deploy: $(STAMP) $(UMQTT)
	$(DEPLOY) deploy $(DRY) --port $(PORT) $(if $(OTA_KEY),--ota-key $(OTA_KEY))

repl: $(STAMP)
	$(DEPLOY) repl $(DRY) --port $(PORT)

provision: $(STAMP)
	$(DEPLOY) provision $(DRY) --port $(PORT) $(ARGS)
