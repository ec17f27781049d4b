"""Between the control loop and the MQTT link: hands received ``set`` and
``cmd`` messages to the charger, and decides when to publish the state.

Runs on the control loop's side, once per tick, and never blocks: it only
touches the link's mailbox (:meth:`firmware.mqtt_link.MqttLink.take`,
:meth:`~firmware.mqtt_link.MqttLink.offer_state`).

State message (``<prefix>/<id>/state``, DESIGN.md §4), published on every
change of what the server budgets with (state, pilot, limit, acknowledged
setpoint, fault, contactor, offline/start current, a measured-current change
of 0.5 A or more), at most every 250 ms, and at least every 5 s::

    {"v": 1, "id": "garage-1", "seq": 118, "uptime_s": 3605, "state": "C", "pilot_a": 20,
     "measured_a": 19.8, "limit_by": "setpoint", "ack_seq": 42, "ack_epoch": 7,
     "offline_a": 8, "start_a": 8, "t_wd_s": 30, "session_wh": 5230,
     "temp_c": 41.5, "fault": null, "lockout": false, "relay": true,
     "reset_reason": "power_on", "fw": "0.4.0"}

``id``, ``ack_epoch``, ``relay``, ``lockout`` and ``reset_reason`` extend the
contract compatibly: ``id`` (the charger's own id) lets the server ignore a
report published on another charger's topic; ``relay`` (true while the contactor is driven closed
*or* its output is sensed live, so a welded contactor never reads open) lets
the server see the contactor open before it frees a faulted member's budget; ``lockout`` says the fault will not
retry by itself; ``reset_reason`` says why the charger last booted.
"""
import json

from firmware import strictjson

MIN_GAP_MS = 250
"""Shortest time between two state messages, ms."""
MAX_GAP_MS = 5000
"""Longest time between two state messages, ms (DESIGN.md §4: at least every 5 s)."""

COMMANDS = ("reset_fault", "config", "reboot", "ota")
REMOTE_CONFIG = ("t_wd_s",)
"""Settings the server may change with ``cmd: config``. The unit rating and
the installer max are local only: no message from the network may raise them."""


def _finite(x):
    # MicroPython writes NaN as ``nan``, which is no JSON: a broken sensor reports null.
    return x if type(x) in (int, float) and x == x and -1000 < x < 1000 else None


class Uplink:
    """Wires one :class:`firmware.app.Charger` to one link.

    ``link`` offers ``take()`` and ``offer_state(payload)`` (None: no server
    configured); ``fw`` is the firmware version string; ``reboot``
    (optional) is called, after the board has been made safe, for ``cmd:
    reboot``, for a switched OTA update, and when a new version failed to
    prove itself; ``updater`` (:class:`firmware.ota.Updater`) takes ``cmd:
    ota``; ``health`` (:class:`firmware.ota.Health`) keeps or drops a new
    version.
    """

    def __init__(self, charger, link, fw, reboot=None, updater=None, health=None):
        self.charger = charger
        self.link = link
        self.fw = fw
        self.reboot = reboot
        self.updater = updater
        self.health = health
        self._ota_status = None
        self._reboot_pending = False
        self.seq = 0
        self.commands_refused = 0
        self._last_key = None
        self._last_measured = 0.0
        self._last_sent = None
        self._link_seen = (False, None)

    def poll(self):
        """Deliver waiting messages, run the update and health checks, then
        publish the state when due."""
        c = self.charger
        if self.link is not None:
            for kind, payload in self.link.take():
                if kind == "set":
                    c.on_setpoint(payload)
                else:
                    self.command(payload)
        state = c.evse.state
        up = self.updater
        if up is not None:
            due = up.poll(state)
            if up.status != self._ota_status:
                self._ota_status = up.status
                c.log("ota %s: %s" % (up.status, up.detail))
            if due:
                self._reboot()
        if self._reboot_pending and state not in ("C", "D"):
            self._reboot_pending = False
            self._reboot()
        if self.health is not None:
            verdict = self.health.step(c.arbiter.ack_seq is not None, c.evse.fault is None)
            if verdict == "confirmed":
                c.log("ota: version %s confirmed" % self.fw)
                c.hal.mark_app_valid()   # an image update, if any, is kept only now
            elif verdict == "reboot" and state not in ("C", "D"):
                c.log("ota: version %s never proved itself: reboot to roll back" % self.fw)
                self._reboot()
        if self.link is not None:
            self._log_link()
            self._report()

    def _log_link(self):
        # Plain attribute reads: the link thread only ever replaces them whole.
        link = self.link
        now = (link.connected, link.last_error)
        if now == self._link_seen:
            return
        if now[0] and not self._link_seen[0]:
            self.charger.log("mqtt connected (%s ms to connect and subscribe, keepalive %d s)"
                             % (link.last_connect_ms, link.keepalive_s))
        elif not now[0] and now[1] is not None and (self._link_seen[0] or now[1] != self._link_seen[1]):
            self.charger.log("mqtt link down: %s" % now[1])
        self._link_seen = now

    def _reboot(self):
        self.charger.hal.safe_state()
        if self.reboot:
            self.reboot()

    def command(self, payload):
        """Carry out a ``cmd`` message (bytes). Returns True when done; a bad
        or unknown command is logged and changes nothing."""
        c = self.charger
        try:
            if len(payload) > 1024:
                raise ValueError("command longer than 1024 bytes")
            msg = strictjson.loads(payload)
            # type() first: true == 1 and 1.0 == 1 in Python, and neither is v 1.
            if type(msg) is not dict or type(msg.get("v")) is not int or msg["v"] != 1 \
                    or msg.get("cmd") not in COMMANDS:
                raise ValueError("unknown command %r" % (msg.get("cmd") if type(msg) is dict else msg,))
            cmd = msg["cmd"]
            if cmd == "reset_fault":
                if not c.reset_fault():
                    raise ValueError("fault held less than 300 ms: not cleared yet")
            elif cmd == "config":
                changes = msg.get("settings")
                if type(changes) is not dict or not changes:
                    raise ValueError("config needs a non-empty settings object")
                for name in changes:
                    if name not in REMOTE_CONFIG:
                        raise ValueError("%s cannot be changed remotely" % name)
                c.settings.update(changes)
            elif cmd == "reboot":
                self._reboot_pending = True     # when no car is charging (C/D)
            elif cmd == "ota":
                if self.updater is None:
                    raise ValueError("no updater")
                self.updater.request(msg.get("url"), msg.get("version"))
                c.log("ota: %s requested, %s" % (msg.get("version"), self.updater.detail))
        except (ValueError, OSError) as exc:
            self.commands_refused += 1
            c.log("command refused: %s" % exc)
            return False
        c.log("command %s done" % cmd)
        return True

    def _report(self):
        c = self.charger
        now = c.clock.ticks_ms()
        if self._last_sent is not None:
            gap = c.clock.ticks_diff(now, self._last_sent)
            if gap < MIN_GAP_MS:
                return
        else:
            gap = MAX_GAP_MS
        st = c.status()
        key = (st["state"], st["pilot_a"], st["limit_by"], st["ack_seq"], st["fault"],
               st["lockout"], st["relay"], st["offline_a"], st["start_a"],
               self.updater.status if self.updater else None)
        moved = abs(st["measured_a"] - self._last_measured) >= 0.5
        if key == self._last_key and not moved and gap < MAX_GAP_MS:
            return
        self.seq += 1
        msg = {
            "v": 1, "id": c.settings["charger_id"], "seq": self.seq, "uptime_s": c.uptime_s, "state": st["state"],
            "pilot_a": st["pilot_a"], "measured_a": round(st["measured_a"], 1),
            "limit_by": st["limit_by"], "ack_seq": st["ack_seq"], "ack_epoch": st["epoch"],
            "offline_a": st["offline_a"], "start_a": st["start_a"], "t_wd_s": st["t_wd_s"],
            "session_wh": c.session_wh(), "temp_c": _finite(st["temp_c"]), "fault": st["fault"],
            "lockout": st["lockout"], "relay": st["relay"] or st["output_live"],
            "reset_reason": st["reset_reason"],
            "fw": self.fw, "ota": self.updater.status if self.updater else None,
        }
        if self.link.offer_state(json.dumps(msg).encode()):
            self._last_key = key
            self._last_measured = st["measured_a"]
            self._last_sent = now
        else:
            self.seq -= 1
