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
from firmware.version import FW


def topics(cfg):
    """The charger's MQTT topics (bytes) from ``topic_prefix`` and ``charger_id``."""
    base = "%s/%s/" % (cfg["topic_prefix"], cfg["charger_id"])
    return {"set": (base + "set").encode(), "cmd": (base + "cmd").encode(),
            "state": (base + "state").encode(), "online": (base + "online").encode()}


def link_up(cfg, secrets, charger, reboot=None, network_ready=None):
    """Start the MQTT link thread and return the :class:`firmware.uplink.Uplink`
    that the control loop polls, or None when no broker is configured."""
    if not cfg["mqtt_host"]:
        charger.log("no mqtt_host set: running without a server")
        return None
    if cfg["mqtt_tls"]:
        charger.log("mqtt_tls is not supported yet: running without a server")
        return None
    from firmware.mqtt_link import MqttLink
    from firmware.uplink import Uplink

    link = MqttLink(cfg["charger_id"], cfg["mqtt_host"], cfg["mqtt_port"], topics(cfg),
                    cfg["keepalive_s"], secrets["mqtt_user"] or None,
                    secrets["mqtt_password"] or None, network_ready=network_ready)
    link.start()
    charger.log("mqtt link to %s:%d started" % (cfg["mqtt_host"], cfg["mqtt_port"]))
    return Uplink(charger, link, FW, reboot)


def esp32():
    """Run the charger on ESP32 hardware. Does not return except on Ctrl-C."""
    import machine
    from firmware.hal_esp32 import Esp32Board

    import network

    board = Esp32Board()
    board.safe_state()
    cfg, secrets = settings.load("")
    charger = app.Charger(board, time, cfg, print)
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if secrets["wifi_ssid"]:
        wlan.connect(secrets["wifi_ssid"], secrets["wifi_password"])  # returns at once
    uplink = link_up(cfg, secrets, charger, machine.reset, wlan.isconnected)

    def crashed(exc):
        if isinstance(exc, KeyboardInterrupt):
            print("stopped: contactor open, pilot static +12 V")
            return
        board.write_reset_reason("crash: %s: %s" % (type(exc).__name__, exc))
        sys.print_exception(exc)  # type: ignore[attr-defined]
        time.sleep_ms(1000)
        machine.reset()

    supervise(lambda: app.run(charger, time, uplink.poll if uplink else None), board, crashed)


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
    7700), ``--reset-cause TEXT`` (what the board reports as its reset
    reason; the harness's watchdog passes ``watchdog``). With ``mqtt_host``
    set it connects to that broker like a real
    charger. Prints events to stdout; exits 0 on the ``quit`` command, 3 on a
    ``reboot`` command, 1 after a crash (the board made safe first each time).
    """
    from firmware.hal_sim import SimBoard, UdpControl

    directory = _arg(argv, "--dir", ".")
    try:
        port = int(_arg(argv, "--ctl-port", "7700"))
    except ValueError:
        raise SystemExit("error: --ctl-port must be a port number")
    board = SimBoard(time)
    board.reset_reason = _arg(argv, "--reset-cause", "power_on")
    cfg, secrets = settings.load(directory)

    def log(text):
        print("[%s] %s" % (cfg["charger_id"], text))

    charger = app.Charger(board, time, cfg, log)
    try:
        control = UdpControl(board, charger, port)
    except OSError as exc:
        raise SystemExit("error: cannot listen on udp 127.0.0.1:%d: %s" % (port, exc))
    log("simulated board on udp 127.0.0.1:%d, firmware %s" % (port, FW))

    def reboot():
        raise SystemExit(3)

    uplink = link_up(cfg, secrets, charger, reboot)

    def poll():
        if uplink is not None:
            uplink.poll()
        return control.poll()

    def crashed(exc):
        if isinstance(exc, SystemExit):
            return exc.args[0] if exc.args else 0
        print("crash: %s: %s (board made safe)" % (type(exc).__name__, exc))
        return 1

    code = supervise(lambda: app.run(charger, time, poll), board, crashed)
    if uplink is not None:
        uplink.link.stop()
    control.close()
    sys.exit(code or 0)


def main():
    """Entry point for ``main.py``."""
    if sys.platform == "esp32":
        esp32()
    else:
        sim(sys.argv)
