"""Simulated charger board carrying a simulated EV (never deployed to a charger).

It implements :class:`firmware.hal.Board` by computing what the pilot, the
current transformer and the sensors would read, from the pilot output the
firmware drives and from the EV (:class:`firmware.ev_model.SimEv`) plugged in.
It runs in the firmware's own process: in host tests under CPython or the
MicroPython unix port, and in the simulator as a unix-port process that a
harness controls over UDP (see :class:`UdpControl`).

The board holds state, not behaviour: tests set ``ev``, ``temp``, ``glitch_mv``
and read ``pilot_mode``, ``duty``, ``relay``, ``history``.
"""
import json
import time

from firmware.hal import Board

# Pilot high level per EV state, mV (J1772 nominal: A 12, B 9, C 6, D 3 V).
_LEVEL_MV = {"A": 12000, "B": 9000, "C": 6000, "D": 3000}
_NO_DIODE_LOW_MV = -9000   # EV resistor loads the negative half without a diode


TICKS_PERIOD = 1 << 30
"""The ESP32's ``time.ticks_ms`` period, ms (2^30 ms, about 12.4 days; C6)."""


class WrapClock:
    """A clock with the ESP32's tick arithmetic for the simulated charger on
    the unix port, whose own ``time.ticks_ms`` only wraps after 2^62 ms.

    ``ticks_ms()`` starts at ``start_ms`` (0..2^30-1) and counts real
    milliseconds modulo 2^30; ``ticks_diff``/``ticks_add`` use the same
    period, as MicroPython's do on the ESP32 (a difference is valid within
    +/- 2^29 ms). ``start_ms`` just below 2^30 runs the charger across the
    wrap a few seconds after boot (the fault-injection suite's wrap
    scenario). ``sleep_ms`` is the real one. Pass it as the ``clock`` of the
    board and of :class:`firmware.app.Charger`.
    """

    def __init__(self, start_ms):
        self._start = start_ms % TICKS_PERIOD
        self._base = time.ticks_ms()

    def ticks_ms(self):
        return (self._start + time.ticks_diff(time.ticks_ms(), self._base)) % TICKS_PERIOD

    def ticks_diff(self, a, b):
        d = (a - b) % TICKS_PERIOD
        if d >= TICKS_PERIOD // 2:
            d -= TICKS_PERIOD
        return d

    def ticks_add(self, t, delta):
        return (t + delta) % TICKS_PERIOD

    def sleep_ms(self, ms):
        time.sleep_ms(ms)


class SimBoard(Board):
    """The simulated board. ``clock`` provides ``ticks_ms``/``ticks_diff``.

    Observable state: ``pilot_mode`` (``high``/``pwm``/``low``), ``duty``
    (``duty_u16``, 0 without PWM), ``relay`` (bool), ``history`` (list of
    ``(tick_ms, mode, duty)`` for every pilot write, oldest first, last 64),
    ``wdt_feeds`` (count). Injected state: ``ev`` (:class:`SimEv` or None),
    ``temp`` (degrees C), ``glitch_mv`` (next pilot sample's high level, once),
    ``gfci`` (True while a residual current flows), ``selftest_works`` (False:
    the CCID ignores its test winding), ``welded`` (the output stays live
    after an open), ``ground`` (False: no protective earth), ``reset_reason``
    (what :meth:`reset_cause` reports at the next boot).
    """

    def __init__(self, clock):
        self.clock = clock
        self.high_mv = self.low_mv = 12000   # the last read_pilot() (pilot mV)
        self.pilot_mode = "high"
        self.duty = 0
        self.relay = False
        self.history = []
        self.wdt_feeds = 0
        self.ev = None
        self.temp = 25.0
        self.glitch_mv = None
        self.gfci = False
        self.gfci_test_on = False
        self.selftest_works = True    # False: the CCID ignores its test current
        self.welded = False           # True: the output stays live after an open
        self.ground = True            # False: protective earth missing
        self.reset_reason = "power_on"
        self.wdt_timeout_ms = 5000    # as the ESP32 board's machine.WDT
        self._fed_at = None
        self.pilot_at = 0             # tick of the last pilot write (benchmarks)
        self.relay_at = 0             # tick of the last contactor change
        self._last_step = clock.ticks_ms()

    # -- simulation ------------------------------------------------------------

    def plug(self, ev):
        """Connect ``ev`` (a :class:`SimEv`)."""
        ev.plugged = True
        self.ev = ev

    def unplug(self):
        """Disconnect the EV (state A)."""
        if self.ev is not None:
            self.ev.plugged = False
        self.ev = None

    def step(self):
        """Advance the EV to the clock's present tick."""
        now = self.clock.ticks_ms()
        dt = self.clock.ticks_diff(now, self._last_step)
        self._last_step = now
        if self.ev is not None and dt > 0:
            self.ev.step(dt, self.duty if self.pilot_mode == "pwm" else 0, self.relay or self.welded)

    def _record(self, mode, duty):
        self.pilot_mode = mode
        self.duty = duty
        self.pilot_at = self.clock.ticks_ms()
        if len(self.history) >= 64:
            self.history.pop(0)
        self.history.append((self.clock.ticks_ms(), mode, duty))

    # -- Board interface ---------------------------------------------------------

    def pilot_high(self):
        self._record("high", 0)

    def pilot_pwm(self, duty_u16):
        self._record("pwm", duty_u16)

    def pilot_low(self):
        self._record("low", 0)

    def read_pilot(self):
        self.step()
        if self.pilot_mode == "low":
            high = low = -12000
        else:
            ev = self.ev
            high = _LEVEL_MV[ev.pilot_state() if ev is not None else "A"]
            if self.pilot_mode == "pwm":
                low = -12000 if ev is None or ev.diode else _NO_DIODE_LOW_MV
            else:
                low = high
        if self.glitch_mv is not None:
            high = self.glitch_mv
            self.glitch_mv = None
        self.high_mv = high
        self.low_mv = low

    def set_relay(self, closed):
        if bool(closed) != self.relay:
            self.relay_at = self.clock.ticks_ms()
        self.relay = bool(closed)

    def measured_a(self):
        if (self.relay or self.welded) and self.ev is not None:
            return self.ev.drawn_a
        return 0.0

    def temp_c(self):
        return self.temp

    def gfci_tripped(self):
        return self.gfci or (self.gfci_test_on and self.selftest_works)

    def relay_sense(self):
        return self.relay or self.welded

    def ground_ok(self):
        return self.ground

    def reset_cause(self):
        return self.reset_reason

    def mark_app_valid(self):
        """As the ESP32 board's: keep the running image (counted here)."""
        self.marked_valid = getattr(self, "marked_valid", 0) + 1
        return True

    def gfci_test(self, on):
        self.gfci_test_on = bool(on)

    def feed_wdt(self):
        self.wdt_feeds += 1
        self._fed_at = self.clock.ticks_ms()

    # -- the hardware watchdog and resets ----------------------------------------

    def wdt_expired(self):
        """True when the watchdog, started by the first feed, has not been fed
        for ``wdt_timeout_ms``: the real board would reset now."""
        if self._fed_at is None:
            return False
        return self.clock.ticks_diff(self.clock.ticks_ms(), self._fed_at) >= self.wdt_timeout_ms

    def hardware_reset(self, reason):
        """What a reset does to the board: outputs back to their power-up state
        (contactor open, pilot static +12 V, test winding off), the watchdog
        stopped, and ``reason`` kept for :meth:`reset_cause` (RTC memory)."""
        self.relay = False
        self.gfci_test_on = False
        self._record("high", 0)
        self._fed_at = None
        self.reset_reason = reason


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

    Every command is answered: ``{"ok": true}`` (``{"ok": false}`` for a
    refused setpoint) or ``{"error": "..."}``; a bad command changes nothing. Telemetry (``{"t_ms": ..., "state": ..., ...}``, the
    fields of :meth:`firmware.app.Charger.status` plus ``t_ms``, ``ev``,
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
        from firmware.ev_model import SimEv, check_number
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
                return {"ok": self.charger.reset_fault()}
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
                return {"ok": self.charger.on_setpoint(p.encode() if type(p) is str else p)}
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
        st = c.status()
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
    image's modules) or the path of ``firmware/app`` on the filesystem (an
    OTA slot, or a ``firmware/`` folder on the root that shadows the image)."""
    import os
    from firmware import app
    path = app.__file__
    try:
        os.stat(path)
    except OSError:
        return "frozen"
    return path
