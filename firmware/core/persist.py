"""Write-behind: the core's durable state goes to flash between control
ticks, never inside one (C5, issue 13).

A littlefs write on the ESP32 takes tens of ms (an erase), and under the GIL
it stalls every thread. So the control tick only changes RAM and marks what
must be saved. The control loop (:func:`firmware.loop.run`) calls
:meth:`WriteBehind.step` right after each tick, and it writes at most one
file per call, in this order:

1. the lockout record (``lockout.json``): a lockout must survive a watchdog
   reset or a crash. It is written in the gap right after the tick that
   latched it. The window in which a reset loses it is that gap plus one
   write; the lockout is not reported (:attr:`firmware.core.snapshot.Snapshot.lockout`)
   until the record is on flash, so a reported lockout is never lost.
2. marking a new firmware image valid (the otadata partition), once its
   health check passed;
3. the settings (a new offline or start current from the server, a new
   ``t_wd_s``): in force in RAM at once. A lower offline or start current is
   written in the gap right after its tick, before the state message that
   acknowledges it goes out (the server budgets the group's offline currents
   with it, S3); other changes are written at most once per
   :data:`SETTINGS_GAP_MS` (changes in between coalesce into one write);
4. the fault log.

A failed write (OSError) is logged once per file, retried after
:data:`RETRY_MS`, and never stops the charger.
"""
from firmware.core import atomicfile

SETTINGS_GAP_MS = 1000
"""Shortest time between two settings writes, ms: a server that changes the
offline current every second costs one flash write per second at most."""
RETRY_MS = 5000
"""Wait after a failed write before the next try of the same file, ms."""


class WriteBehind:
    """Persists, behind the tick, what the core marks unsaved.

    ``clock``: ``ticks_ms``/``ticks_diff``/``ticks_add``; ``settings``: a
    :class:`firmware.core.settings.Settings`; ``faults``: the
    :class:`firmware.core.faults.Faults` (its ``lockout``, ``code`` and
    ``log``); ``lock_path``: the lockout record; ``fs``: the filesystem;
    ``log(text)``: the event log.

    Public: ``lockout_saved`` (the lockout state on flash, bool), ``writes``
    (count), ``failures`` (count).
    """

    def __init__(self, clock, settings, faults, lock_path, fs, log, lockout_saved=False):
        self.clock = clock
        self.settings = settings
        self.faults = faults
        self.lock_path = lock_path
        self.fs = fs
        self.log = log
        self.lockout_saved = lockout_saved
        self._saved_code = faults.code if lockout_saved else None
        self.writes = 0
        self.failures = 0
        self.keep_image = None   # the board's mark_app_valid, once a new version proved itself
        now = clock.ticks_ms()
        self._settings_at = clock.ticks_add(now, -SETTINGS_GAP_MS)
        self._retry_at = [None, None, None]    # lockout, settings, fault log

    def due(self):
        """True when something waits to be written (no allocation)."""
        log = self.faults.log
        f = self.faults
        return (f.lockout != self.lockout_saved or (f.lockout and f.code != self._saved_code)
                or self.settings.unsaved or (log is not None and log.unsaved)
                or self.keep_image is not None)

    def _may(self, which, now):
        at = self._retry_at[which]
        if at is None:
            return True
        # Still waiting only while the retry is 0..RETRY_MS ahead: a retry
        # time left over from long ago (a ticks_diff past 2^29 ms turns
        # around, C6) never blocks a write.
        if 0 < self.clock.ticks_diff(at, now) <= RETRY_MS:
            return False
        self._retry_at[which] = None
        return True

    def _failed(self, which, now, what, exc):
        self.failures += 1
        self._retry_at[which] = self.clock.ticks_add(now, RETRY_MS)
        self.log("%s not saved (retry in %d s): %s" % (what, RETRY_MS // 1000, exc))

    def _write(self, which, now, what, save):
        try:
            save()
        except OSError as exc:
            self._failed(which, now, what, exc)
            return False
        self.writes += 1
        return True

    def _save_lockout(self):
        f = self.faults
        locked = f.lockout
        code = f.code if locked else None
        atomicfile.write_atomic(self.lock_path, code or "", self.fs)
        self.lockout_saved = locked
        self._saved_code = code

    def step(self, now=None):
        """Write the most urgent unsaved item, if any. Returns True when a
        file was written. Never raises OSError."""
        if not self.due():
            return False
        if now is None:
            now = self.clock.ticks_ms()
        f = self.faults
        if (f.lockout != self.lockout_saved or (f.lockout and f.code != self._saved_code)) \
                and self._may(0, now):
            return self._write(0, now, "lockout record", self._save_lockout)
        if self.keep_image is not None:
            keep, self.keep_image = self.keep_image, None
            try:
                keep()
            except OSError as exc:
                self.failures += 1
                self.log("firmware image not marked valid: %s" % exc)
                return False
            self.writes += 1
            return True
        s = self.settings
        # A lower offline or start current is written at once (the server
        # budgets the group's offline currents with it, S3); other changes
        # wait out the gap and coalesce. 0 <= age < gap: too soon; a negative
        # age is a last write more than 2^29 ms ago (the tick wrap, C6).
        age = self.clock.ticks_diff(now, self._settings_at)
        if s.unsaved and self._may(1, now) and (s.lowered or not 0 <= age < SETTINGS_GAP_MS):
            self._settings_at = now
            return self._write(1, now, "settings", s.save)
        log = f.log
        if log is not None and log.unsaved and self._may(2, now):
            return self._write(2, now, "fault log", log.save)
        return False

    def flush(self, limit=8):
        """Write everything unsaved now (at shutdown, with the board safe),
        ignoring the settings gap. Returns True when nothing is left."""
        self._settings_at = self.clock.ticks_add(self.clock.ticks_ms(), -SETTINGS_GAP_MS)
        self._retry_at = [None, None, None]
        for _ in range(limit):
            if not self.due() or not self.step():
                break
        return not self.due()
