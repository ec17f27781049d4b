# Device entry point (DESIGN.md §2): build the hardware layer, wire the
# application and run it under the supervisor, which forces the safe state
# (contactor open, pilot static +12 V) on any unhandled error.
from firmware.start import main

main()
