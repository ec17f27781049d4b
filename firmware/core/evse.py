"""EVSE state machine: pilot state in, pilot output and contactor command out.

Pure logic, edge-driven: :meth:`Evse.edge` compares the previous accepted pilot
state with the current one, and returns what the outputs must be; it performs
no I/O; :meth:`Evse.outputs` then derives the outputs. The caller applies :attr:`Evse.pilot`, :attr:`Evse.duty` and
:attr:`Evse.relay` to the hardware.

Rules (DESIGN.md §3, IEC 61851-1 Table A.6):

* C7: the contactor closes only in state C or D, with current offered, the
  diode check passed and no fault; it opens in the same tick that the state
  leaves C/D or a fault latches, and closes on the first tick the conditions
  hold (well inside the 3 s of sequence 4).
* C8: "not offering" is a static +12 V pilot; a fault is a static -12 V pilot
  (state F) held for at least 300 ms with the contactor open. After those
  300 ms the pilot goes to static +12 V (still not offering, contactor still
  open) so that the EV's state can be read again: an unplug must be seen to
  end a session that ended with a fault, and a retry needs the state.
* C10: a car already in C at boot is simply a new session: start current, then
  the contactor once the diode check passes. No fault is latched.
* Pause in C: PWM stops at once; the contactor stays closed for at most 6 s so
  that the EV can stop drawing first (Table A.6: the EVSE may open under load
  6 s after switching PWM off), or opens as soon as the EV goes to B.
"""
from firmware.core import faults as _faults
from firmware.core import pilot as _pilot

PILOT_HIGH = "high"
"""Static +12 V: no current offered (C8)."""
PILOT_PWM = "pwm"
"""1 kHz PWM at :attr:`Evse.duty`."""
PILOT_LOW = "low"
"""Static -12 V: state F, fault (C8)."""

RECLOSE_MS = 2000
"""Shortest time the contactor stays open before it may close again, ms: no
chatter on a wandering pilot (issue 13). An opening is never delayed. The
bound above is IEC 61851-1 Table A.6 sequence 4 (the contactor closes within
3 s of the EV entering C): 2 s leaves room for the GFCI self-test. Field
reports of chatter this prevents: esp32-evse issue 173 (B2/C2 toggling every
100-150 ms), OpenEVSE issues 433, 587 and 711 (relay wear, minimum idle time)."""
PAUSE_OPEN_MS = 6000
"""Longest the contactor stays closed after PWM stops in C (Table A.6), ms."""

# Fault codes of the pilot itself (stable: reported to the server, see faults.py).
FAULT_PILOT_E = _faults.PILOT_E          # pilot shorted to 0 V (state E)
FAULT_PILOT_LEVEL = _faults.PILOT_LEVEL  # a level in no J1772 window
FAULT_PILOT_F = _faults.PILOT_F          # pilot held at -12 V by something else

_CONNECTED = ("B", "C", "D")
_CHARGING = ("C", "D")


class Evse:
    """The state machine. ``clock`` provides ``ticks_diff``; ``faults`` is the
    charger's :class:`firmware.core.faults.Faults`, the one owner of the fault
    state, which this class only reads (and trips for the pilot's own faults).

    Outputs after each :meth:`outputs`: ``pilot`` (:data:`PILOT_HIGH`,
    :data:`PILOT_PWM` or :data:`PILOT_LOW`), ``duty`` (``duty_u16``, 0 unless
    PWM), ``offer_a`` (A the duty encodes, 0 unless PWM), ``relay`` (True =
    contactor closed). Events of the last step:
    ``session_started`` / ``session_ended`` (bool). State: ``state`` (the
    accepted pilot state, None before the first), ``fault`` (code or None,
    read from ``faults``).
    """

    def __init__(self, clock, faults):
        self.clock = clock
        self.faults = faults
        self.state = None
        self.pilot = PILOT_HIGH
        self.duty = 0
        self.offer_a = 0
        self.relay = False
        self.session_started = False
        self.session_ended = False
        self._pwm_off_at = None   # tick when PWM stopped while the contactor was closed
        # Tick of the last open: no close within RECLOSE_MS. A boot counts as
        # an open (the board may have reset with the contactor closed).
        self._opened_at = clock.ticks_ms()
        # The duty and offer of the last limit seen: recomputed only when it
        # changes, since offered_a's float result is a heap allocation.
        self._for_amps = None
        self._amps_duty = 0
        self._amps_offer = 0

    @property
    def fault(self):
        """The latched fault code, or None (owned by :attr:`faults`)."""
        return self.faults.code

    def trip(self, code, now, detail=""):
        """Latch fault ``code`` at tick ``now`` (through :attr:`faults`):
        contactor open, pilot at -12 V, in this very tick."""
        self.faults.trip(code, now, detail)
        self._stop_outputs(PILOT_LOW, now)

    def _stop_outputs(self, pilot, now):
        self._open(now)
        self.pilot = pilot
        self.duty = 0
        self.offer_a = 0

    def restart(self):
        """A fault just cleared: read the EV's state afresh, offer nothing yet."""
        self.state = None
        self.pilot = PILOT_HIGH

    def edge(self, state, now):
        """Take the accepted pilot ``state`` (``A``..``F``, ``?`` or None) of this
        tick. Sets :attr:`session_started` / :attr:`session_ended` and latches
        pilot faults. Call before :meth:`outputs`."""
        prev = self.state
        self.session_started = False
        self.session_ended = False
        if self.faults.code is not None:
            # While faulted only follow the EV (unplug), once the pilot is
            # readable again (the hold is over and the pilot back at +12 V,
            # read afresh); no new trips, no sessions.
            if self.pilot == PILOT_HIGH and state is not None and state != prev:
                self.state = state
                self.session_ended = prev in _CONNECTED and state not in _CONNECTED
            return
        if state == prev:
            return
        self.state = state
        if state == "E":
            self.trip(FAULT_PILOT_E, now)
        elif state == _pilot.INVALID:
            self.trip(FAULT_PILOT_LEVEL, now)
        elif state == "F":
            self.trip(FAULT_PILOT_F, now)
        if state in _CONNECTED and prev not in _CONNECTED:
            self.session_started = True
        elif state not in _CONNECTED and prev in _CONNECTED:
            self.session_ended = True

    def wants_close(self, amps, diode_ok, now):
        """True when everything but the GFCI self-test allows closing the
        contactor now (C7): state C or D, current offered, diode check passed,
        no fault, contactor open for at least :data:`RECLOSE_MS`."""
        return (self.faults.code is None and not self.relay and self.state in _CHARGING
                and diode_ok and _pilot.duty_u16(amps) > 0 and self.dwell_over(now))

    def outputs(self, amps, diode_ok, now, may_close=True):
        """Set the outputs for this tick from the limit in force ``amps`` (A, 0 =
        do not offer), the diode check, and ``may_close`` (the GFCI self-test
        passed). Returns nothing; read the attributes."""
        if self._opened_at is not None:
            self.dwell_over(now)         # keeps the dwell's latch current (C6)
        if self.faults.code is not None:
            self._stop_outputs(PILOT_HIGH if self.faults.held(now) else PILOT_LOW, now)
            return
        state = self.state
        if amps != self._for_amps or type(amps) is not type(self._for_amps):
            self._for_amps = amps
            self._amps_duty = _pilot.duty_u16(amps)
            self._amps_offer = _pilot.offered_a(amps)
        duty = self._amps_duty if state in _CONNECTED else 0
        if duty:
            self.pilot = PILOT_PWM
            self.duty = duty
            self.offer_a = self._amps_offer
        else:
            self.pilot = PILOT_HIGH
            self.duty = 0
            self.offer_a = 0
        if state not in _CHARGING:
            self._open(now)
            self._pwm_off_at = None
        elif not self.relay:
            self.relay = bool(duty) and diode_ok and may_close and self.dwell_over(now)
        elif duty:
            self._pwm_off_at = None
        else:
            if self._pwm_off_at is None:
                self._pwm_off_at = now
            elif self.clock.ticks_diff(now, self._pwm_off_at) >= PAUSE_OPEN_MS:
                self._open(now)
                self._pwm_off_at = None

    def _open(self, now):
        if self.relay:
            self.relay = False
            self._opened_at = now

    def dwell_over(self, now):
        """True when the contactor has been open for :data:`RECLOSE_MS` since
        its last open (or the boot). Latched: :meth:`outputs` asks every tick,
        so the latch is set 2 s after the open, long before a ticks_diff
        could turn negative (2^29 ms, C6)."""
        if self._opened_at is None:
            return True
        if not 0 <= self.clock.ticks_diff(now, self._opened_at) < RECLOSE_MS:
            self._opened_at = None
            return True
        return False
