"""Build the hardware layer and the application for the platform, and run it
under the supervisor. Called by ``main.py``; not pure (it owns the wiring).

* ``esp32``: :class:`firmware.hal_esp32.Esp32Board`, settings on the device's
  root, ``machine.reset()`` after a crash (the reason is kept in RTC memory).
  Ctrl-C at the REPL leaves the board safe and returns to the prompt.
* anything else (the MicroPython unix port, CPython): the simulated board,
  controlled over UDP; see :func:`sim`.
"""
import sys
import time

from firmware import app, settings
from firmware.supervisor import supervise


def esp32():
    """Run the charger on ESP32 hardware. Does not return except on Ctrl-C."""
    import machine
    from firmware.hal_esp32 import Esp32Board

    board = Esp32Board()
    board.safe_state()
    cfg, _secrets = settings.load("")
    charger = app.Charger(board, time, cfg, print)

    def crashed(exc):
        if isinstance(exc, KeyboardInterrupt):
            print("stopped: contactor open, pilot static +12 V")
            return
        board.write_reset_reason("crash: %s: %s" % (type(exc).__name__, exc))
        sys.print_exception(exc)  # type: ignore[attr-defined]
        time.sleep_ms(1000)
        machine.reset()

    supervise(lambda: app.run(charger, time), board, crashed)


def _arg(argv, name, default):
    if name in argv:
        i = argv.index(name)
        if i + 1 < len(argv):
            return argv[i + 1]
        raise SystemExit("%s needs a value" % name)
    return default


def sim(argv):
    """Run one simulated charger on the unix port.

    Options: ``--dir DIR`` (where settings.json and secrets.json live,
    default ``.``), ``--ctl-port N`` (UDP control port on 127.0.0.1, default
    7700). Prints events to stdout; exits 0 on the ``quit`` command, 1 after a
    crash (the board having been made safe first).
    """
    from firmware.hal_sim import SimBoard, UdpControl

    directory = _arg(argv, "--dir", ".")
    port = int(_arg(argv, "--ctl-port", "7700"))
    board = SimBoard(time)
    cfg, _secrets = settings.load(directory)

    def log(text):
        print("[%s] %s" % (cfg["charger_id"], text))

    charger = app.Charger(board, time, cfg, log)
    control = UdpControl(board, charger, port)
    log("simulated board on udp 127.0.0.1:%d" % port)

    def crashed(exc):
        if isinstance(exc, SystemExit) and not exc.args:
            return 0
        print("crash: %s: %s (board made safe)" % (type(exc).__name__, exc))
        return 1

    code = supervise(lambda: app.run(charger, time, control.poll), board, crashed)
    control.close()
    sys.exit(code or 0)


def main():
    """Entry point for ``main.py``."""
    if sys.platform == "esp32":
        esp32()
    else:
        sim(sys.argv)
