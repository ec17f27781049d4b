"""Over-the-air update of the firmware files: download, verify, install,
switch, and the health check that keeps or rolls back a new version.

The server's ``cmd`` ``{"v": 1, "cmd": "ota", "url": "http://host:port/b/",
"version": "X.Y.Z"}`` names a bundle (``manifest.json`` and ``files/...``,
built and signed by ``evse-ota build``). The :class:`Updater`:

1. waits while a car is charging (state C): an update never starts then;
2. downloads on a thread of its own, in chunks of 1 KB with a 5 s timeout
   on every socket call, so the control loop never waits on it (C4);
3. verifies the manifest's RSA signature against ``ota_key.json`` stored on
   the charger, refuses anything not newer than the running version, and
   checks the size and SHA-256 of every file as it streams in;
4. writes the files into the OTA slot that is not running, then switches
   with one atomic write (:func:`firmware.ota.boot.switch`) and asks for a
   reboot, which the control loop performs when no car is charging.

Nothing is switched unless every check passed. Only ``firmware/`` files are
installed; ``boot.py`` and ``main.py`` (which hold the rollback) are never
replaced over the air.

:class:`Health` then keeps the new version only once it has reached the
server (a valid setpoint applied) and run ``health_s`` seconds; a version
that has not managed that within 5 x ``health_s`` reboots, and the next boot
rolls back (:func:`firmware.ota.boot.select`).
"""
import _thread

from firmware.ota import boot as otaboot
from firmware.ota import semver
from firmware.core import atomicfile

# ota_verify (RSA, SHA-256, the manifest parser) is imported on the update's
# own thread when it runs, never at boot nor in the control thread.

CHUNK = 1024
"""Download chunk, bytes: each is one allocation, and on a 48 KB heap a
fragmented heap may not hold a 4 KB block (issue 12)."""
TIMEOUT_S = 5
"""Bound on every socket call of a download, s."""
MAX_MANIFEST = 16384

IDLE = "idle"
DEFERRED = "deferred"
RUNNING = "running"
SWITCHED = "switched"
FAILED = "failed"


def _parse_url(url):
    if type(url) is not str or not url.startswith("http://") or len(url) > 200:
        raise ValueError("url must be http://host[:port]/path")
    rest = url[7:]
    host, _, path = rest.partition("/")
    name, _, port = host.partition(":")
    if not name or (port and not port.isdigit()):
        raise ValueError("bad host in url")
    return name, int(port) if port else 80, "/" + path


_LINE_MAX = 256
"""Longest HTTP status or header line accepted, bytes."""
_HEADERS_MAX = 32
"""Most header lines accepted."""
DEADLINE_S = 60
"""Bound on one whole request, s: a server that sends a byte every few
seconds must not hold the download (and every later update) for ever."""


def _line(s):
    line = s.readline(_LINE_MAX)
    if not line:
        raise ValueError("no HTTP header")
    if not line.endswith(b"\n"):
        raise ValueError("HTTP header line longer than %d bytes" % _LINE_MAX)
    return line


def http_get(url, start=None, end=None, limit=MAX_MANIFEST, timeout_s=TIMEOUT_S, sockmod=None,
             clock=None):
    """GET ``url`` (bytes ``start``..``end`` inclusive when given); return the
    body (bytes or bytearray). Every socket call is bounded by ``timeout_s``
    and the whole request by :data:`DEADLINE_S`; raises OSError or ValueError
    on any failure: a status other than 200 (206 for a range), a header line
    over 256 bytes or more than 32 of them, a missing, repeated, negative or
    unparsable ``Content-Length``, a body over ``limit`` bytes or not the
    range asked for, and a body that ends short.

    The body is read into one buffer of the size the server announces,
    never grown piece by piece: on a 48 KB heap the copies of a growing
    ``bytes`` fragment it until a 3 KB chunk no longer fits (issue 12).
    ``sockmod`` and ``clock`` replace ``socket`` and ``time`` in tests."""
    if sockmod is None:
        import socket as sockmod
    if clock is None:
        import time as clock
    host, port, path = _parse_url(url)
    deadline = clock.ticks_add(clock.ticks_ms(), DEADLINE_S * 1000)

    def check_deadline():
        if clock.ticks_diff(deadline, clock.ticks_ms()) <= 0:
            raise OSError(110, "download took more than %d s" % DEADLINE_S)

    s = sockmod.socket()
    try:
        s.settimeout(timeout_s)
        s.connect(sockmod.getaddrinfo(host, port)[0][-1])
        head = "GET %s HTTP/1.0\r\nHost: %s\r\n" % (path, host)
        if start is not None:
            head += "Range: bytes=%d-%d\r\n" % (start, end)
        s.write((head + "\r\n").encode())
        status = _line(s).split()
        want = b"200" if start is None else b"206"
        if len(status) < 2 or status[1] != want:
            raise ValueError("HTTP status %s (expected %s)" % ((status[1:2] or [b"?"])[0].decode(),
                                                              want.decode()))
        length = None
        for _ in range(_HEADERS_MAX):
            check_deadline()
            line = _line(s)
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                value = value.strip()
                if length is not None or not value.isdigit():
                    raise ValueError("bad or repeated Content-Length")
                length = int(value)
        else:
            raise ValueError("more than %d HTTP header lines" % _HEADERS_MAX)
        if length is None:
            raise ValueError("no Content-Length")
        if length > limit:
            raise ValueError("response longer than %d bytes" % limit)
        if start is not None and length != end - start + 1:
            raise ValueError("range of %d bytes answered with %d" % (end - start + 1, length))
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            check_deadline()
            n = s.readinto(view[got:])
            if not n:
                raise ValueError("response ended at %d of %d bytes" % (got, length))
            got += n
    finally:
        s.close()
    return body


def _wipe(fs, path):
    if not fs.isdir(path):
        return
    for name in fs.listdir(path):
        sub = path + "/" + name
        if fs.isdir(sub):
            _wipe(fs, sub)
        else:
            fs.remove(sub)
    fs.rmdir(path)


def _makedirs(fs, path):
    built = "/" if path.startswith("/") else ""
    for part in path.split("/"):
        if not part:
            continue
        built = built + part if built in ("", "/") else built + "/" + part
        if not fs.isdir(built):
            fs.mkdir(built)


def install(root, manifest, fetch, current, key, fs=atomicfile.FS, progress=None):
    """Verify and install a bundle, then switch to it. Returns the new
    version. ``manifest``: the manifest's bytes; ``fetch(path, start, end)``:
    bytes of one file; ``current``: the running version; ``key``: (n, e).
    Raises ValueError (refused: bad signature, not newer, a hash or size
    mismatch) or OSError (download or flash failure); either way nothing is
    switched and the running slot is untouched. Runs on the update's thread."""
    from firmware.ota import verify as ota_verify
    body = ota_verify.verify_manifest(manifest, key)
    manifest = None          # a 48 KB heap needs its bytes back for the download
    if not semver.is_upgrade(body["version"], current):
        raise ValueError("version %s is not newer than %s" % (body["version"], current))
    state = otaboot.read_state(root, fs)
    if state["pending"]:
        # The running slot is on trial and the other one is its way back:
        # neither may be touched until the trial ends.
        raise ValueError("version %s is still on trial: try again once it is kept" % state["version"])
    slot = otaboot.inactive(state)
    base = otaboot.join(root, "ota", slot)
    marker = otaboot.join(base, otaboot.MARK)
    if fs.isdir(base) and atomicfile.read_text(marker, fs, 64) is not None:
        fs.remove(marker)            # first: a half-wiped slot is never "complete"
    _wipe(fs, base)
    files = [f for f in body["files"] if f["path"].startswith("firmware/")]
    if not files:
        raise ValueError("bundle has no firmware files")
    for i, entry in enumerate(files):
        path = otaboot.join(base, entry["path"])
        _makedirs(fs, path.rsplit("/", 1)[0])
        check = ota_verify.FileCheck(entry["size"], entry["sha256"])
        f = fs.open(path + ".part", "wb")
        try:
            pos = 0
            while pos < entry["size"]:
                chunk = fetch(entry["path"], pos, min(pos + CHUNK, entry["size"]) - 1)
                if not chunk:
                    raise ValueError("%s: download ended at %d bytes" % (entry["path"], pos))
                check.update(chunk)
                f.write(chunk)
                pos += len(chunk)
        finally:
            f.close()
        check.finish()
        fs.rename(path + ".part", path)
        if progress:
            progress(i + 1, len(files))
    atomicfile.write_atomic(marker, body["version"], fs)
    otaboot.switch(root, slot, body["version"], fs)
    return body["version"]


class Updater:
    """Runs one update at a time for the control loop. ``root``: device root;
    ``current``: the running version. The control loop calls :meth:`request`
    with a ``cmd: ota`` and :meth:`poll` every tick with the EVSE state;
    ``status`` tells where it is (``idle``, ``deferred``, ``running``,
    ``switched``, ``failed``), ``detail`` why. :meth:`poll` returns True once a
    new version is switched in and no car is charging: time to reboot."""

    def __init__(self, root, current, fs=atomicfile.FS, fetcher=None, spawn=None):
        self.root = root
        self.current = current
        self.fs = fs
        self.fetcher = fetcher or http_get
        self.spawn = spawn or _thread.start_new_thread   # tests make a thread start fail
        self.status = IDLE
        self.detail = ""
        self._request = None

    def request(self, url, version):
        """Take an ``ota`` command. Raises ValueError for a bad url or version,
        or while an update runs."""
        _parse_url(url)
        semver.parse_version(version)
        if self.status in (RUNNING, SWITCHED):
            raise ValueError("an update is already %s" % self.status)
        if otaboot.read_state(self.root, self.fs)["pending"]:
            raise ValueError("the running version is still on trial: try again once it is kept")
        if not semver.is_upgrade(version, self.current):
            raise ValueError("version %s is not newer than %s" % (version, self.current))
        self._request = (url if url.endswith("/") else url + "/", version)
        self.status = DEFERRED
        self.detail = "waiting until no car is charging"

    def poll(self, evse_state):
        """Start a deferred update once the EVSE is not in state C; report
        True when a switched update may reboot now (not in state C)."""
        charging = evse_state in ("C", "D")
        if self.status == DEFERRED and not charging and self._request is not None:
            # A thread that cannot start (no memory) raises here and leaves the
            # update deferred: the control loop's edge boundary retries it.
            req = self._request
            self.status = RUNNING
            self.detail = "downloading"
            try:
                self.spawn(self._run, (req,))
            except BaseException:
                self.status = DEFERRED
                self.detail = "waiting: the download thread did not start"
                raise
            self._request = None
        return self.status == SWITCHED and not charging

    def _run(self, req):
        url, _version = req
        try:
            from firmware.ota import verify as ota_verify
            key = ota_verify.load_key(atomicfile.read_text(otaboot.join(self.root, "ota_key.json"), self.fs, 4096) or "")

            def fetch(path, start, end):
                return self.fetcher(url + "files/" + path, start, end, CHUNK)

            def progress(done, total):
                self.detail = "installed %d of %d files" % (done, total)

            # The manifest is handed over unnamed: install() lets it go once
            # verified, so its bytes are not held through the download.
            version = install(self.root, self.fetcher(url + "manifest.json"), fetch, self.current,
                              key, self.fs, progress)
            self.detail = "version %s switched in, reboot pending" % version
            self.status = SWITCHED
        except Exception as exc:  # refused or failed: nothing was switched
            self.detail = "%s: %s" % (type(exc).__name__, exc)
            self.status = FAILED


class Health:
    """Keeps a freshly switched version (see the module text). ``clock``
    gives ticks; ``health_s``: how long it must run healthy once it has
    reached the server."""

    def __init__(self, root, clock, health_s, fs=atomicfile.FS):
        self.root = root
        self.clock = clock
        self.health_s = health_s
        self.fs = fs
        self.pending = otaboot.read_state(root, fs)["pending"]
        self._since = clock.ticks_ms()
        self._healthy_since = None
        self.confirmed = False

    def step(self, reached_server, healthy):
        """Call every tick: ``reached_server`` (a valid setpoint applied) and
        ``healthy`` (no fault). Returns ``"confirmed"`` when the version is
        kept now, ``"reboot"`` when it failed to prove itself in time, else
        None."""
        if not self.pending or self.confirmed:
            return None
        now = self.clock.ticks_ms()
        if reached_server and healthy:
            if self._healthy_since is None:
                self._healthy_since = now
            elif self.clock.ticks_diff(now, self._healthy_since) >= self.health_s * 1000:
                otaboot.confirm(self.root, self.fs)
                self.confirmed = True
                return "confirmed"
        else:
            self._healthy_since = None
        if self.clock.ticks_diff(now, self._since) >= 5 * self.health_s * 1000:
            return "reboot"
        return None
