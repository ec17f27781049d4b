"""Fakes for the firmware logic tests. They hold state, not behaviour.

Shared by both runtimes: CPython (pytest) and the MicroPython unix port
(tests/mpy_run.py), so only the subset of Python both understand is used.
"""

PERIOD = 1 << 30
"""ESP32 ``ticks_ms`` period (DESIGN.md §6, C6): 2^30 ms, about 12.4 days."""
_HALF = PERIOD // 2


class FakeClock:
    """An injected ``time``-like clock with the ESP32 tick period.

    ``ticks_ms()`` returns the current tick; ``advance(ms)`` moves it.
    The default start is 5 s before the wrap, as C6 asks of host tests.
    The arithmetic stays within MicroPython's 31-bit small ints, as the
    ESP32's own ``ticks_diff``/``ticks_add`` do: the clock allocates nothing,
    so allocation measurements see only the firmware. ``|delta|`` and
    differences are below 2^29 ms, as on the device."""

    def __init__(self, start=PERIOD - 5000):
        self.now = start % PERIOD
        self.slept = 0

    def ticks_ms(self):
        return self.now

    def ticks_add(self, t, delta):
        u = t - _HALF + delta          # in (-2^30, 2^30): a small int
        if u >= _HALF:
            return u - _HALF
        if u < -_HALF:
            return u + _HALF + _HALF + _HALF
        return u + _HALF

    def ticks_diff(self, a, b):
        d = a - b
        if d >= _HALF:
            return d - _HALF - _HALF
        if d < -_HALF:
            return d + _HALF + _HALF
        return d

    def advance(self, ms):
        while ms > _HALF // 2:         # large jumps in steps the arithmetic can take
            self.now = self.ticks_add(self.now, _HALF // 2)
            ms -= _HALF // 2
        self.now = self.ticks_add(self.now, ms)

    def sleep_ms(self, ms):
        self.slept += ms
        self.advance(ms)


class PowerCut(Exception):
    """Raised by :class:`CutFs` where the power fails."""


class _CutFile:
    def __init__(self, fs, path, mode):
        self.fs = fs
        self.path = path
        self.mode = mode
        if "w" in mode:
            fs.step("open")
            fs.files[path] = b"" if "b" in mode else ""
        elif path not in fs.files:
            raise OSError(2, "ENOENT")

    def write(self, text):
        # A write is two steps: half the data lands, then the rest.
        half = len(text) // 2
        self.fs.step("write-half")
        self.fs.files[self.path] += text[:half]
        self.fs.step("write-rest")
        self.fs.files[self.path] += text[half:]
        return len(text)

    def read(self, n=-1):
        text = self.fs.files[self.path]
        if "b" in self.mode and type(text) is str:
            text = text.encode()
        return text if n is None or n < 0 else text[:n]

    def close(self):
        if "w" in self.mode:
            self.fs.step("close")


class CutFs:
    """An in-memory filesystem that loses power at step number ``cut_at``
    (0-based count of mutating steps), raising :class:`PowerCut`. Whatever
    reached ``files`` before the cut stays, as on flash. ``steps`` lists the
    names of the steps that completed."""

    def __init__(self, files=None, cut_at=None, dirs=None):
        self.files = dict(files or {})
        self.dirs = set(dirs or ())
        self.cut_at = cut_at
        self.steps = []

    def step(self, name):
        if self.cut_at is not None and len(self.steps) == self.cut_at:
            raise PowerCut(name)
        self.steps.append(name)

    def open(self, path, mode):
        return _CutFile(self, path, mode)

    def rename(self, src, dst):
        self.step("rename")
        self.files[dst] = self.files.pop(src)

    def remove(self, path):
        self.step("remove")
        del self.files[path]

    def sync(self):
        self.step("sync")

    def mkdir(self, path):
        self.step("mkdir")
        self.dirs.add(path)

    def rmdir(self, path):
        self.step("rmdir")
        self.dirs.discard(path)

    def isdir(self, path):
        return path in self.dirs

    def listdir(self, path):
        names = set()
        for p in list(self.files) + list(self.dirs):
            if p.startswith(path + "/"):
                names.add(p[len(path) + 1:].split("/")[0])
        return sorted(names)


class FakeLink:
    """What :class:`firmware.net.bridge.ServerBridge` and
    :class:`firmware.net.watch.LinkWatch` see of the MQTT link: received
    ``(kind, payload)`` waiting in ``inbox``, state payloads offered in
    ``sent``, the status fields the bridge logs, and the link thread's
    ``running`` and ``beat`` (its heartbeat). ``fail`` (an exception, or None)
    is raised by every ``offer_state`` while set: a report that cannot be
    built or handed over. ``started`` and ``abandoned`` count what the watch
    did to it."""

    def __init__(self, running=True):
        self.inbox = []
        self.sent = []
        self.connected = True
        self.last_error = None
        self.last_connect_ms = None
        self.keepalive_s = 30
        self.running = running
        self.beat = 0
        self.fail = None
        self.started = 0
        self.abandoned = False

    def take(self):
        if not self.inbox:
            return ()             # as the real link: nothing waiting allocates nothing
        got = self.inbox
        self.inbox = []
        return got

    def offer_state(self, payload):
        if self.fail is not None:
            raise self.fail
        self.sent.append(payload)
        return True

    def start(self, spawn=None):
        if spawn is not None:
            spawn(None, ())
        self.started += 1
        self.running = True

    def abandon(self):
        self.abandoned = True


class FakeSpawn:
    """A thread starter (``_thread.start_new_thread``) that raises ``fail``
    (an exception, or None) instead of starting; ``calls`` counts the tries.
    Nothing runs: the fakes' state says what a thread would have done."""

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = 0

    def __call__(self, fn, args):
        self.calls += 1
        if self.fail is not None:
            raise self.fail


class FakeNet:
    """A ``socket`` module (and ``select.poll``) for the MQTT link's socket
    layer whose one peer is a script of broker bytes. Holds state only:
    ``inbound`` (bytearray the broker has sent and the client not yet read),
    ``sent`` (bytearray of everything the client wrote), ``addr`` (where it
    connected), ``closed``, ``chunk`` (most bytes one read returns: 1 makes
    every packet arrive in pieces). Reads with nothing queued return None, as
    a non-blocking MicroPython socket does; a poll waits its whole timeout on
    ``clock``; each read takes ``read_ms`` of it."""

    def __init__(self, clock, chunk=1, read_ms=0):
        self.clock = clock
        self.chunk = chunk
        self.read_ms = read_ms          # how long each read takes (a slow peer)
        self.inbound = bytearray()
        self.sent = bytearray()
        self.addr = None
        self.closed = 0
        self.sockets = 0

    def socket(self, *args):
        self.sockets += 1
        return _FakeSocket(self)

    def getaddrinfo(self, host, port, *args):
        return [(2, 1, 6, "", (host, port))]

    def poll(self):
        return _FakePoll(self.clock)


class _FakeSocket:
    def __init__(self, net):
        self.net = net

    def settimeout(self, t):
        pass

    def setsockopt(self, *args):
        pass

    def connect(self, addr):
        self.net.addr = addr

    def read(self, n):
        net = self.net
        net.clock.advance(net.read_ms)
        if not net.inbound:
            return None
        take = min(n, net.chunk, len(net.inbound))
        data = bytes(net.inbound[:take])
        net.inbound = net.inbound[take:]
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        if not data:
            return 0
        buf[:len(data)] = data
        return len(data)

    def readline(self, limit=-1):
        """Up to and including the next newline, at most ``limit`` bytes
        (b"" at the end of the data, as a closed socket gives)."""
        net = self.net
        net.clock.advance(net.read_ms)
        end = net.inbound.find(b"\n") + 1 or len(net.inbound)
        if 0 <= limit < end:
            end = limit
        data = bytes(net.inbound[:end])
        net.inbound = net.inbound[end:]
        return data

    def write(self, data):
        self.net.sent += bytes(data)
        return len(data)

    def close(self):
        self.net.closed += 1


class _FakePoll:
    def __init__(self, clock):
        self.clock = clock

    def register(self, sock, event=None):
        pass

    def modify(self, sock, event):
        pass

    def poll(self, ms=-1):
        self.clock.advance(ms if ms > 0 else 0)
        return []
