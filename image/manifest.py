# The frozen modules of the charger image: the one manifest that both the
# ESP32 image build (`make image`, FROZEN_MANIFEST=image/manifest.py) and the
# device runtime (device-runtime/manifest.py) freeze, so the two cannot drift.
#
# Evaluated by MicroPython's tools/manifestfile.py; paths are relative to
# this file. Options:
#   device_runtime=True  the unix-port build of the device runtime. The
#       ESP32 board manifest freezes ports/esp32/modules (drivers that import
#       the esp32 module) and cannot be included from another port, so its
#       micropython-lib requirements are listed here instead; a host test
#       (tests/host/test_device_runtime.py) checks they are the same list.
options.defaults(device_runtime=False)

# What ports/esp32/boards/manifest.py (v1.28.0) requires from micropython-lib.
ESP32_REQUIRES = ("bundle-networking", "aioespnow", "dht", "ds18x20", "neopixel", "onewire",
                  "umqtt.robust", "umqtt.simple", "upysh")

if options.device_runtime:
    include("$(MPY_DIR)/extmod/asyncio")
    for _name in ESP32_REQUIRES:
        require(_name)
else:
    # Everything the release image freezes: ports/esp32/modules, asyncio,
    # bundle-networking, umqtt.simple 1.7.0, umqtt.robust, ...
    include("$(PORT_DIR)/boards/manifest.py")

# The firmware package, whole: every module in it runs on the charger. The
# simulated board and EV live in tools/simboard, outside it, so nothing has
# to be left out by name.
package("firmware", base_path="..")
