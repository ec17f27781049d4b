# Load-sharing EV charger: firmware (MicroPython) and PC tools.
# Every target sets itself up: the first use creates .venv and installs the
# pinned dependencies of requirements-dev.txt and the tools/ package.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed
UMQTT  := lib/umqtt/simple.py
MPY_BUILD := build/mpy
# The device runtime (tools/setup/device-runtime.sh): MicroPython v1.28.0's
# unix port built like the ESP32 port (32-bit, single-precision floats,
# threads under a GIL) with the charger image's frozen modules, and the
# v1.28.0 mpy-cross. Rebuilt only when one of its inputs changes.
RUNTIME := build/device-runtime
MICROPYTHON := $(RUNTIME)/micropython
MPY_CROSS := $(RUNTIME)/mpy-cross
# The folders themselves too: their times change when a file is added,
# removed or renamed, which the files' own times do not show.
FIRMWARE_PY := $(wildcard firmware/*.py firmware/*/*.py)
SIMBOARD_PY := $(wildcard tools/simboard/*.py)
RUNTIME_INPUTS := $(wildcard device-runtime/*) image/manifest.py $(FIRMWARE_PY) $(SIMBOARD_PY) \
	firmware $(wildcard firmware/*/) tools/simboard device-runtime tools/setup/device-runtime.sh
# The MicroPython v1.28.0 sources the runtime is built from (lib/ is copied
# from their micropython-lib).
MPY_SOURCES := build/micropython-1.28.0/.complete
# Heap of the firmware tests on the device runtime. Larger than a charger's:
# the tests' own bytecode is in RAM (the firmware's is frozen), and some build
# 16-100 KB inputs on purpose (oversize manifests, corpus replays). The
# chargers of the simulator, the end-to-end tests and the fault suite run at
# 48 KB (evse_tools.charger_sim.HEAP).
FW_TEST_HEAP ?= 256K

# Device-side files: compiled by mpy-cross and type-checked by pyright.
DEVICE_PY := boot.py main.py $(FIRMWARE_PY) $(SIMBOARD_PY)

.PHONY: help sim charger test test-cpython test-mpy check lib venv clean bench faults flash deploy repl provision sysdeps runtime image

# System packages: mosquitto (the broker of the tests and of make sim),
# gcc-multilib (the 32-bit device runtime) and Node.js (pyright runs on it).
# Installed with apt-get when missing and root, else the exact command is
# printed and make stops.
SYSDEPS := tools/setup/system-packages.sh
sysdeps:
	@$(SYSDEPS) mosquitto gcc-multilib nodejs

runtime: $(MICROPYTHON)
$(MICROPYTHON): $(RUNTIME_INPUTS)
	@$(SYSDEPS) gcc-multilib
	tools/setup/device-runtime.sh
$(MPY_CROSS) $(MPY_SOURCES):
	@$(SYSDEPS) gcc-multilib
	tools/setup/device-runtime.sh

help:
	@echo "make sim         the simulated load group (SCENARIO=garage|shortage|busy-day|gfci)"
	@echo "make charger     one simulated charger, no server"
	@echo "make test        all tests: CPython, the device runtime (MicroPython 1.28.0), make check"
	@echo "make test-cpython / make test-mpy   the two halves of make test"
	@echo "make runtime     build the device runtime (MicroPython 1.28.0, 32-bit, float, GIL) into build/"
	@echo "make image       the ESP32 image with the firmware frozen (DRY_RUN=1: print the commands)"
	@echo "make check       mpy-cross + pyright on every device-side file"
	@echo "make venv        create .venv with the pinned tools (every target does it first)"
	@echo "make bench       benchmarks: tables on stdout, JSON in out/bench.json (QUICK=1: a smoke run)"
	@echo "make faults      fault-injection suite: table on stdout, JSON in out/faults.json (QUICK=1: the CI size)"
	@echo "make lib         install device libraries (umqtt.simple) into lib/"
	@echo "make clean       remove .venv, build/ and installed lib/ code"
	@echo "make flash       write MicroPython to a charger: IMAGE=file.bin PORT=/dev/ttyUSB0 [CHIP=esp32s3]"
	@echo "make deploy      compile and copy the firmware to a charger: PORT=... [OTA_KEY=pub.json]"
	@echo "                 (FROZEN=1: onto a make-image build, boot.py and main.py only)"
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
$(UMQTT): lib/manifest.json | $(STAMP) $(MPY_SOURCES)
	$(BIN)/evse-fetch-lib --lib lib

# The main job: a simulated load group end to end (DESIGN.md §7).
SCENARIO ?= garage
sim: $(STAMP) $(MICROPYTHON)
	@$(SYSDEPS) mosquitto
	$(BIN)/evse-sim $(SCENARIO) --out out

# One charger on the unix port with its simulated board, and no server.
charger: $(STAMP) $(MICROPYTHON)
	$(BIN)/evse-charger

test: sysdeps $(STAMP) $(MICROPYTHON) $(UMQTT)
	$(MAKE) --no-print-directory test-cpython
	$(MAKE) --no-print-directory test-mpy
	$(MAKE) --no-print-directory check

test-cpython: $(STAMP) $(MICROPYTHON) $(UMQTT)
	@echo "== firmware logic and tools under CPython (pytest)"
	$(BIN)/python -m pytest -q

# Signed OTA bundles for the firmware tests: made fresh by CPython (the key is
# thrown away), read by both runtimes.
OTA_FIXTURES := $(CURDIR)/build/ota-fixtures

# The firmware under test is the frozen one (MICROPYPATH has no firmware/
# folder, and tests/ holds none): what a charger runs.
test-mpy: $(STAMP) $(MICROPYTHON)
	@echo "== firmware logic on the device runtime, heap $(FW_TEST_HEAP)"
	$(BIN)/python tests/make_fixtures.py $(OTA_FIXTURES)
	cd tests && EVSE_FIXTURES=$(OTA_FIXTURES) MICROPYPATH=.frozen:$(CURDIR)/tests/fw \
		$(CURDIR)/$(MICROPYTHON) -X heapsize=$(FW_TEST_HEAP) mpy_run.py

check: $(STAMP) $(MPY_CROSS)
	@echo "== mpy-cross v1.28.0 on $(words $(DEVICE_PY)) device-side files"
	@rm -rf $(MPY_BUILD)
	@set -e; for f in $(DEVICE_PY); do \
		mkdir -p $(MPY_BUILD)/$$(dirname $$f); \
		$(MPY_CROSS) -o $(MPY_BUILD)/$${f%.py}.mpy $$f; \
	done; echo "compiled: $$(find $(MPY_BUILD) -name '*.mpy' | wc -l) files, $$(cat $$(find $(MPY_BUILD) -name '*.mpy') | wc -c) bytes"
	@echo "== pyright (micropython-esp32-stubs)"
	$(BIN)/pyright --typeshedpath "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" $(DEVICE_PY)

# Benchmarks print figures; they are never timed assertions in tests.
bench: $(STAMP) $(MICROPYTHON)
	@$(SYSDEPS) mosquitto
	$(BIN)/python -m evse_tools.bench.run --out out/bench.json $(if $(QUICK),--quick,)

# Fault injection end to end (issue 6): about 14 minutes; QUICK=1 about 4.
faults: $(STAMP) $(MICROPYTHON)
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

# The ESP32 image with the firmware frozen in (image/build.sh; needs ESP-IDF,
# which it installs: about 3 GB and 20-40 minutes the first time).
image:
	image/build.sh $(if $(filter 1,$(DRY_RUN)),--dry-run)

flash: $(STAMP)
	$(if $(IMAGE),,$(error usage: make flash IMAGE=path/to/micropython.bin PORT=/dev/ttyUSB0 [CHIP=esp32s3]))
	$(DEPLOY) flash $(DRY) --port $(PORT) --image $(IMAGE) $(if $(CHIP),--chip $(CHIP))

deploy: $(STAMP) $(MICROPYTHON) $(UMQTT)
	$(DEPLOY) deploy $(DRY) --port $(PORT) $(if $(OTA_KEY),--ota-key $(OTA_KEY)) $(if $(filter 1,$(FROZEN)),--frozen)

repl: $(STAMP)
	$(DEPLOY) repl $(DRY) --port $(PORT)

provision: $(STAMP)
	$(DEPLOY) provision $(DRY) --port $(PORT) $(ARGS)
