"""The command queue: the only way into the safety core from outside it.

The uplink, OTA, diagnostics at the REPL and the simulator's control
channel do not touch the core's objects. They put a typed command here, and
the control loop carries it out at the start of its next tick
(:meth:`firmware.core.charger.Charger.tick`).

The queue is small and bounded. :meth:`Commands.put` refuses, never blocks:
it returns False when the queue is full, or when another thread holds the
lock at that instant (the caller may try again). The control loop takes at
most :data:`PER_TICK` commands per tick, also without blocking.
"""
import _thread

try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

# Command kinds. The argument of each is given after it.
SETPOINT = const(1)
"""A ``set`` message from the server (bytes, validated by the core, C3)."""
RESET_FAULT = const(2)
"""Clear a fault or lockout (the remote ``reset_fault``; no argument)."""
SELFTEST = const(3)
"""GFCI self-test and contactor check, contactor open only (no argument)."""
STOP = const(4)
"""End the control loop by the stop path: stop offering, open once the EV
has stopped drawing (or after 6 s), then exit (no argument)."""
REBOOT = const(5)
"""As :data:`STOP`, then reboot the board (no argument)."""
SETTINGS = const(6)
"""Change settings (dict name -> value), validated as a whole; persisted
behind the tick."""
PAUSE = const(7)
"""Stop offering current (True) or offer again (False), locally, on top of the
limit in force."""
KEEP_FIRMWARE = const(8)
"""A new version passed its health check: keep the running firmware image
(the board's ``mark_app_valid``; no argument)."""

NAMES = {SETPOINT: "setpoint", RESET_FAULT: "reset_fault", SELFTEST: "selftest",
         STOP: "stop", REBOOT: "reboot", SETTINGS: "settings", PAUSE: "pause",
         KEEP_FIRMWARE: "keep_firmware"}
"""Kind -> name, for logs and for :attr:`firmware.core.charger.Charger.results`."""

SIZE = 8
"""Commands the queue holds."""
_FREE = (0, None)    # an empty slot
PER_TICK = 2
"""Commands the control loop carries out per tick, at most."""


class Commands:
    """A bounded, thread-safe queue of ``(kind, argument)`` commands.

    ``refused`` counts the commands turned away (full or busy)."""

    def __init__(self, size=SIZE):
        self._slots = [_FREE] * size
        self._head = 0       # next to take
        self._count = 0
        self._lock = _thread.allocate_lock()
        self.refused = 0

    def put(self, kind, arg=None):
        """Queue command ``kind`` (one of the constants above) with ``arg``.
        Returns True when queued, False when refused (full or busy). Raises
        ValueError for an unknown kind."""
        if kind not in NAMES:
            raise ValueError("unknown command kind %r" % (kind,))
        if not self._lock.acquire(0):
            self.refused += 1
            return False
        try:
            size = len(self._slots)
            if self._count >= size:
                self.refused += 1
                return False
            self._slots[(self._head + self._count) % size] = (kind, arg)
            self._count += 1
            return True
        finally:
            self._lock.release()

    def pending(self):
        """Number of commands waiting (a plain read: no lock, no allocation)."""
        return self._count

    def take(self):
        """The oldest ``(kind, argument)``, or None when the queue is empty or
        busy at this instant. Never blocks."""
        if not self._count or not self._lock.acquire(0):
            return None
        try:
            if not self._count:
                return None
            item = self._slots[self._head]
            self._slots[self._head] = _FREE
            self._head = (self._head + 1) % len(self._slots)
            self._count -= 1
            return item
        finally:
            self._lock.release()
