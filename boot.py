# Runs first at power-up, before main.py. Puts the outputs in their safe state at
# once: pilot static +12 V as a plain GPIO level (not offering current, C8) and
# contactor open. Nothing network-related here.
# The GPIO numbers must match _PILOT_OUT, _RELAY and _GFCI_TEST in
# firmware/hal_esp32.py; they are repeated so that boot does not import the firmware.
from machine import Pin

Pin(25, Pin.OUT, value=1)  # pilot driver: 1 = +12 V static
Pin(26, Pin.OUT, value=0)  # contactor coil driver: 0 = open
Pin(13, Pin.OUT, value=0)  # GFCI self-test winding: off
