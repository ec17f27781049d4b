// The device runtime: MicroPython's unix port configured like the ESP32 port
// of the same release, so that the firmware's tests run on what a charger runs.
// - single-precision floats, as MICROPY_FLOAT_IMPL on the ESP32 port (an
//   ESP32 has a single-precision FPU); this must come before the common header;
// - the ESP32 port's feature level (ports/esp32/mpconfigport.h:
//   MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES).
// 32-bit words and threads under a GIL come from mpconfigvariant.mk.
#define MICROPY_FLOAT_IMPL (MICROPY_FLOAT_IMPL_FLOAT)
#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)

// Resolved through -I. (ports/unix), as this folder lives outside the tree.
#include "variants/mpconfigvariant_common.h"
