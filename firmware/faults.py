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

from firmware import store, strictjson

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

LOG_SIZE = 16
"""Entries kept in the persisted fault log."""


_CODE_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789_"


def read_lockout(path, fs=store.FS):
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
    ``[uptime_s, code, detail]``), written atomically once per new entry.

    A missing or corrupt file starts an empty log; a failed write keeps the
    entry in RAM (``unsaved``) and is retried with the next entry.
    """

    def __init__(self, path, fs=store.FS):
        self.path = path
        self.fs = fs
        self.unsaved = False
        self.entries = []
        text = store.read_text(path, fs, 4096)
        try:
            data = strictjson.loads(text) if text else []
        except Exception:  # corrupt log: start afresh, it is only a record
            data = []
        if type(data) is list:
            for e in data[-LOG_SIZE:]:
                if type(e) is list and len(e) == 3 and type(e[0]) is int and type(e[1]) is str:
                    self.entries.append(e)

    def add(self, uptime_s, code, detail=""):
        """Append a fault and persist the log. Returns True when written."""
        self.entries.append([uptime_s, code, str(detail)[:60]])
        if len(self.entries) > LOG_SIZE:
            self.entries.pop(0)
        try:
            store.write_atomic(self.path, json.dumps(self.entries), self.fs)
        except OSError:
            self.unsaved = True
            return False
        self.unsaved = False
        return True

    def recent(self, n=LOG_SIZE):
        """The last ``n`` entries, oldest first."""
        return self.entries[-n:]
