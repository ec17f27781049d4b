"""Build the hardware layer and the application for the platform, and run it
under the supervisor. Called by ``main.py``; not pure (it owns the wiring).

The control loop runs on a thread of its own, under the supervisor, so that
the serial REPL stays free for a technician (:mod:`firmware.diag`): the
diagnostics run *beside* the live control loop and go through it for
anything that touches the hardware. Ctrl-C at the REPL therefore does not
stop charging; ``diag.stop()`` does, leaving the board safe.

* ``esp32``: :class:`firmware.hal_esp32.Esp32Board`, settings on the device
  root, WiFi, ``machine.reset()`` after a crash (the reason kept in RTC
  memory), then the REPL.
* anything else (the MicroPython unix port): the simulated board, controlled
  over UDP; see :func:`sim`.
"""
import sys
import time

import _thread

from firmware import app, settings
from firmware.supervisor import supervise
from firmware.version import FW

_STACK = 16384
"""Stack of the control thread, bytes (the ESP32's default of 4 KB is tight)."""
running = None
"""``(charger, uplink, wlan)`` of the running charger, for :mod:`firmware.diag`,
which is imported only when a technician asks for it at the REPL."""
_LINK_STACK = 16384
"""Stack of the MQTT link thread, bytes: it runs the TLS handshake, which
MicroPython's own 16 KB main task is sized for. On the ESP32 a thread's stack
comes from the IDF heap, not from the MicroPython heap."""


def topics(cfg):
    """The charger's MQTT topics (bytes) from ``topic_prefix`` and ``charger_id``."""
    base = "%s/%s/" % (cfg["topic_prefix"], cfg["charger_id"])
    return {"set": (base + "set").encode(), "cmd": (base + "cmd").encode(),
            "state": (base + "state").encode(), "online": (base + "online").encode()}


def link_up(cfg, secrets, charger, root, reboot=None, network_ready=None):
    """Start the MQTT link thread and return the :class:`firmware.uplink.Uplink`
    that the control loop polls, or None when no broker is configured."""
    from firmware import ota
    from firmware.uplink import Uplink

    updater = ota.Updater(root, FW)
    health = ota.Health(root, charger.clock, cfg["ota_health_s"])
    if not cfg["mqtt_host"]:
        charger.log("no mqtt_host set: running without a server")
        return Uplink(charger, None, FW, reboot, updater, health)
    from firmware import mqtt_link

    tls_wrap = None
    if cfg["mqtt_tls"]:
        try:
            cas = mqtt_link.pem_certificates(secrets["ca_cert"])
        except ValueError as exc:
            # Never fall back to plain MQTT or to an unverified broker.
            charger.log("mqtt_tls is set but the CA certificate is unusable (%s): "
                        "running without a server" % exc)
            return Uplink(charger, None, FW, reboot, updater, health)
        tls_wrap = mqtt_link.tls_wrapper(cas, cfg["mqtt_host"])
    elif secrets["ca_cert"] or "mqtt_tls" in cfg.rejected:
        # A CA was provisioned, or mqtt_tls is unreadable: TLS was meant. Plain
        # MQTT would hand the broker password to anyone on the network.
        charger.log("a CA is provisioned or mqtt_tls is unreadable, but TLS is off: not sending "
                    "the broker password in the clear; running without a server")
        return Uplink(charger, None, FW, reboot, updater, health)
    link = mqtt_link.MqttLink(cfg["charger_id"], cfg["mqtt_host"], cfg["mqtt_port"], topics(cfg),
                              cfg["keepalive_s"], secrets["mqtt_user"] or None,
                              secrets["mqtt_password"] or None, network_ready=network_ready,
                              tls_wrap=tls_wrap)
    if sys.platform == "esp32":
        _thread.stack_size(_LINK_STACK)   # before the thread starts, or it gets 4 KB
    link.start()
    charger.log("mqtt link to %s:%d%s started" % (cfg["mqtt_host"], cfg["mqtt_port"],
                                                  " (TLS)" if tls_wrap else ""))
    return Uplink(charger, link, FW, reboot, updater, health)


def _attach(charger, uplink, wlan):
    global running
    running = (charger, uplink, wlan)
    diag = sys.modules.get("firmware.diag")
    if diag is not None:            # imported before the charger started
        diag.attach(charger, uplink, wlan)


def _start_control(charger, board, poll, crashed, done):
    """Run the control loop under the supervisor on its own thread; ``done``
    (a list) receives the exit status when it ends."""
    def body():
        done.append(supervise(lambda: app.run(charger, charger.clock, poll), board, crashed))

    if sys.platform == "esp32":
        _thread.stack_size(_STACK)
    _thread.start_new_thread(body, ())


def esp32():
    """Run the charger on ESP32 hardware; returns to the REPL while the
    control loop runs on."""
    import machine
    import network
    from firmware.hal_esp32 import Esp32Board

    board = Esp32Board()
    board.safe_state()
    cfg, secrets = settings.load("")
    charger = app.Charger(board, time, cfg, print)
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if secrets["wifi_ssid"]:
        wlan.connect(secrets["wifi_ssid"], secrets["wifi_password"])  # returns at once

    def reboot():
        board.safe_state()
        board.write_reset_reason("reboot")
        machine.reset()

    uplink = link_up(cfg, secrets, charger, "/", reboot, wlan.isconnected)

    def crashed(exc):
        if isinstance(exc, SystemExit):      # diag.stop(): stay safe, no reset
            return 0
        board.write_reset_reason("crash: %s: %s" % (type(exc).__name__, exc))
        sys.print_exception(exc)  # type: ignore[attr-defined]
        time.sleep_ms(1000)
        machine.reset()

    _attach(charger, uplink, wlan)
    _start_control(charger, board, uplink.poll, crashed, [])


def _arg(argv, name, default):
    if name in argv:
        i = argv.index(name)
        if i + 1 < len(argv):
            return argv[i + 1]
        raise SystemExit("%s needs a value" % name)
    return default


def sim(argv):
    """Run one simulated charger on the unix port.

    Options: ``--dir DIR`` (the charger's root: settings.json, secrets.json,
    faults.json, ota.json and the OTA slots; default ``.``), ``--ctl-port N``
    (UDP control port on 127.0.0.1, default 7700), ``--reset-cause TEXT``
    (what the board reports as its reset reason; the harness's watchdog
    passes ``watchdog``), ``--repl`` (return to the REPL of ``micropython
    -i`` with the control loop running, for :mod:`firmware.diag`),
    ``--tick-offset MS`` (the board and the charger run on a
    :class:`firmware.hal_sim.WrapClock` whose ``ticks_ms`` starts at MS and
    wraps at 2^30 ms like the ESP32's; e.g. 2^30 - 20000 crosses the wrap
    20 s after boot, C6; without it they use ``time``). With
    ``mqtt_host`` set it connects to that broker like a real charger. Exits
    0 on the ``quit`` command, 3 on a reboot request (a ``reboot`` command or
    a switched OTA update), 1 after a crash (the board made safe each time).
    """
    from firmware.hal_sim import SimBoard, UdpControl

    directory = _arg(argv, "--dir", ".")
    try:
        port = int(_arg(argv, "--ctl-port", "7700"))
    except ValueError:
        raise SystemExit("error: --ctl-port must be a port number")
    clock = time
    offset = _arg(argv, "--tick-offset", None)
    if offset is not None:
        from firmware.hal_sim import TICKS_PERIOD, WrapClock
        try:
            start = int(offset)
        except ValueError:
            raise SystemExit("error: --tick-offset must be a number of ms")
        if not 0 <= start < TICKS_PERIOD:
            raise SystemExit("error: --tick-offset must be 0..2^30-1 ms")
        clock = WrapClock(start)
    board = SimBoard(clock)
    board.reset_reason = _arg(argv, "--reset-cause", "power_on")
    cfg, secrets = settings.load(directory)

    def log(text):
        print("[%s] %s" % (cfg["charger_id"], text))

    charger = app.Charger(board, clock, cfg, log)
    try:
        control = UdpControl(board, charger, port)
    except OSError as exc:
        raise SystemExit("error: cannot listen on udp 127.0.0.1:%d: %s" % (port, exc))
    log("simulated board on udp 127.0.0.1:%d, firmware %s" % (port, FW))

    def reboot():
        raise SystemExit(3)

    uplink = link_up(cfg, secrets, charger, directory, reboot)

    def poll():
        uplink.poll()
        return control.poll()

    def crashed(exc):
        if isinstance(exc, SystemExit):
            return exc.args[0] if exc.args else 0
        print("crash: %s: %s (board made safe)" % (type(exc).__name__, exc))
        return 1

    done = []
    _attach(charger, uplink, None)
    _start_control(charger, board, poll, crashed, done)
    if "--repl" in argv:
        return
    while not done:
        time.sleep_ms(50)
    if uplink.link is not None:
        uplink.link.stop()
    control.close()
    sys.exit(done[0] or 0)


def main():
    """Entry point for ``main.py``."""
    if sys.platform == "esp32":
        esp32()
    else:
        sim(sys.argv)
