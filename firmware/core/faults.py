"""Fault codes, their recovery policy, and the persisted fault log (C9).

Every fault has a stable code, reported as ``fault`` in the state message and
kept in the fault log. How a fault ends depends on its kind:

=================  ===============================================================
policy             ends
=================  ===============================================================
``RETRY``          by itself after 15 min, at most 4 times per session; the next
                   trip is a lockout. A GFCI trip within 10 s of the contactor
                   closing is a lockout at once (C9, UL 2231 practice).
``LOCKOUT``        only by a power cycle or a remote ``reset_fault``.
``UNPLUG``         when the EV is unplugged (the session ends with the fault).
``CONDITION``      when its cause is gone (temperature back below 68 degrees C).
=================  ===============================================================

Every fault holds the pilot at -12 V (state F) for at least 300 ms with the
contactor open (C8) before anything else happens.
"""
import json

from firmware.core import atomicfile
from firmware.core import strictjson, thermal

GFCI = "gfci"                    # residual current (CCID20) while charging
GFCI_SELFTEST = "gfci_selftest"  # the self-test before closing did not trip or did not clear
NO_GROUND = "no_ground"          # ground check failed after closing
RELAY_WELDED = "relay_welded"    # output still live after the contactor opened
OVER_TEMP = "over_temp"          # 71 degrees C
EV_OVERCURRENT = "ev_overcurrent"  # EV drew more than offered + max(2 A, 10 %) for 7 s
DIODE = "diode"                  # no -12 V low level while PWM runs: EV diode missing
PILOT_E = "pilot_e"              # pilot shorted to 0 V (state E)
PILOT_LEVEL = "pilot_level"      # a pilot level in no J1772 window
PILOT_F = "pilot_f"              # pilot held at -12 V by something else
LOCKOUT_UNREADABLE = "lockout_unreadable"  # the lockout record on flash is corrupt: still a lockout

RETRY = "retry"
LOCKOUT = "lockout"
UNPLUG = "unplug"
CONDITION = "condition"

POLICY = {
    GFCI: RETRY, GFCI_SELFTEST: RETRY, NO_GROUND: RETRY, DIODE: RETRY,
    PILOT_E: RETRY, PILOT_LEVEL: RETRY, PILOT_F: RETRY,
    RELAY_WELDED: LOCKOUT, EV_OVERCURRENT: UNPLUG, OVER_TEMP: CONDITION,
    LOCKOUT_UNREADABLE: LOCKOUT,
}
"""Code -> policy. Unknown codes are lockouts."""

RETRY_AFTER_MS = 15 * 60 * 1000
"""C9: a retryable fault is retried after 15 min."""
MAX_RETRIES = 4
"""C9: at most 4 retries per session; the 5th trip locks out."""
EARLY_TRIP_MS = 10000
"""C9: a GFCI trip within 10 s of closing locks out at once."""
FAULT_HOLD_MS = 300
"""C8: a fault holds the pilot at -12 V (state F) at least this long, ms."""

LOG_SIZE = 16
"""Entries kept in the persisted fault log."""


_CODE_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789_"


def read_lockout(path, fs=atomicfile.FS):
    """The fault code of the lockout recorded in ``path`` (the file holds the
    code, or nothing once the lockout was cleared), or None when there is
    none. A record that exists but is not a plain code (blank, garbled, not
    UTF-8, unreadable) is :data:`LOCKOUT_UNREADABLE`: a damaged record must
    never clear a lockout (C9)."""
    try:
        f = fs.open(path, "rb")
    except OSError:
        return None
    try:
        data = f.read(64)
    except (OSError, MemoryError):
        return LOCKOUT_UNREADABLE
    finally:
        f.close()
    if not data:
        return None
    code = data.strip()
    if not code or len(code) > 32:
        return LOCKOUT_UNREADABLE
    for c in code:
        if c not in _CODE_CHARS:
            return LOCKOUT_UNREADABLE
    return code.decode()


def policy(code):
    """The recovery policy of fault ``code`` (see the table above)."""
    return POLICY.get(code, LOCKOUT)


class FaultLog:
    """The last :data:`LOG_SIZE` faults, persisted in ``path`` (JSON list of
    ``[uptime_s, code, detail]``).

    :meth:`add` only records in RAM and marks the log ``unsaved``; the
    write-behind (:class:`firmware.core.persist.WriteBehind`) calls
    :meth:`save` between control ticks, never inside one. A missing or corrupt
    file starts an empty log; a failed write keeps ``unsaved`` set, and the
    next :meth:`save` writes everything again.
    """

    def __init__(self, path, fs=atomicfile.FS):
        self.path = path
        self.fs = fs
        self.unsaved = False
        self.entries = []
        text = atomicfile.read_text(path, fs, 4096)
        try:
            data = strictjson.loads(text) if text else []
        except Exception:  # corrupt log: start afresh, it is only a record
            data = []
        if type(data) is list:
            for e in data[-LOG_SIZE:]:
                if type(e) is list and len(e) == 3 and type(e[0]) is int and type(e[1]) is str:
                    self.entries.append(e)

    def add(self, uptime_s, code, detail=""):
        """Append a fault (in RAM; :meth:`save` persists it)."""
        self.entries.append([uptime_s, code, str(detail)[:60]])
        if len(self.entries) > LOG_SIZE:
            self.entries.pop(0)
        self.unsaved = True

    def save(self):
        """Write the log atomically if it changed. Returns True when written;
        raises OSError when the filesystem refuses (``unsaved`` stays set)."""
        if not self.unsaved:
            return False
        atomicfile.write_atomic(self.path, json.dumps(self.entries), self.fs)
        self.unsaved = False
        return True

    def recent(self, n=LOG_SIZE):
        """The last ``n`` entries, oldest first."""
        return self.entries[-n:]


class Faults:
    """The one owner of the charger's fault state (C8, C9).

    It latches a fault, decides how it ends (:func:`policy`), counts the
    retries, holds the lockout, clears, and records each new fault in the
    :class:`FaultLog`. Everything else reads it: the state machine
    (:class:`firmware.core.evse.Evse`) drives state F while :attr:`code` is
    set, the limit arbiter offers 0, the supervision
    (:class:`firmware.core.safety.Safety`) detects and calls :meth:`trip`,
    and the write-behind persists :attr:`lockout` in the lockout record.

    ``clock`` provides ``ticks_diff``/``ticks_add`` (ms ticks, C6); ``log``
    is the :class:`FaultLog` (or None). Public, read-only for others:
    ``code`` (str or None), ``lockout`` (bool), ``retries`` (0..4 in this
    session), ``retry_at`` (tick of the next retry, or None), ``since``
    (tick of the trip).
    """

    def __init__(self, clock, log=None):
        self.clock = clock
        self.log = log
        self.code = None
        self.lockout = False
        self.retries = 0
        self.retry_at = None
        self.since = 0
        self.uptime_s = 0        # kept current by the charger: the fault log's time stamp
        self._held = False

    def trip(self, code, now, detail="", early=False):
        """Latch fault ``code`` at tick ``now`` and decide how it ends.
        ``early``: a GFCI trip within 10 s of the contactor closing (C9: lockout
        at once). A second trip while a fault is latched is ignored. Returns
        True when ``code`` was latched."""
        if self.code is not None:
            return False
        self.code = code
        self.since = now
        self._held = False
        self.retry_at = None
        pol = policy(code)
        if pol == LOCKOUT:
            self.lockout = True
        elif pol == RETRY:
            if early or self.retries >= MAX_RETRIES:
                self.lockout = True
            else:
                self.retries += 1
                self.retry_at = self.clock.ticks_add(now, RETRY_AFTER_MS)
        if self.log is not None:
            self.log.add(self.uptime_s, code, ("lockout " if self.lockout else "") + detail)
        return True

    def replace(self, code, now, detail=""):
        """Latch ``code`` in place of the fault in force (a worse one found
        while faulted: a contactor welded while it opened on a fault)."""
        self.code = None
        self.trip(code, now, detail)

    def restore(self, code, now):
        """A lockout found in the lockout record at boot (``code``, tick
        ``now``): latched again, with its 300 ms in state F."""
        self.code = code
        self.lockout = True
        self.since = now
        self._held = False

    def held(self, now):
        """True once the fault has held state F for 300 ms (C8). Latched, so
        that a fault older than 2^29 ms (a negative ticks_diff) still counts
        as held (C6)."""
        if not self._held:
            age = self.clock.ticks_diff(now, self.since)
            self._held = age < 0 or age >= FAULT_HOLD_MS
        return self._held

    def _clear(self):
        self.code = None
        self.retry_at = None
        self._held = False

    def recover(self, now, ev_state, temp_level):
        """Clear the fault when its policy says it has ended: after the retry
        delay (RETRY), once the EV is unplugged (UNPLUG, ``ev_state`` ``A``), or
        once the temperature level is below the stop level (CONDITION).
        Never during a lockout or within the 300 ms hold. Returns True when
        cleared."""
        code = self.code
        if code is None or self.lockout or not self.held(now):
            return False
        pol = policy(code)
        if pol == RETRY:
            due = self.retry_at is not None and self.clock.ticks_diff(now, self.retry_at) >= 0
        elif pol == UNPLUG:
            due = ev_state == "A"
        elif pol == CONDITION:
            due = temp_level < thermal.STOP
        else:
            due = False
        if due:
            self._clear()
        return due

    def reset(self, now):
        """Remote ``reset_fault``: ends a lockout and the retry count, and
        the fault itself once held 300 ms. Returns True when no fault remains."""
        if self.code is None:
            return True
        if not self.held(now):
            return False
        self.lockout = False
        self.retries = 0
        self._clear()
        return True

    def session_ended(self):
        """The EV left: the next car's retries start afresh; a lockout stays."""
        if not self.lockout:
            self.retries = 0
