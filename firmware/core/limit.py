"""The one arbiter of the limit in force (C1-C4, C6).

Everything that may bound the pilot's offer meets here: the start current, the
server's setpoint, the offline current after the connectivity watchdog
expires, the unit's rating and installer max, thermal derating, pause and
fault. :meth:`LimitArbiter.limit` returns the current to offer and the reason,
and nothing else decides what the pilot offers.

Time is a parameter: ``now`` is a tick in ms from the injected ``clock``, and
every comparison goes through ``clock.ticks_diff`` so that the ESP32 tick wrap
(2^30 ms) is harmless (C6).
"""
from firmware.core import setpoint as _setpoint
from firmware.core import thermal as _thermal

MIN_A = 6
"""Smallest offer (A); a limit below it pauses (C3, S4)."""

# Reasons, as reported in the state message's ``limit_by`` (DESIGN.md §4).
START = "start"
SETPOINT = "setpoint"
OFFLINE = "offline"
UNIT = "unit"
THERMAL = "thermal"
PAUSE = "pause"
FAULT = "fault"


class LimitArbiter:
    """Decides the current offered and why.

    ``clock`` provides ``ticks_diff``; ``settings`` is a
    :class:`firmware.core.settings.Settings` with ``unit_rating_a``, ``installer_max_a``,
    ``start_a``, ``offline_a`` and ``t_wd_s``; ``now`` (ms tick) starts the
    watchdog lease at boot, so a charger that never hears a server falls back
    to its offline current ``T_wd`` after boot. ``faults``
    (:class:`firmware.core.faults.Faults`) and ``derate``
    (:class:`firmware.core.thermal.Derate`) are read, never written: a fault
    offers 0, a derating level caps the offer (new ones when not given).

    Public state: ``epoch``/``ack_seq`` of the last setpoint applied (None
    before the first), ``rejected`` (count of refused messages) and
    ``last_error`` (why the latest one was refused).
    """

    def __init__(self, clock, settings, now, faults=None, derate=None):
        from firmware.core.faults import Faults
        self.clock = clock
        self.settings = settings
        self.faults = faults if faults is not None else Faults(clock)
        self.derate = derate if derate is not None else _thermal.Derate()
        self.epoch = None
        self.ack_seq = None
        self.why = START            # the reason of the last amps(): limit_by
        self.rejected = 0
        self.last_error = None
        self._setpoint_a = None   # None: no allocation yet in this session (C2)
        self._cap_for = None      # the derating of the last amps/level seen
        self._cap_level = 0
        self._capped = 0
        self._lease_from = now
        self._expired = False     # latched: see online()

    # -- inputs ---------------------------------------------------------------

    def offer(self, payload, now):
        """Apply a ``set`` message (bytes or str) received at tick ``now``.

        A valid message replaces the previous setpoint (not min(old, new), C3),
        puts any new ``offline_a``/``start_a`` in force (C5: the write-behind
        saves them, only on change, never on the tick) and renews the
        watchdog lease (C4). Returns True.

        A malformed, non-finite, negative, wrongly typed or stale message (an
        ``epoch`` older than the current one, or a ``seq`` not newer than the
        last applied in the same ``epoch``: epochs only grow, a new one means
        the server restarted) changes nothing, does not feed the watchdog, and
        raises ValueError saying why.
        """
        try:
            sp = _setpoint.parse(payload)
            if self.epoch is not None and sp.epoch < self.epoch:
                raise ValueError("stale epoch %d (current %d)" % (sp.epoch, self.epoch))
            if sp.epoch == self.epoch and self.ack_seq is not None and sp.seq <= self.ack_seq:
                raise ValueError("stale seq %d (last applied %d in epoch %d)"
                                 % (sp.seq, self.ack_seq, sp.epoch))
        except ValueError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            raise
        self.epoch = sp.epoch
        self.ack_seq = sp.seq
        self._setpoint_a = sp.current_a
        self._lease_from = now
        self._expired = False
        changes = {}
        if sp.offline_a is not None:
            changes["offline_a"] = sp.offline_a
        if sp.start_a is not None:
            changes["start_a"] = sp.start_a
        if changes:
            self.settings.apply(changes)
        return True

    def start_session(self):
        """A car was connected: until the server allocates to this session, the
        offer is at most the start current (C2, seed: start at 8 A)."""
        self._setpoint_a = None

    # -- outputs --------------------------------------------------------------

    def lease_age_ms(self, now):
        """ms since the last valid setpoint (or since boot when none came)."""
        return self.clock.ticks_diff(now, self._lease_from)

    def online(self, now):
        """True while the watchdog lease holds: ``T_wd`` has not yet passed since
        the last valid setpoint (or boot). At exactly ``T_wd`` it has expired.

        Expiry is latched until the next valid setpoint: ``ticks_diff`` turns
        negative after 2^29 ms, and a lease must not come back to life then
        (C6). The control loop asks every tick, so the latch is always set
        long before that."""
        if not self._expired:
            age = self.lease_age_ms(now)
            if age < 0 or age >= self.settings["t_wd_s"] * 1000:
                self._expired = True
        return not self._expired

    def limit(self, now):
        """Return ``(amps, reason)`` in force at tick ``now`` (see
        :meth:`amps`, which the control tick calls: it allocates no tuple)."""
        amps = self.amps(now)
        return amps, self.why

    def amps(self, now):
        """Return the current in force at tick ``now`` (A) and leave its
        reason in ``self.why``.

        The current is 0 (do not offer) or 6..80 A; the reason is one of
        ``start``, ``setpoint``, ``offline``, ``unit``, ``thermal``, ``pause``,
        ``fault``. Rule (C1): min(unit rating, installer max, limit in force),
        then derated by temperature (C9: half, a quarter but never below 6 A),
        where the limit in force is the server's setpoint while the lease holds,
        the start current before the first setpoint of a session, and the
        offline current once the lease expired (never above the start current
        for a session the server has not yet allocated to). Below 6 A: pause.
        """
        s = self.settings
        if self.faults.code is not None:
            self.why = FAULT
            return 0
        if not self.online(now):
            amps, why = s["offline_a"], OFFLINE
            if self._setpoint_a is None and s["start_a"] < amps:
                amps, why = s["start_a"], START
        elif self._setpoint_a is None:
            amps, why = s["start_a"], START
        else:
            amps, why = self._setpoint_a, SETPOINT
        cap = min(s["unit_rating_a"], s["installer_max_a"])
        if amps > cap:
            amps, why = cap, UNIT
        level = self.derate.level
        if level:
            # Recomputed only when the input changes: the division's float
            # result is a heap allocation on the ESP32.
            if amps != self._cap_for or level != self._cap_level:
                self._cap_for = amps
                self._cap_level = level
                self._capped = _thermal.cap(amps, level)
            derated = self._capped
            if derated < amps:
                amps, why = derated, THERMAL
        if amps < MIN_A:
            self.why = PAUSE
            return 0
        self.why = why
        return amps
