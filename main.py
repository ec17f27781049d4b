# Device entry point (DESIGN.md §2). It picks the firmware slot (factory or
# an OTA slot, with rollback, see firmware/ota/boot.py, which always comes
# from the factory firmware), then builds the hardware layer and runs the
# application under the fail-safe (firmware/failsafe.py), which forces the safe state (contactor
# open, pilot static +12 V) on any unhandled error.
import sys

from firmware.ota import boot as otaboot

_root = "/" if sys.platform == "esp32" else (sys.argv[sys.argv.index("--dir") + 1] if "--dir" in sys.argv else ".")
_slot, _path = otaboot.select(_root)
if _path:
    otaboot.activate(_path)
try:
    from firmware.start import main
    main()
except Exception as exc:  # the firmware failed before its supervisor ran: a bad update
    print("firmware in slot %s failed to start: %r; resetting (a pending update rolls back)" % (_slot, exc))
    if sys.platform == "esp32":
        import machine
        machine.reset()
    sys.exit(1)
