"""The charger application: one control tick wires pilot reading, state machine,
limit arbiter and outputs together.

The hardware layer (``hal``) is a parameter; see :mod:`firmware.hal` for the
interface. Time comes from ``clock`` (``ticks_ms``, ``ticks_diff``,
``ticks_add``, ``sleep_ms``): the ``time`` module on the device and on the
unix port, a fake in host tests.

The control tick never waits on anything: it reads one pilot burst, decides,
writes outputs that changed, and feeds the hardware watchdog. Network code
(:mod:`firmware.uplink`) hands messages to :meth:`Charger.on_setpoint` between ticks.
"""
from firmware import evse as _evse
from firmware import store
from firmware.faults import FaultLog, read_lockout
from firmware.limit import LimitArbiter
from firmware.pilot import PilotReader
from firmware.safety import Safety

TICK_MS = 10
"""Control tick period, ms. With 3-sample debounce a pilot change is acted on
within 40 ms (C7 asks for 100 ms)."""

_EVENTS = 32


class Charger:
    """One EVSE. Public: ``evse`` (:class:`firmware.evse.Evse`), ``arbiter``
    (:class:`firmware.limit.LimitArbiter`), ``reader``
    (:class:`firmware.pilot.PilotReader`), ``limit_a``/``limit_by`` of the
    last tick, ``events`` (the last 32 ``(tick_ms, text)`` log entries),
    ``uptime_s`` (s, counted tick by tick so that it survives the tick wrap),
    ``safety`` (:class:`firmware.safety.Safety`), ``fault_log``
    (:class:`firmware.faults.FaultLog`, next to the settings file),
    ``reset_reason`` (why the board last reset, from the board)."""

    def __init__(self, hal, clock, settings, log=None):
        self.hal = hal
        self.clock = clock
        self.settings = settings
        self.log_sink = log
        now = clock.ticks_ms()
        self.arbiter = LimitArbiter(clock, settings, now)
        self.evse = _evse.Evse(clock)
        self.reader = PilotReader()
        prefix = settings.path[:-len("settings.json")]
        self.fault_log = FaultLog(prefix + "faults.json", settings.fs)
        self.safety = Safety(clock, self._record_fault)
        self.reset_reason = hal.reset_cause()
        # A lockout ends only with a power cycle or a remote reset (C9): any
        # other reset (watchdog, crash, reboot) finds it again on flash.
        self._lock_path = prefix + "lockout.json"
        self._lock_saved = False
        held = read_lockout(self._lock_path, settings.fs)
        if held and self.reset_reason != "power_on":
            self.evse.trip(held, now)
            self.safety.trip_restored(held)
            self._lock_saved = True
        self.limit_a = 0
        self.limit_by = "start"
        self.events = []
        self.uptime_s = 0
        self._uptime_ms = 0
        self._last_tick = now
        self._charge_mams = 0    # session charge, mA x ms below one mAh
        self._charge_ma = 0      # the current counted, mA: sampled once a second
        self._sample_ms = 1000   # ms since it was sampled (1000: sample at once)
        self._session_mah = 0
        self._new_faults = []
        self._requests = []      # from other threads (diagnostics): done by the control loop
        self.stopping = False
        self._manual_test = False
        self.results = {}        # request name -> outcome text
        self._pilot = None   # what the hardware was last told
        self._duty = -1
        self._offer_a = 0
        self._relay = None
        hal.safe_state()
        self._pilot = _evse.PILOT_HIGH
        self._relay = False
        self.safety.contactor(False, now)   # boot counts as an open: check for a weld
        for problem in settings.problems:
            self.log(problem)
        self.log("boot: reset reason %s" % self.reset_reason)
        if self.reset_reason == "watchdog" or self.reset_reason.startswith("crash"):
            self.fault_log.add(0, "reset", self.reset_reason)

    def log(self, text):
        """Record an event (kept in :attr:`events`, also passed to the log sink)."""
        now = self.clock.ticks_ms()
        if len(self.events) >= _EVENTS:
            self.events.pop(0)
        self.events.append((now, text))
        if self.log_sink:
            self.log_sink(text)

    def on_setpoint(self, payload):
        """Hand over a ``set`` message (bytes). Returns True when applied,
        False when refused (the reason is logged; nothing changed, C3)."""
        now = self.clock.ticks_ms()
        try:
            self.arbiter.offer(payload, now)
        except ValueError as exc:
            self.log("setpoint refused: %s" % exc)
            return False
        except OSError as exc:
            self.log("setpoint applied, settings not saved: %s" % exc)
        return True

    def reset_fault(self):
        """Clear a latched fault or a lockout (after its 300 ms in state F), as
        the remote ``reset_fault`` command does. Returns True when no fault
        remains. Without a fault it touches nothing: a running session must
        not be restarted by a stray reset."""
        if self.evse.fault is None:
            return True
        if self.safety.reset(self.evse, self.clock.ticks_ms(), self.hal):
            self.reader = PilotReader()
            self.log("fault reset")
            return True
        return False

    def _save_lockout(self):
        try:
            code = (self.evse.fault or "") if self.safety.lockout else ""
            store.write_atomic(self._lock_path, code, self.settings.fs)
            self._lock_saved = self.safety.lockout
        except OSError as exc:
            self.log("lockout not saved: %s" % exc)

    def _record_fault(self, code, detail):
        self._new_faults.append((code, detail))

    def request(self, name):
        """Ask the control loop, from another thread, to ``reset_fault``, run
        a ``selftest`` (GFCI test and relay check, only with the contactor
        open and no car charging) or ``stop`` (end the loop, board safe).
        The outcome appears in ``results[name]``."""
        self.results.pop(name, None)
        self._requests.append(name)

    def _serve_requests(self, now):
        while self._requests:
            name = self._requests.pop(0)
            if name == "reset_fault":
                self.results[name] = "cleared" if self.reset_fault() else "not cleared (held < 300 ms)"
            elif name == "selftest":
                if self._relay or self.evse.state in ("C", "D") or self.evse.fault:
                    self.results[name] = "refused: only with the contactor open, no car charging, no fault"
                else:
                    self._manual_test = True
            elif name == "stop":
                self.stopping = True       # pause first: the contactor opens with the EV in B, or 6 s
        if self._manual_test:
            s = self.safety
            if s.may_close(now, self.hal, self.evse, True):
                s.may_close(now, self.hal, self.evse, False)
                weld = self.hal.relay_sense()
                self.results["selftest"] = "gfci passed; contactor output %s" % (
                    "LIVE with the contactor open: welded" if weld else "dead with the contactor open: ok")
                self._manual_test = False
            elif self.evse.fault:
                self.results["selftest"] = "gfci failed: %s" % self.evse.fault
                self._manual_test = False

    def tick(self):
        """Run one control tick. Never blocks."""
        now = self.clock.ticks_ms()
        self._count_time(now)
        if self._requests or self._manual_test:
            self._serve_requests(now)
        evse = self.evse
        hal = self.hal
        pwm_on = self._pilot == _evse.PILOT_PWM
        hal.read_pilot()
        high = hal.high_mv
        low = hal.low_mv
        state = self.reader.update(high, low, pwm_on)
        was_fault = evse.fault
        evse.edge(state, now)
        if evse.session_started:
            self.arbiter.start_session()
            self._session_mah = 0
            self._charge_mams = 0
            self.log("session start: EV in %s" % state)
        elif evse.session_ended:
            self.log("session end: EV in %s" % state)
            self.safety.session_ended()
        if self.safety.step(now, evse, hal, self._relay, self.pilot_a(), hal.measured_a(),
                            self.reader.diode_ok, pwm_on):
            self.reader = PilotReader()     # retry: read the EV afresh, new session
        if evse.fault != was_fault:
            self.log("fault %s%s" % (evse.fault, " (lockout)" if self.safety.lockout else "")
                     if evse.fault else "fault cleared")
        arbiter = self.arbiter
        arbiter.fault = evse.fault
        arbiter.thermal_level = self.safety.derate.level
        amps = arbiter.amps(now)          # no tuple: the tick allocates nothing it can avoid
        why = arbiter.why
        if self.stopping and amps:
            amps, why = 0, "pause"
        if amps != self.limit_a or why != self.limit_by:
            self.log("limit %s A (%s)" % (amps, why))
        self.limit_a = amps
        self.limit_by = why
        if self._manual_test:
            may_close = False        # the self-test winding belongs to the manual test now
        else:
            may_close = self.safety.may_close(now, hal, evse, evse.wants_close(amps, self.reader.diode_ok))
        evse.outputs(amps, self.reader.diode_ok, now, may_close)
        self._apply(now)
        hal.feed_wdt()
        if self.stopping and not self._relay:
            raise SystemExit(0)            # the loop ends; the board is made safe
        if self.safety.lockout != self._lock_saved:
            self._save_lockout()
        while self._new_faults:   # after the outputs: the contactor is already open
            code, detail = self._new_faults.pop(0)
            self.fault_log.add(self.uptime_s, code, detail)

    def _count_time(self, now):
        # Uptime and session energy, integer arithmetic only: ESP32 floats are
        # 32-bit and integers above 2^30 allocate (DESIGN.md §6).
        dt = self.clock.ticks_diff(now, self._last_tick)
        self._last_tick = now
        if dt <= 0:
            return
        self._uptime_ms += dt
        if self._uptime_ms >= 1000:
            self.uptime_s += self._uptime_ms // 1000
            self._uptime_ms %= 1000
        if self._relay:
            # The current is sampled once a second and held in between: a
            # float product every tick would be an allocation every tick.
            self._sample_ms += dt
            if self._sample_ms >= 1000:
                self._charge_ma = int(self.hal.measured_a() * 1000)
                self._sample_ms = 0
            self._charge_mams += self._charge_ma * dt
            if self._charge_mams >= 3600000:
                self._session_mah += self._charge_mams // 3600000
                self._charge_mams %= 3600000

    def session_wh(self):
        """Energy delivered in the current (or last) session, Wh (int), from
        the measured current at the nominal supply voltage ``supply_v``."""
        return self._session_mah * self.settings["supply_v"] // 1000

    def _apply(self, now):
        # Open the contactor before touching the pilot, close it after.
        evse = self.evse
        hal = self.hal
        if self._relay and not evse.relay:
            hal.set_relay(False)
            self._relay = False
            self.safety.contactor(False, now)
            self.log("contactor open")
        if evse.pilot != self._pilot or (evse.pilot == _evse.PILOT_PWM and evse.duty != self._duty):
            if self._pilot == _evse.PILOT_LOW and evse.fault is not None:
                self.reader = PilotReader()   # state F held: read the EV again
            if evse.pilot == _evse.PILOT_PWM:
                hal.pilot_pwm(evse.duty)
            elif evse.pilot == _evse.PILOT_LOW:
                hal.pilot_low()
            else:
                hal.pilot_high()
            self._pilot = evse.pilot
            self._duty = evse.duty
            self._offer_a = evse.offer_a
        if evse.relay and not self._relay:
            hal.set_relay(True)
            self._relay = True
            self._sample_ms = 1000        # count from a fresh sample of the current
            self.safety.contactor(True, now)
            self.log("contactor closed")

    def pilot_a(self):
        """Current the pilot offers now, A (0 when no PWM runs)."""
        return self._offer_a if self._pilot == _evse.PILOT_PWM else 0

    def status(self):
        """Snapshot for reports and diagnostics: a dict with ``state``,
        ``pilot_a``, ``duty_u16``, ``relay``, ``measured_a``, ``limit_a``,
        ``limit_by``, ``ack_seq``, ``epoch``, ``lease_age_ms``, ``online``,
        ``offline_a``, ``start_a``, ``t_wd_s``, ``fault``, ``lockout``, ``output_live``,
        ``temp_c``, ``reset_reason``, ``high_mv``, ``low_mv``, ``diode_ok``."""
        now = self.clock.ticks_ms()
        s = self.settings
        a = self.arbiter
        return {
            "state": "F" if self.evse.fault else (self.evse.state or "A"),
            "pilot_a": self.pilot_a(),
            "duty_u16": self._duty if self._pilot == _evse.PILOT_PWM else 0,
            "relay": bool(self._relay),
            "output_live": bool(self.hal.relay_sense()),
            "measured_a": self.hal.measured_a(),
            "limit_a": self.limit_a,
            "limit_by": self.limit_by,
            "ack_seq": a.ack_seq,
            "epoch": a.epoch,
            "lease_age_ms": a.lease_age_ms(now),
            "online": a.online(now),
            "offline_a": s["offline_a"],
            "start_a": s["start_a"],
            "t_wd_s": s["t_wd_s"],
            "fault": self.evse.fault,
            "lockout": self.safety.lockout,
            "temp_c": self.hal.temp_c(),
            "reset_reason": self.reset_reason,
            "high_mv": self.reader.high_mv,
            "low_mv": self.reader.low_mv,
            "diode_ok": self.reader.diode_ok,
        }


def run(charger, clock, poll=None, tick_ms=TICK_MS, ticks=None):
    """Run the control loop: :meth:`Charger.tick` every ``tick_ms`` ms, then
    ``poll()`` (non-blocking I/O hooks; a true result stops the loop). Runs
    ``ticks`` ticks, or until ``poll`` asks to stop when None. Scheduling uses ``ticks_add``/``ticks_diff`` (C6); an overrun
    restarts the schedule rather than bursting ticks."""
    due = clock.ticks_ms()
    n = 0
    while ticks is None or n < ticks:
        charger.tick()
        if poll and poll():
            return
        n += 1
        due = clock.ticks_add(due, tick_ms)
        wait = clock.ticks_diff(due, clock.ticks_ms())
        if wait > 0:
            clock.sleep_ms(wait)
        else:
            due = clock.ticks_ms()
