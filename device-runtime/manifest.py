# Frozen into the device runtime: the charger image's modules (the same
# manifest the ESP32 image build uses) and the simulated board and EV, which
# only a simulated charger has.
include("../image/manifest.py", device_runtime=True)
package("simboard", base_path="../tools")
