"""Between the safety core and the server: ``set`` and ``cmd`` messages in,
state reports out. An edge: the control loop polls it behind an exception
boundary (:class:`firmware.loop.Edge`), after each tick.

It reaches the core only through the core's command queue
(:mod:`firmware.core.commands`) and its snapshot
(:mod:`firmware.core.snapshot`), and the link only through its mailbox
(:meth:`firmware.net.mqtt.MqttLink.take`,
:meth:`~firmware.net.mqtt.MqttLink.offer_state`). It never blocks. Between
reports it allocates nothing: it compares the snapshot's fields with what it
last sent, and builds the JSON only when a report is due.

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

from firmware.core import commands as _cmd
from firmware.core import settings as _settings
from firmware.core import strictjson

MIN_GAP_MS = 250
"""Shortest time between two state messages, ms."""
MAX_GAP_MS = 5000
"""Longest time between two state messages, ms (DESIGN.md §4: at least every 5 s)."""
MOVED_A = 0.5
"""A change of the measured current this large (A) is reported."""

COMMANDS = ("reset_fault", "config", "reboot", "ota")
REMOTE_CONFIG = ("t_wd_s",)
"""Settings the server may change with ``cmd: config``. The unit rating and
the installer max are local only: no message from the network may raise them."""

_CHARGING = ("C", "D")


def _finite(x):
    # MicroPython writes NaN as ``nan``, which is no JSON: a broken sensor reports null.
    return x if type(x) in (int, float) and x == x and -1000 < x < 1000 else None


class ServerBridge:
    """Wires one charger's core to one MQTT link.

    ``core``: the :class:`firmware.core.charger.Charger` (only its
    ``commands``, ``snapshot``, ``clock`` and ``log`` are used); ``link``
    offers ``take()`` and ``offer_state(payload)``, plus ``connected``,
    ``last_error``, ``last_connect_ms`` and ``keepalive_s`` (None: no server
    configured); ``charger_id`` and ``fw`` go into every report; ``updater``
    (:class:`firmware.ota.update.Updater`, optional) takes ``cmd: ota`` and
    its status is reported. Public: ``seq`` (reports sent), ``commands_refused``.
    """

    def __init__(self, core, link, charger_id, fw, updater=None):
        self.core = core
        self.link = link
        self.charger_id = charger_id
        self.fw = fw
        self.updater = updater
        self.seq = 0
        self.commands_refused = 0
        self._waiting = []          # messages the core's queue refused: offered again next poll
        self._reboot_pending = False
        self._link_seen = (False, None)
        self._sent_at = None
        self._moved_hi = MOVED_A    # the measured-current band of the last report, A
        self._moved_lo = -MOVED_A
        self._last = [None] * 10    # the reported fields that trigger a report on change

    def poll(self):
        """Deliver waiting messages to the core, carry out a pending reboot
        once no car charges, and publish the state when due."""
        link = self.link
        if link is None:
            return False
        if self._waiting or self._reboot_pending:
            self._deliver_waiting()
        got = link.take()
        for item in got:
            self._deliver(item)
        self._log_link()
        self._report()
        return False

    def _deliver(self, item):
        kind, payload = item
        if kind == "set":
            if self._waiting or not self.core.commands.put(_cmd.SETPOINT, payload):
                if len(self._waiting) >= _cmd.SIZE:
                    # Keep the newest, as the link's inbox does: the latest
                    # setpoint replaces the older ones (C3).
                    self._waiting.pop(0)
                    self.core.log("oldest waiting setpoint dropped: the core's command queue stays full")
                self._waiting.append(item)
        else:
            self.command(payload)

    def _deliver_waiting(self):
        while self._waiting:
            if not self.core.commands.put(_cmd.SETPOINT, self._waiting[0][1]):
                break
            self._waiting.pop(0)
        if self._reboot_pending and self.core.snapshot.state not in _CHARGING:
            if self.core.commands.put(_cmd.REBOOT):
                self._reboot_pending = False

    def _log_link(self):
        # Plain attribute reads: the link thread only ever replaces them whole.
        link = self.link
        connected = link.connected
        error = link.last_error
        seen = self._link_seen
        if connected == seen[0] and error == seen[1]:
            return
        if connected and not seen[0]:
            self.core.log("mqtt connected (%s ms to connect and subscribe, keepalive %d s)"
                          % (link.last_connect_ms, link.keepalive_s))
        elif not connected and error is not None and (seen[0] or error != seen[1]):
            self.core.log("mqtt link down: %s" % error)
        self._link_seen = (connected, error)

    def command(self, payload):
        """Carry out a ``cmd`` message (bytes): validate it, then queue it for
        the core. Returns True when accepted; a bad or unknown command is
        logged, counted in ``commands_refused`` and changes nothing."""
        core = self.core
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
                self._put(_cmd.RESET_FAULT)
            elif cmd == "config":
                changes = msg.get("settings")
                if type(changes) is not dict or not changes:
                    raise ValueError("config needs a non-empty settings object")
                for name in changes:
                    if name not in REMOTE_CONFIG:
                        raise ValueError("%s cannot be changed remotely" % name)
                    _settings.SCHEMA[name][1](changes[name], name)   # the core checks again
                self._put(_cmd.SETTINGS, changes)
            elif cmd == "reboot":
                self._reboot_pending = True     # when no car is charging (C/D): see poll()
            elif cmd == "ota":
                if self.updater is None:
                    raise ValueError("no updater")
                self.updater.request(msg.get("url"), msg.get("version"))
                core.log("ota: %s requested, %s" % (msg.get("version"), self.updater.detail))
        except (ValueError, OSError) as exc:
            self.commands_refused += 1
            core.log("command refused: %s" % exc)
            return False
        core.log("command %s accepted" % cmd)
        return True

    def reboot_when_idle(self):
        """Reboot through the core's stop path once no car charges (C/D)."""
        self._reboot_pending = True

    def _put(self, kind, arg=None):
        if not self.core.commands.put(kind, arg):
            raise OSError("the core's command queue is full: try again")

    def _report(self):
        core = self.core
        clock = core.clock
        now = clock.ticks_ms()
        if self._sent_at is not None:
            gap = clock.ticks_diff(now, self._sent_at)
            if gap < 0:
                gap = MAX_GAP_MS    # the last report is over 2^29 ms old (C6): overdue
            elif gap < MIN_GAP_MS:
                return
        else:
            gap = MAX_GAP_MS
        s = core.snapshot
        last = self._last
        ota = self.updater.status if self.updater is not None else None
        m = s.measured_a
        if gap < MAX_GAP_MS and m < self._moved_hi and m > self._moved_lo \
                and last[0] == s.state and last[1] == s.pilot_a and last[2] == s.limit_by \
                and last[3] == s.ack_seq and last[4] == s.fault and last[5] == s.lockout \
                and last[6] == s.relay and last[7] == s.offline_a and last[8] == s.start_a \
                and last[9] == ota:
            return                     # nothing to say yet: no allocation
        self.seq += 1
        msg = {
            "v": 1, "id": self.charger_id, "seq": self.seq, "uptime_s": s.uptime_s,
            "state": s.state, "pilot_a": s.pilot_a, "measured_a": round(m, 1),
            "limit_by": s.limit_by, "ack_seq": s.ack_seq, "ack_epoch": s.epoch,
            "offline_a": s.offline_a, "start_a": s.start_a, "t_wd_s": s.t_wd_s,
            "session_wh": s.session_wh, "temp_c": _finite(s.temp_c), "fault": s.fault,
            "lockout": s.lockout, "relay": bool(s.relay or s.output_live),
            "reset_reason": s.reset_reason, "fw": self.fw, "ota": ota,
        }
        if self.link.offer_state(json.dumps(msg).encode()):
            last[0] = s.state
            last[1] = s.pilot_a
            last[2] = s.limit_by
            last[3] = s.ack_seq
            last[4] = s.fault
            last[5] = s.lockout
            last[6] = s.relay
            last[7] = s.offline_a
            last[8] = s.start_a
            last[9] = ota
            self._moved_hi = m + MOVED_A
            self._moved_lo = m - MOVED_A
            self._sent_at = now
        else:
            self.seq -= 1


class OtaEdge:
    """Runs the OTA update and the new version's health check for one
    charger: an edge of the control loop (:class:`firmware.loop.Edge`).

    ``core`` (its ``snapshot``, ``commands`` and ``log``), ``updater``
    (:class:`firmware.ota.update.Updater` or None), ``health``
    (:class:`firmware.ota.update.Health` or None), ``fw`` (this version). A
    version that proved itself is kept by the core (a KEEP_FIRMWARE
    command: the board's ``mark_app_valid``). A switched update and a
    version that never proved itself reboot through the core's stop path (a
    REBOOT command), only while no car charges.
    """

    def __init__(self, core, updater, health, fw):
        self.core = core
        self.updater = updater
        self.health = health
        self.fw = fw
        self._status = None
        self._reboot = False
        self._keep = False

    def poll(self):
        core = self.core
        s = core.snapshot
        state = s.state
        up = self.updater
        if up is not None:
            if up.poll(state):
                self._reboot = True
            if up.status != self._status:
                self._status = up.status
                core.log("ota %s: %s" % (up.status, up.detail))
        if self.health is not None:
            verdict = self.health.step(s.ack_seq is not None, s.fault is None)
            if verdict == "confirmed":
                core.log("ota: version %s confirmed" % self.fw)
                self._keep = True       # an image update, if any, is kept only now
            elif verdict == "reboot" and not self._reboot:
                core.log("ota: version %s never proved itself: reboot to roll back" % self.fw)
                self._reboot = True
        if self._keep and core.commands.put(_cmd.KEEP_FIRMWARE):
            self._keep = False
        if self._reboot and state not in _CHARGING and core.commands.put(_cmd.REBOOT):
            self._reboot = False
        return False
