"""One simulated charger on the device runtime: the firmware's own core and
edges (:func:`firmware.start.build`) on the simulated board, plus the UDP
control channel a harness drives it with. ``main.py`` calls :func:`main` on
any platform but the ESP32.
"""
import sys
import time

from firmware import loop, start
from firmware.core import atomicfile, settings
from firmware.version import FW


def _arg(argv, name, default):
    if name in argv:
        i = argv.index(name)
        if i + 1 < len(argv):
            return argv[i + 1]
        raise SystemExit("%s needs a value" % name)
    return default


def main(argv):
    """Run one simulated charger on the unix port.

    Options: ``--dir DIR`` (the charger's root: settings.json, secrets.json,
    faults.json, ota.json and the OTA slots; default ``.``), ``--ctl-port N``
    (UDP control port on 127.0.0.1, default 7700), ``--reset-cause TEXT``
    (what the board reports as its reset reason; the harness's watchdog
    passes ``watchdog``), ``--repl`` (return to the REPL of ``micropython
    -i`` with the control loop running, for :mod:`firmware.diag`),
    ``--tick-offset MS`` (the board and the charger run on a
    :class:`simboard.board.WrapClock` whose ``ticks_ms`` starts at MS and
    wraps at 2^30 ms like the ESP32's; e.g. 2^30 - 20000 crosses the wrap
    20 s after boot, C6; without it they use ``time``), ``--flash-ms MS``
    (each file write on the charger's root takes MS longer, as a littlefs
    erase does on the ESP32; default 0). With ``mqtt_host`` set it connects
    to that broker like a real charger. Exits 0 on the ``quit`` command, 3
    on a reboot (a ``reboot`` command or a switched OTA update, by the stop
    path), 1 after a crash (the board made safe each time).
    """
    from simboard.board import SimBoard, SlowFs
    from simboard.control import UdpControl

    directory = _arg(argv, "--dir", ".")
    try:
        port = int(_arg(argv, "--ctl-port", "7700"))
        flash_ms = int(_arg(argv, "--flash-ms", "0"))
    except ValueError:
        raise SystemExit("error: --ctl-port and --flash-ms must be numbers")
    clock = time
    offset = _arg(argv, "--tick-offset", None)
    if offset is not None:
        from simboard.board import TICKS_PERIOD, WrapClock
        try:
            first = int(offset)
        except ValueError:
            raise SystemExit("error: --tick-offset must be a number of ms")
        if not 0 <= first < TICKS_PERIOD:
            raise SystemExit("error: --tick-offset must be 0..2^30-1 ms")
        clock = WrapClock(first)
    board = SimBoard(clock)
    board.reset_reason = _arg(argv, "--reset-cause", "power_on")
    fs = SlowFs(flash_ms) if flash_ms > 0 else atomicfile.FS
    cfg, secrets = settings.load(directory, fs)

    def log(text):
        print("[%s] %s" % (cfg["charger_id"], text))

    charger, bridge, edges = start.build(board, clock, cfg, secrets, directory, log)
    try:
        control = UdpControl(board, charger, port)
    except OSError as exc:
        raise SystemExit("error: cannot listen on udp 127.0.0.1:%d: %s" % (port, exc))
    edges.append(loop.Edge("sim control", control.poll, clock, charger.log))
    log("simulated board on udp 127.0.0.1:%d, firmware %s" % (port, FW))

    def crashed(exc):
        if isinstance(exc, SystemExit):
            return exc.args[0] if exc.args else 0
        print("crash: %s: %s (board made safe)" % (type(exc).__name__, exc))
        return 1

    done = []
    start.attach(charger, bridge, None)
    start.start_control(charger, board, edges, crashed, done)
    if "--repl" in argv:
        return
    while not done:
        time.sleep_ms(50)
    charger.writer.flush()           # the board is safe: what is unsaved goes to flash now
    if bridge.link is not None:
        bridge.link.stop()
    control.close()
    sys.exit(done[0] or 0)
