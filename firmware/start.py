"""Build the safety core and its edges for the platform, and run the control
loop under the fail-safe. Called by ``main.py`` on the ESP32; the simulated
charger (``tools/simboard``) calls :func:`build` and :func:`start_control`
with its own board. Not pure: it owns the wiring.

The control loop runs on a thread of its own, so that the serial REPL stays
free for a technician (:mod:`firmware.diag`): the diagnostics run *beside*
the live control loop and reach the core only through its command queue and
snapshot. Ctrl-C at the REPL therefore does not stop charging;
``diag.stop()`` does, by the normal stop path.
"""
import sys
import time

import _thread

from firmware import loop
from firmware.core.charger import Charger
from firmware.failsafe import run_failsafe
from firmware.version import FW

STACK = 16384
"""Stack of the control and link threads, bytes. The ESP32's default of 4 KB
is tight for the control loop, and the link thread runs the TLS handshake,
which MicroPython's own 16 KB main task is sized for. On the ESP32 a thread's
stack comes from the IDF heap, not from the MicroPython heap."""
REBOOT = 3
"""Exit status of the control loop for a reboot (:data:`firmware.core.commands.REBOOT`)."""

running = None
"""``(charger, bridge, wlan)`` of the running charger, for :mod:`firmware.diag`,
which is imported only when a technician asks for it at the REPL."""


def topics(cfg):
    """The charger's MQTT topics (bytes) from ``topic_prefix`` and ``charger_id``."""
    base = "%s/%s/" % (cfg["topic_prefix"], cfg["charger_id"])
    return {"set": (base + "set").encode(), "cmd": (base + "cmd").encode(),
            "state": (base + "state").encode(), "online": (base + "online").encode()}


def link_factory(cfg, secrets, network_ready=None):
    """Return ``(make_link, None)``, where ``make_link()`` builds a new,
    unstarted :class:`firmware.net.mqtt.MqttLink` from the settings, or
    ``(None, reason)`` when the charger must run without a server: no
    ``mqtt_host``, an unusable CA, or a CA provisioned (or ``mqtt_tls``
    unreadable) with TLS off, which would send the broker password in the
    clear."""
    if not cfg["mqtt_host"]:
        return None, "no mqtt_host set: running without a server"
    from firmware.net import mqtt

    tls_wrap = None
    if cfg["mqtt_tls"]:
        try:
            cas = mqtt.pem_certificates(secrets["ca_cert"])
        except ValueError as exc:
            # Never fall back to plain MQTT or to an unverified broker.
            return None, ("mqtt_tls is set but the CA certificate is unusable (%s): "
                          "running without a server" % exc)
        tls_wrap = mqtt.tls_wrapper(cas, cfg["mqtt_host"])
    elif secrets["ca_cert"] or "mqtt_tls" in cfg.rejected:
        return None, ("a CA is provisioned or mqtt_tls is unreadable, but TLS is off: not sending "
                      "the broker password in the clear; running without a server")

    def make():
        return mqtt.MqttLink(cfg["charger_id"], cfg["mqtt_host"], cfg["mqtt_port"], topics(cfg),
                             cfg["keepalive_s"], secrets["mqtt_user"] or None,
                             secrets["mqtt_password"] or None, network_ready=network_ready,
                             tls_wrap=tls_wrap)

    return make, None


def build(board, clock, cfg, secrets, root, log=None, network_ready=None):
    """Build the core (:class:`firmware.core.charger.Charger`) and its edges:
    the server bridge, OTA, and the link watch when a broker is configured;
    start the link thread. Returns ``(charger, bridge, edges)``, ``edges``
    being the :class:`firmware.loop.Edge` list for :func:`firmware.loop.run`."""
    from firmware.net.bridge import OtaEdge, ServerBridge
    from firmware.ota import update as ota

    charger = Charger(board, clock, cfg, log)
    updater = ota.Updater(root, FW)
    health = ota.Health(root, clock, cfg["ota_health_s"])
    make_link, why = link_factory(cfg, secrets, network_ready)
    link = make_link() if make_link is not None else None
    bridge = ServerBridge(charger, link, cfg["charger_id"], FW, updater)
    edges = [loop.Edge("server bridge", bridge.poll, clock, charger.log),
             loop.Edge("ota", OtaEdge(charger, updater, health, FW).poll, clock, charger.log)]
    if make_link is None or link is None:
        charger.log(why)
        return charger, bridge, edges
    from firmware.net.watch import LinkWatch

    watch = LinkWatch(bridge, make_link, clock, charger.log)
    edges.append(loop.Edge("link watch", watch.poll, clock, charger.log))
    try:
        link.start()
    except Exception as exc:  # noqa: BLE001 - the link watch starts it again
        charger.log("mqtt link thread did not start: %s" % exc)
    charger.log("mqtt link to %s:%d%s started" % (cfg["mqtt_host"], cfg["mqtt_port"],
                                                  " (TLS)" if cfg["mqtt_tls"] else ""))
    return charger, bridge, edges


def attach(charger, bridge, wlan):
    """Publish the running charger for :mod:`firmware.diag`."""
    global running
    running = (charger, bridge, wlan)
    diag = sys.modules.get("firmware.diag")
    if diag is not None:            # imported before the charger started
        diag.attach(charger, bridge, wlan)


def start_control(charger, board, edges, crashed, done):
    """Run the control loop under the fail-safe on its own thread; ``done``
    (a list) receives the exit status when it ends."""
    def body():
        done.append(run_failsafe(lambda: loop.run(charger, charger.clock, edges), board, crashed))

    if sys.platform == "esp32":
        _thread.stack_size(STACK)
    _thread.start_new_thread(body, ())


def esp32():
    """Run the charger on ESP32 hardware; returns to the REPL while the
    control loop runs on."""
    import machine
    import network
    from firmware.core import settings
    from firmware.hal_esp32 import Esp32Board

    board = Esp32Board()
    board.safe_state()
    cfg, secrets = settings.load("")
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if secrets["wifi_ssid"]:
        wlan.connect(secrets["wifi_ssid"], secrets["wifi_password"])  # returns at once
    _thread.stack_size(STACK)       # before any thread starts, or it gets 4 KB
    charger, bridge, edges = build(board, time, cfg, secrets, "/", print, wlan.isconnected)

    def crashed(exc):
        if isinstance(exc, SystemExit):
            code = exc.args[0] if exc.args else 0
            if code != REBOOT:       # diag.stop(): stay safe, no reset
                charger.writer.flush()     # the watchdog resets the board soon
                return code
            board.write_reset_reason("reboot")
        else:
            board.write_reset_reason("crash: %s: %s" % (type(exc).__name__, exc))
            sys.print_exception(exc)  # type: ignore[attr-defined]
            time.sleep_ms(1000)
        try:
            charger.writer.flush()   # the board is safe: nothing waits on flash now
        except Exception:  # noqa: BLE001 - the reset must happen whatever
            pass
        machine.reset()

    attach(charger, bridge, wlan)
    start_control(charger, board, edges, crashed, [])


def main():
    """Entry point for ``main.py``."""
    if sys.platform == "esp32":
        esp32()
    else:
        from simboard import run
        run.main(sys.argv)
