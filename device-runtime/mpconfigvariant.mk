# The device runtime's build options (see mpconfigvariant.h for the C side).
# 32-bit words: small ints are 31-bit and time.ticks_ms() wraps at 2^30 ms, as
# on the ESP32 (needs gcc-multilib on a 64-bit Debian host).
MICROPY_FORCE_32BIT = 1
# _thread under a GIL, as on the ESP32 port (sys.implementation._thread == "GIL").
MICROPY_PY_THREAD_GIL = 1
# Not on an ESP32, and their sources are not in the pinned tree.
MICROPY_PY_FFI = 0
MICROPY_PY_BTREE = 0
# The frozen modules: the project's one manifest (image/manifest.py) plus the
# simulated board, through this folder's manifest.py.
FROZEN_MANIFEST = $(VARIANT_DIR)/manifest.py
