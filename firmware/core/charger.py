"""The charger's safety core: one control tick wires pilot reading, state
machine, supervision, limit arbiter and outputs together.

The hardware layer (``hal``) is a parameter; see :mod:`firmware.hal` for the
interface. Time comes from ``clock`` (``ticks_ms``, ``ticks_diff``,
``ticks_add``, ``sleep_ms``): the ``time`` module on the device and on the
unix port, a fake in host tests.

The boundary (issue 13): the control thread owns this object. Its inputs are
pilot readings, time and the commands in :attr:`Charger.commands`
(:mod:`firmware.core.commands`); its outputs are the hardware outputs and
:attr:`Charger.snapshot` (:mod:`firmware.core.snapshot`). Nothing else
touches ``evse``, ``arbiter``, ``hal`` or ``settings``.

The control tick never waits on anything: it reads one pilot burst, decides,
writes outputs that changed, feeds the hardware watchdog and refreshes the
snapshot. It writes no flash (:attr:`Charger.writer` does that between ticks,
:mod:`firmware.core.persist`) and, in steady state, allocates nothing.
"""
from firmware.core import commands as _cmd
from firmware.core import evse as _evse
from firmware.core.commands import Commands
from firmware.core.faults import FaultLog, Faults, read_lockout
from firmware.core.limit import LimitArbiter
from firmware.core.persist import WriteBehind
from firmware.core.pilot import PilotReader
from firmware.core.safety import Safety
from firmware.core.snapshot import Snapshot

COMMISSIONING = ("unit_rating_a", "installer_max_a")
"""Settings no command may change (the unit's rating and the installer's
breaker-derived cap): only provisioning, with the charger parked, writes them."""

TICK_MS = 10
"""Control tick period, ms. With 3-sample debounce a pilot change is acted on
within 40 ms (C7 asks for 100 ms)."""

_EVENTS = 32
_TICKS_MASK = 0x3FFFFFFF   # the snapshot's tick count wraps before it needs a big int


class Charger:
    """One EVSE's safety core.

    Public: ``commands`` (:class:`firmware.core.commands.Commands`, the one way
    in), ``snapshot`` (:class:`firmware.core.snapshot.Snapshot`, the one way
    out), ``writer`` (:class:`firmware.core.persist.WriteBehind`, run by the
    control loop between ticks), ``events`` (the last 32 ``(tick_ms, text)``
    log entries), ``results`` (command name -> outcome text, for the
    diagnostics), ``fault_log`` (:class:`firmware.core.faults.FaultLog`),
    ``reset_reason``, ``limit_a``/``limit_by`` of the last tick, ``uptime_s``.
    Inside the core, and for its tests: ``evse``, ``arbiter``, ``reader``,
    ``safety``, ``faults`` (:class:`firmware.core.faults.Faults`, the one
    owner of fault state).
    """

    def __init__(self, hal, clock, settings, log=None):
        self.hal = hal
        self.clock = clock
        self.settings = settings
        self.log_sink = log
        now = clock.ticks_ms()
        prefix = settings.path[:-len("settings.json")]
        self.fault_log = FaultLog(prefix + "faults.json", settings.fs)
        self.faults = Faults(clock, self.fault_log)
        self.safety = Safety(clock, self.faults)
        self.arbiter = LimitArbiter(clock, settings, now, self.faults, self.safety.derate)
        self.evse = _evse.Evse(clock, self.faults)
        self.reader = PilotReader()
        self.commands = Commands()
        self.snapshot = Snapshot()
        self.reset_reason = hal.reset_cause()
        self.events = []
        # A lockout ends only with a power cycle or a remote reset (C9): any
        # other reset (watchdog, crash, reboot) finds it again on flash.
        lock_path = prefix + "lockout.json"
        held = read_lockout(lock_path, settings.fs)
        self.writer = WriteBehind(clock, settings, self.faults, lock_path, settings.fs, self.log,
                                  lockout_saved=held is not None)
        if held and self.reset_reason != "power_on":
            self.faults.restore(held, now)
            self.evse.trip(held, now)
        self.limit_a = 0
        self.limit_by = "start"
        self.uptime_s = 0
        self._uptime_ms = 0
        self._last_tick = now
        self._charge_mams = 0    # session charge, mA x ms below one mAh
        self._charge_ma = 0      # the current counted, mA: sampled once a second
        self._sample_ms = 1000   # ms since it was sampled (1000: sample at once)
        self._session_mah = 0
        self._measured = 0.0     # A, read once per tick
        self._cfg_seen = None    # the settings dict the snapshot's copy was made from
        self.stopping = None     # None, "stop" or "reboot"
        self.paused = False
        self._manual_test = False
        self.results = {}        # command name -> outcome text
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
        self.snapshot.events = self.events
        self.snapshot.fault_entries = self.fault_log.entries
        self.log("boot: reset reason %s" % self.reset_reason)
        if self.reset_reason == "watchdog" or self.reset_reason.startswith("crash"):
            self.fault_log.add(0, "reset", self.reset_reason)
        self._refresh(now)

    def log(self, text):
        """Record an event (kept in :attr:`events`, also passed to the log sink)."""
        now = self.clock.ticks_ms()
        if len(self.events) >= _EVENTS:
            self.events.pop(0)
        self.events.append((now, text))
        if self.log_sink:
            self.log_sink(text)

    # -- commands: called on the control thread only ---------------------------

    def on_setpoint(self, payload):
        """Apply a ``set`` message (bytes) now (the :data:`~firmware.core.commands.SETPOINT`
        command). Returns True when applied, False when refused (the reason is
        logged; nothing changed, C3)."""
        try:
            self.arbiter.offer(payload, self.clock.ticks_ms())
        except ValueError as exc:
            self.log("setpoint refused: %s" % exc)
            return False
        return True

    def reset_fault(self):
        """Clear a latched fault or a lockout (after its 300 ms in state F), as
        the remote ``reset_fault`` command does. Returns True when no fault
        remains. Without a fault it touches nothing: a running session must
        not be restarted by a stray reset."""
        if self.faults.code is None:
            return True
        if self.safety.reset(self.evse, self.clock.ticks_ms(), self.hal):
            self.reader = PilotReader()
            self.log("fault reset")
            return True
        return False

    def request(self, name, arg=None):
        """Queue the command called ``name`` (see
        :data:`firmware.core.commands.NAMES`) from any thread. Returns True
        when queued, False when the queue refused it (full or busy). The
        outcome appears in :attr:`results` under ``name`` once the control
        loop carried it out."""
        for kind in _cmd.NAMES:
            if _cmd.NAMES[kind] == name:
                self.results.pop(name, None)
                return self.commands.put(kind, arg)
        raise ValueError("unknown command %r" % (name,))

    def _serve_commands(self, now):
        for _ in range(_cmd.PER_TICK):
            item = self.commands.take()
            if item is None:
                return
            kind, arg = item
            try:
                self._command(kind, arg)
            except Exception as exc:  # noqa: BLE001 - a bad command never stops the tick
                name = _cmd.NAMES.get(kind, kind)
                self.results[name] = "failed: %s: %s" % (type(exc).__name__, exc)
                self.log("command %s failed: %s: %s" % (name, type(exc).__name__, exc))

    def _command(self, kind, arg):
        name = _cmd.NAMES[kind]
        if kind == _cmd.SETPOINT:
            self.results[name] = "applied" if self.on_setpoint(arg) else "refused: %s" % self.arbiter.last_error
        elif kind == _cmd.RESET_FAULT:
            self.results[name] = "cleared" if self.reset_fault() else "not cleared (held < 300 ms)"
        elif kind == _cmd.SELFTEST:
            if self._relay or self.evse.state in ("C", "D") or self.faults.code:
                self.results[name] = "refused: only with the contactor open, no car charging, no fault"
            else:
                self._manual_test = True
        elif kind == _cmd.STOP or kind == _cmd.REBOOT:
            # Pause first: the contactor opens with the EV in B, or after 6 s.
            if self.stopping != "reboot":
                self.stopping = name
            self.log("%s requested: stopping the offer first" % name)
        elif kind == _cmd.SETTINGS:
            try:
                for key in arg:
                    if key in COMMISSIONING:
                        raise ValueError("%s is a commissioning value: only provisioning, with the "
                                         "charger parked, changes it" % key)
                changed = self.settings.apply(arg)
            except ValueError as exc:
                self.results[name] = "refused: %s" % exc
                self.log("settings refused: %s" % exc)
                return
            self.results[name] = "applied" if changed else "unchanged"
            if changed:
                self.log("settings changed: %s" % ", ".join(sorted(arg)))
        elif kind == _cmd.PAUSE:
            if type(arg) is not bool:
                raise ValueError("pause takes true or false, got %r" % (arg,))
            self.paused = arg
            self.results[name] = "paused" if self.paused else "resumed"
        elif kind == _cmd.KEEP_FIRMWARE:
            # Marking the image valid writes the otadata partition: a flash
            # write, so the write-behind does it, between ticks.
            self.writer.keep_image = self.hal.mark_app_valid
            self.results[name] = "kept"

    def _selftest(self, now):
        s = self.safety
        if s.may_close(now, self.hal, self.evse, True):
            s.may_close(now, self.hal, self.evse, False)
            weld = self.hal.relay_sense()
            self.results["selftest"] = "gfci passed; contactor output %s" % (
                "LIVE with the contactor open: welded" if weld else "dead with the contactor open: ok")
            self._manual_test = False
        elif self.faults.code:
            self.results["selftest"] = "gfci failed: %s" % self.faults.code
            self._manual_test = False

    # -- the tick ---------------------------------------------------------------

    def tick(self):
        """Run one control tick. Never blocks, never writes flash. Raises
        SystemExit (0 for ``stop``, 3 for ``reboot``) once a requested stop
        has opened the contactor."""
        now = self.clock.ticks_ms()
        self._count_time(now)
        if self.commands._count:
            self._serve_commands(now)
        if self._manual_test:
            self._selftest(now)
        evse = self.evse
        hal = self.hal
        faults = self.faults
        pwm_on = self._pilot == _evse.PILOT_PWM
        hal.read_pilot()
        state = self.reader.update(hal.high_mv, hal.low_mv, pwm_on)
        was_fault = faults.code
        evse.edge(state, now)
        if evse.session_started:
            self.arbiter.start_session()
            self._session_mah = 0
            self._charge_mams = 0
            self.log("session start: EV in %s" % state)
        elif evse.session_ended:
            self.log("session end: EV in %s" % state)
            faults.session_ended()
        self._measured = hal.measured_a()
        if self.safety.step(now, evse, hal, self._relay, self.pilot_a(), self._measured,
                            self.reader.diode_ok, pwm_on):
            self.reader = PilotReader()     # retry: read the EV afresh, new session
        if faults.code != was_fault:
            self.log("fault %s%s" % (faults.code, " (lockout)" if faults.lockout else "")
                     if faults.code else "fault cleared")
        amps = self.arbiter.amps(now)          # no tuple: the tick allocates nothing it can avoid
        why = self.arbiter.why
        if (self.stopping or self.paused) and amps:
            amps, why = 0, "pause"
        if amps != self.limit_a or why != self.limit_by:
            self.log("limit %s A (%s)" % (amps, why))
        self.limit_a = amps
        self.limit_by = why
        if self._manual_test:
            may_close = False        # the self-test winding belongs to the manual test now
        else:
            may_close = self.safety.may_close(now, hal, evse,
                                              evse.wants_close(amps, self.reader.diode_ok, now))
        evse.outputs(amps, self.reader.diode_ok, now, may_close)
        self._apply(now)
        hal.feed_wdt()
        self._refresh(now)
        if self.stopping and not self._relay:
            raise SystemExit(3 if self.stopping == "reboot" else 0)   # the board is made safe

    def _refresh(self, now):
        # The snapshot, in place: every value here already exists (no allocation).
        s = self.snapshot
        a = self.arbiter
        cfg = self.settings.values
        faults = self.faults
        pwm = self._pilot == _evse.PILOT_PWM
        s.writing = True
        s.state = "F" if faults.code else (self.evse.state or "A")
        s.pilot_a = self._offer_a if pwm else 0
        s.duty_u16 = self._duty if pwm else 0
        s.relay = bool(self._relay)
        s.output_live = self.hal.relay_sense()
        s.measured_a = self._measured
        s.limit_a = self.limit_a
        s.limit_by = self.limit_by
        s.ack_seq = a.ack_seq
        s.epoch = a.epoch
        s.lease_age_ms = a.lease_age_ms(now)
        s.online = a.online(now)
        s.offline_a = cfg["offline_a"]
        s.start_a = cfg["start_a"]
        s.t_wd_s = cfg["t_wd_s"]
        s.fault = faults.code
        s.lockout = faults.lockout and self.writer.lockout_saved
        s.temp_c = self.safety.temp_c
        s.reset_reason = self.reset_reason
        s.high_mv = self.reader.high_mv
        s.low_mv = self.reader.low_mv
        s.diode_ok = self.reader.diode_ok
        s.uptime_s = self.uptime_s
        s.session_wh = self._session_mah * cfg["supply_v"] // 1000   # Wh, at the nominal supply_v
        s.rejected = a.rejected
        s.last_error = a.last_error
        s.stopping = self.stopping
        if cfg is not self._cfg_seen:      # a copy, made only when the settings change
            self._cfg_seen = cfg
            s.settings = dict(cfg)
        s.ticks = (s.ticks + 1) & _TICKS_MASK
        s.writing = False

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
            self.faults.uptime_s = self.uptime_s
        if self._relay:
            # The current is sampled once a second, in integer mA, and held
            # in between: no float arithmetic on the tick.
            self._sample_ms += dt
            if self._sample_ms >= 1000:
                self._charge_ma = self.hal.measured_ma()
                self._sample_ms = 0
            self._charge_mams += self._charge_ma * dt
            if self._charge_mams >= 3600000:
                self._session_mah += self._charge_mams // 3600000
                self._charge_mams %= 3600000

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
            if self._pilot == _evse.PILOT_LOW and self.faults.code is not None:
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
        """The snapshot as a new dict (see :class:`firmware.core.snapshot.Snapshot`),
        consistent from any thread. Allocates: not for the control tick."""
        return self.snapshot.copy()
