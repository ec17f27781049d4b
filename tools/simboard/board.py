"""Simulated charger board carrying a simulated EV (never deployed to a charger:
the ``simboard`` package is frozen into the device runtime only).

It implements :class:`firmware.hal.Board` by computing what the pilot, the
current transformer and the sensors would read, from the pilot output the
firmware drives and from the EV (:class:`simboard.ev.SimEv`) plugged in.
It runs in the firmware's own process: in host tests under CPython or the
MicroPython unix port, and in the simulator as a unix-port process that a
harness controls over UDP (see :class:`simboard.control.UdpControl`).

The board holds state, not behaviour: tests set ``ev``, ``temp``, ``glitch_mv``
and read ``pilot_mode``, ``duty``, ``relay``, ``history``.
"""
import json
import time

from firmware.core.atomicfile import OsFs
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
    board and of :class:`firmware.core.charger.Charger`.
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
        self._drawn = None            # the EV's last drawn_a, and in mA
        self._drawn_ma = 0

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
            drawn = self.ev.drawn_a
            if drawn is not self._drawn:      # a new reading: convert it once
                self._drawn = drawn
                self._drawn_ma = int(drawn * 1000)

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

    def measured_ma(self):
        if (self.relay or self.welded) and self.ev is not None:
            if self.ev.drawn_a is not self._drawn:   # set from outside (a test's overdraw)
                self._drawn = self.ev.drawn_a
                self._drawn_ma = int(self._drawn * 1000)
            return self._drawn_ma
        return 0

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


class SlowFs(OsFs):
    """The real filesystem (:class:`firmware.core.atomicfile.OsFs`) with the
    flash latency of the ESP32's littlefs modelled: every file write waits
    ``write_ms`` before its rename commits it (an erase of a 4 KB block
    takes tens of ms). It waits on the calling thread, so that a write made
    inside the control tick would show in the tick's duration: the
    write-behind must keep it out (issue 13). ``writes`` counts the commits.
    """

    def __init__(self, write_ms, clock=time):
        self.write_ms = write_ms
        self.clock = clock
        self.writes = 0

    def rename(self, src, dst):
        self.clock.sleep_ms(self.write_ms)
        self.writes += 1
        OsFs.rename(self, src, dst)
