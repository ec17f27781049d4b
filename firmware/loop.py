"""The control loop, and the exception boundary around every edge it polls.

:func:`run` calls the safety core's tick (:meth:`firmware.core.charger.Charger.tick`)
every 10 ms, then lets the write-behind save at most one file
(:class:`firmware.core.persist.WriteBehind`), then polls the edges: the
server bridge, OTA, the link watch, the simulator's control channel.

An edge is not safety code. Each runs behind an :class:`Edge`: whatever it
raises (a bug, a ``MemoryError`` while it builds a report, a thread that
cannot start) is caught, logged, and the edge is retried after a backoff.
The tick goes on at the limit in force, and the connectivity watchdog (C4)
lives in the core, so it falls back on time whatever the edges do.
"""
import gc

BACKOFF_MIN_MS = 1000
"""First wait before a failed edge runs again, ms; doubled per failure."""
BACKOFF_MAX_MS = 60000
"""Longest wait before a failed edge runs again, ms."""


class Edge:
    """One non-safety job polled by the control loop, behind an exception
    boundary with its own restart policy.

    ``name`` (for the log), ``poll()`` (the job: non-blocking; a true result
    asks the loop to end), ``clock`` (ticks), ``log(text)``, ``restart()``
    (optional: called after a failure, before the backoff, e.g. to make a new
    link). Public: ``failures`` (count), ``last_error`` (text or None),
    ``backoff_ms`` (the next wait).
    """

    def __init__(self, name, poll, clock, log, restart=None):
        self.name = name
        self.poll = poll
        self.clock = clock
        self.log = log
        self.restart = restart
        self.failures = 0
        self.last_error = None
        self.backoff_ms = BACKOFF_MIN_MS
        self._resume_at = None
        self._failing = False

    def step(self, now):
        """Run the job unless it is backing off. Returns its result (true:
        end the loop); never raises an Exception."""
        if self._resume_at is not None:
            if self.clock.ticks_diff(now, self._resume_at) < 0:
                return False
            self._resume_at = None
        try:
            done = self.poll()
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing reaches the core
            self._failed(now, exc)
            return False
        if self._failing:
            self._failing = False
            self.backoff_ms = BACKOFF_MIN_MS
            self.log("%s: running again" % self.name)
        return done

    def _failed(self, now, exc):
        if isinstance(exc, MemoryError):
            gc.collect()               # what the failed job held is garbage now
        self.failures += 1
        self._failing = True
        try:
            self.last_error = "%s: %s" % (type(exc).__name__, exc)
            self.log("%s failed (%d so far): %s; retry in %d ms"
                     % (self.name, self.failures, self.last_error, self.backoff_ms))
        except Exception:  # noqa: BLE001 - even the log line may not fit in the heap
            self.last_error = type(exc).__name__
        if self.restart is not None:
            try:
                self.restart()
            except Exception as again:  # noqa: BLE001
                self.last_error = "restart: %s: %s" % (type(again).__name__, again)
        self._resume_at = self.clock.ticks_add(now, self.backoff_ms)
        self.backoff_ms = min(self.backoff_ms * 2, BACKOFF_MAX_MS)


def run(charger, clock, edges=(), tick_ms=10, ticks=None):
    """Run the control loop: :meth:`~firmware.core.charger.Charger.tick` every
    ``tick_ms`` ms, then one write-behind step, then each :class:`Edge` in
    ``edges``. Runs ``ticks`` ticks, or until an edge asks to stop when None.
    The tick's SystemExit (a requested stop or reboot) ends it. Scheduling uses
    ``ticks_add``/``ticks_diff`` (C6); an overrun restarts the schedule rather
    than bursting ticks."""
    due = clock.ticks_ms()
    n = 0
    writer = charger.writer
    while ticks is None or n < ticks:
        charger.tick()
        now = clock.ticks_ms()
        if writer.due():
            writer.step(now)
        for edge in edges:
            if edge.step(now):
                return
        n += 1
        due = clock.ticks_add(due, tick_ms)
        wait = clock.ticks_diff(due, clock.ticks_ms())
        if wait > 0:
            clock.sleep_ms(wait)
        else:
            due = clock.ticks_ms()
