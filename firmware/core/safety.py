"""Safety supervision a vendor would ship (C9): GFCI self-test and trips,
relay weld and ground checks, EV over-current, the diode check, temperature
derating, and each fault's recovery (retry, lockout, unplug, condition).

Pure logic driven once per control tick by :class:`firmware.core.charger.Charger`;
the hardware is read through the board interface (:mod:`firmware.hal`) and
faults are latched in the one owner of fault state,
:class:`firmware.core.faults.Faults` (through :meth:`firmware.core.evse.Evse.trip`,
so that the outputs stop in the same tick). This module detects; it keeps no
fault state of its own.
Time is the injected clock's ticks (ms), compared with ``ticks_diff`` only.
"""
from firmware.core import faults
from firmware.core import thermal

try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

SELFTEST_TRIP_MS = 200
"""The CCID must report the test current within this, ms."""
SELFTEST_CLEAR_MS = 500
"""...and clear within this once the test current stops, ms."""
SELFTEST_VALID_MS = 2000
"""A passed self-test allows a close within this, ms."""
RELAY_SETTLE_MS = 200
"""Time for the contactor to move before its weld or ground check, ms."""
OVERCURRENT_MS = 7000
"""C9: the EV may exceed its offer + max(2 A, 10 %) at most this long, ms."""
DIODE_MS = 1000
"""PWM running this long in B, C or D without a -12 V low level: diode fault, ms."""

NAN = float("nan")
_NUMBER = (int, float)

# const(): the phase tuples of the tick fold into constants (no allocation).
_IDLE = const(0)
_TESTING = const(1)
_RELEASING = const(2)
_PASSED = const(3)


class Safety:
    """The supervision of one charger. ``clock`` provides ``ticks_diff`` and
    ``ticks_add``; ``faults`` is the charger's
    :class:`firmware.core.faults.Faults`.

    Public: ``derate`` (:class:`firmware.core.thermal.Derate`), ``temp_c``
    (the last temperature reading, degrees C, NaN when unusable),
    ``selftests`` (count passed); ``lockout``, ``retries`` and ``retry_at``
    read the fault owner's.
    """

    def __init__(self, clock, faults):
        self.clock = clock
        self.faults = faults
        self.derate = thermal.Derate()
        self.temp_c = NAN
        self._over_offer = None        # the offer the over-current threshold is for (A)
        self._over_limit = 0
        self.selftests = 0
        self._phase = _IDLE
        self._phase_at = 0
        self._closed_at = None
        self._ground_check_at = None
        self._weld_check_at = None
        self._over_since = None
        self._diode_since = None

    @property
    def lockout(self):
        return self.faults.lockout

    @property
    def retries(self):
        return self.faults.retries

    @property
    def retry_at(self):
        return self.faults.retry_at

    def _diff(self, a, b):
        return self.clock.ticks_diff(a, b)

    # -- trips and recovery -------------------------------------------------------

    def trip(self, evse, code, now, detail=""):
        """Latch ``code`` (see :class:`firmware.core.faults.Faults`): a GFCI
        trip within 10 s of the close is a lockout at once (C9). A second trip
        while faulted is ignored."""
        early = (code == faults.GFCI and self._closed_at is not None
                 and self._diff(now, self._closed_at) < faults.EARLY_TRIP_MS)
        if self.faults.trip(code, now, detail, early):
            evse.trip(code, now)

    def reset(self, evse, now, board=None):
        """Remote ``reset_fault`` (or the technician's): clears a lockout and
        the retry count, then the fault itself once it has been held 300 ms.
        A welded contactor whose output is still live is not cleared: it is
        always a lockout. Returns True when no fault remains."""
        if self.faults.code is None:
            return True
        if board is not None and board.relay_sense():
            return False
        if not self.faults.reset(now):
            return False
        evse.restart()
        self.contactor(False, now)      # and check for a weld again
        return True

    # -- the tick -----------------------------------------------------------------

    def step(self, now, evse, board, relay, offer_a, measured_a, diode_ok, pwm_on):
        """Supervise one tick. ``relay``: the contactor as last driven;
        ``offer_a``: what the pilot offers (A); ``measured_a``: what flows (A);
        ``diode_ok``/``pwm_on``: the pilot reader's diode check and whether
        PWM runs. Trips ``evse`` on a fault; returns True when a fault cleared
        this tick (the caller then re-reads the pilot from scratch)."""
        try:
            temp = board.temp_c()
            temp = temp if type(temp) in _NUMBER and -100 < temp < 1000 else NAN
        except Exception:  # a broken sensor: stop, as at 71 degrees C
            temp = NAN
        self.temp_c = temp
        level = self.derate.update(temp)
        # The weld check runs whatever else is going on: a contactor welded
        # while opening on a fault must be found now, not at the retry.
        if not relay and self._weld_check_at is not None and self._diff(now, self._weld_check_at) >= 0:
            self._weld_check_at = None
            if board.relay_sense():
                if self.faults.code is not None:
                    self.faults.replace(faults.RELAY_WELDED, now)   # the worse one
                    evse.trip(faults.RELAY_WELDED, now)
                else:
                    self.trip(evse, faults.RELAY_WELDED, now)
                return False
        if self.faults.code is not None:
            self._over_since = None
            self._diode_since = None
            if self.faults.recover(now, evse.state, level):
                evse.restart()
                return True
            return False
        if self._closed_at is not None and self._diff(now, self._closed_at) >= faults.EARLY_TRIP_MS:
            self._closed_at = None     # past the early-trip window: latched, safe across the wrap (C6)
        if level >= thermal.STOP:
            self.trip(evse, faults.OVER_TEMP, now, "temperature %s" % temp)
            return False
        if self._phase in (_IDLE, _PASSED) and board.gfci_tripped():
            self.trip(evse, faults.GFCI, now)
            return False
        if relay and self._ground_check_at is not None and self._diff(now, self._ground_check_at) >= 0:
            self._ground_check_at = None
            if not board.ground_ok():
                self.trip(evse, faults.NO_GROUND, now)
                return False
        if offer_a != self._over_offer:      # the threshold changes with the offer only
            self._over_offer = offer_a
            self._over_limit = offer_a + max(2, offer_a / 10)
        if relay and offer_a > 0 and measured_a > self._over_limit:
            if self._over_since is None:
                self._over_since = now
            elif self._diff(now, self._over_since) > OVERCURRENT_MS:
                self.trip(evse, faults.EV_OVERCURRENT, now, "%.1f A on %.1f A" % (measured_a, offer_a))
                return False
        else:
            self._over_since = None
        if pwm_on and evse.state in ("B", "C", "D") and not diode_ok:
            if self._diode_since is None:
                self._diode_since = now
            elif self._diff(now, self._diode_since) >= DIODE_MS:
                self.trip(evse, faults.DIODE, now)
                return False
        else:
            self._diode_since = None
        return False

    def contactor(self, closed, now):
        """Tell the supervision the contactor was just driven ``closed``: the
        ground check follows a close, the weld check an open."""
        if closed:
            self._closed_at = now
            self._ground_check_at = self.clock.ticks_add(now, RELAY_SETTLE_MS)
            self._weld_check_at = None
            self._phase = _IDLE
        else:
            self._weld_check_at = self.clock.ticks_add(now, RELAY_SETTLE_MS)
            self._ground_check_at = None
            self._closed_at = None     # the early-trip window applies while closed only

    def may_close(self, now, board, evse, wants):
        """GFCI self-test before every close (C9). ``wants``: everything else
        allows a close this tick. Runs the test over a few ticks (test current
        on, the CCID must trip; off, it must clear) and returns True once it
        passed. A failed test is a ``gfci_selftest`` fault: no close."""
        phase = self._phase
        if not wants or self._weld_check_at is not None:
            # (and no close before the weld check of the last open has run)
            if phase in (_TESTING, _RELEASING):
                board.gfci_test(False)
            self._phase = _IDLE
            return False
        age = self._diff(now, self._phase_at)
        if phase == _IDLE:
            if board.gfci_tripped():
                self.trip(evse, faults.GFCI, now, "before close")
                return False
            board.gfci_test(True)
            self._phase, self._phase_at = _TESTING, now
        elif phase == _TESTING:
            if board.gfci_tripped():
                board.gfci_test(False)
                self._phase, self._phase_at = _RELEASING, now
            elif age > SELFTEST_TRIP_MS:
                board.gfci_test(False)
                self._phase = _IDLE
                self.trip(evse, faults.GFCI_SELFTEST, now, "no trip on test current")
        elif phase == _RELEASING:
            if not board.gfci_tripped():
                self._phase, self._phase_at = _PASSED, now
                self.selftests += 1
                return True
            if age > SELFTEST_CLEAR_MS:
                self._phase = _IDLE
                self.trip(evse, faults.GFCI_SELFTEST, now, "did not clear")
        elif phase == _PASSED:
            if age <= SELFTEST_VALID_MS:
                return True
            self._phase = _IDLE
        return False
