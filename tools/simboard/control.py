"""The simulated charger's control channel: a harness outside the firmware
process drives the simulated board and EV, and reads telemetry, over UDP.

An edge of the control loop (:class:`firmware.loop.Edge`): it reaches the
safety core only through the core's command queue and snapshot, like every
other edge.
"""
import json
import time

from firmware.core import commands as _cmd


class UdpControl:
    """Lets a harness outside the firmware process drive and read a
    :class:`SimBoard` over UDP on loopback, one JSON object per datagram.

    Commands (to ``127.0.0.1:<port>``):

    * ``{"cmd": "watch"}``: send telemetry to this sender from now on.
    * ``{"cmd": "plug", "ev": {"max_a": 40, "battery_wh": 75000, "soc": 0.2,
      "delay_ms": 2000, "taper_soc": 0.8, "diode": true, "name": "car1"}}``
    * ``{"cmd": "unplug"}``, ``{"cmd": "soc", "soc": 0.9}``,
      ``{"cmd": "wants", "wants": false}`` (EV holds in B),
      ``{"cmd": "glitch", "mv": 3000}`` (one noisy pilot sample),
      ``{"cmd": "temp", "c": 40}``, ``{"cmd": "setpoint", "payload": "..."}``
      (hand a ``set`` message to the firmware, as the MQTT link would),
      ``{"cmd": "quit"}``.
    * Fault injection: ``{"cmd": "gfci", "on": true}`` (residual current),
      ``{"cmd": "selftest", "works": false}`` (the CCID ignores its test),
      ``{"cmd": "weld", "on": true}`` (contacts welded),
      ``{"cmd": "ground", "ok": false}`` (no protective earth),
      ``{"cmd": "overdraw", "a": 45}`` (the EV draws 45 A whatever it is
      offered; ``null`` ends it), ``{"cmd": "reset_fault"}`` (as the remote
      command), ``{"cmd": "hang"}`` (the control loop hangs for good: the
      board's watchdog, played by the harness, must reset it).
    * ``{"cmd": "mem", "collect": true}``: answers ``{"mem_alloc": ...,
      "mem_free": ...}`` (bytes, after ``gc.collect()`` unless ``collect`` is
      false), for benchmarks.
    * ``{"cmd": "code"}``: answers ``{"code": ...}``, where the running
      firmware came from (:func:`code_origin`).

    ``setpoint`` and ``reset_fault`` go to the core's command queue, like
    the MQTT link's: ``ok`` says whether the queue took them (the core carries
    them out at its next tick). Every command is answered: ``{"ok": true}``
    or ``{"error": "..."}``; a bad command changes nothing. Telemetry
    (``{"t_ms": ..., "state": ..., ...}``, the fields of the core's snapshot
    (:class:`firmware.core.snapshot.Snapshot`) plus ``t_ms``, ``ev``,
    ``soc`` and ``energy_wh``) is sent on every change of state, pilot, relay or limit,
    and of the measured current (0.1 A), and at least every ``period_ms``.
    """

    def __init__(self, board, charger, port, period_ms=500):
        import socket
        self.board = board
        self.charger = charger
        self.period_ms = period_ms
        self.quit = False
        self._watchers = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        self._sock.setblocking(False)
        self._last_key = None
        self._last_sent = None
        self._t0 = board.clock.ticks_ms()

    def close(self):
        self._sock.close()

    def poll(self):
        """Handle waiting commands and send due telemetry. Never blocks.
        Returns True once a ``quit`` command arrived."""
        for _ in range(8):
            try:
                data, addr = self._sock.recvfrom(2048)
            except OSError:
                break
            reply = self._handle(data, addr)
            if reply is not None:
                self._send(reply, addr)
        if self._watchers:
            self._telemetry()
        return self.quit

    def _send(self, obj, addr):
        try:
            self._sock.sendto(json.dumps(obj).encode(), addr)
        except OSError:
            pass

    def _handle(self, data, addr):
        from simboard.ev import SimEv, check_number
        try:
            msg = json.loads(data)
            if type(msg) is not dict:
                raise ValueError("a command is a JSON object")
            cmd = msg["cmd"]
            b = self.board
            if cmd == "watch":
                if addr not in self._watchers:
                    self._watchers.append(addr)
                self._last_key = None
            elif cmd == "plug":
                ev = msg.get("ev", {})
                if type(ev) is not dict:
                    raise ValueError("ev must be an object")
                b.plug(SimEv(**ev))
            elif cmd == "unplug":
                b.unplug()
            elif cmd == "soc":
                check_number("soc", msg["soc"], 0, 1)
                b.ev.soc = msg["soc"]
            elif cmd == "wants":
                if type(msg["wants"]) is not bool:
                    raise ValueError("wants must be true or false")
                b.ev.wants = msg["wants"]
            elif cmd == "glitch":
                check_number("mv", msg["mv"], -20000, 20000)
                b.glitch_mv = int(msg["mv"])
            elif cmd == "temp":
                check_number("c", msg["c"], -40, 150)
                b.temp = float(msg["c"])
            elif cmd in ("gfci", "weld"):
                if type(msg["on"]) is not bool:
                    raise ValueError("on must be true or false")
                setattr(b, "gfci" if cmd == "gfci" else "welded", msg["on"])
            elif cmd == "selftest":
                if type(msg["works"]) is not bool:
                    raise ValueError("works must be true or false")
                b.selftest_works = msg["works"]
            elif cmd == "ground":
                if type(msg["ok"]) is not bool:
                    raise ValueError("ok must be true or false")
                b.ground = msg["ok"]
            elif cmd == "overdraw":
                if msg["a"] is not None:
                    check_number("a", msg["a"], 0, 100)
                b.ev.overdraw_a = msg["a"]
            elif cmd == "reset_fault":
                return {"ok": self.charger.commands.put(_cmd.RESET_FAULT)}
            elif cmd == "mem":
                import gc
                if msg.get("collect", True):
                    gc.collect()
                return {"mem_alloc": gc.mem_alloc(), "mem_free": gc.mem_free()}
            elif cmd == "code":
                return {"code": code_origin()}
            elif cmd == "hang":
                self._send({"ok": True}, addr)
                while True:    # the control loop hangs here: only the watchdog ends it
                    time.sleep_ms(100)
            elif cmd == "setpoint":
                p = msg["payload"]
                return {"ok": self.charger.commands.put(_cmd.SETPOINT, p.encode() if type(p) is str else p)}
            elif cmd == "quit":
                self.quit = True
            else:
                return {"error": "unknown cmd %r" % (cmd,)}
        except Exception as exc:  # a harness typo must not stop the charger
            return {"error": "%s: %s" % (type(exc).__name__, exc)}
        return {"ok": True}

    def _telemetry(self):
        c = self.charger
        now = self.board.clock.ticks_ms()
        st = c.snapshot.as_dict()
        key = (st["state"], st["duty_u16"], st["relay"], st["limit_a"], st["limit_by"], st["fault"],
               int(st["measured_a"] * 10))
        due = self._last_sent is None or self.board.clock.ticks_diff(now, self._last_sent) >= self.period_ms
        if key == self._last_key and not due:
            return
        self._last_key = key
        self._last_sent = now
        ev = self.board.ev
        st["t_ms"] = self.board.clock.ticks_diff(now, self._t0)
        st["tick_ms"] = now
        st["pilot_at"] = self.board.pilot_at
        st["relay_at"] = self.board.relay_at
        st["soc"] = ev.soc if ev else None
        st["energy_wh"] = ev.energy_wh if ev else 0.0
        st["ev"] = ev.name if ev else None
        for addr in self._watchers:
            self._send(st, addr)


def code_origin():
    """Where the running firmware was imported from: ``"frozen"`` (the
    image's modules) or the path of ``firmware/core/charger`` on the filesystem (an
    OTA slot, or a ``firmware/`` folder on the root that shadows the image)."""
    import os
    from firmware.core import charger
    path = charger.__file__
    try:
        os.stat(path)
    except OSError:
        return "frozen"
    return path
