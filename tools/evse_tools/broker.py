"""Start and control MQTT brokers for the tests and the simulator (CPython only).

Kinds of broker
---------------
``start_mosquitto()``
    A real mosquitto (>= 2.0) subprocess with a generated config: one listener
    on 127.0.0.1 at a free port, anonymous clients allowed, no persistence and
    a log file in its working directory. The tests use this one.
``start_embedded()``
    amqtt (PyPI ``amqtt``, pure Python) in its own Python subprocess
    (``python -m evse_tools.broker --embedded --port N``): TCP on 127.0.0.1
    only, anonymous clients allowed, no websockets, no ``$SYS`` topics. It is
    the fallback of ``make sim`` on a machine without mosquitto. Stock amqtt
    0.12.1 passes the umqtt.simple and paho checks of tests/host/test_broker.py
    but deviates from MQTT 3.1.1 in three ways that matter here; the runner
    fixes all three (see :func:`_serve_embedded`; ``fixes=False`` runs stock):

    - keep-alive is never enforced: a client that goes silent without closing
      its socket stays "connected" forever and its last will never comes out.
      Fixed: the connection is closed after 1.5 x keep-alive of silence;
    - a client that reconnects with the same client id while its old
      connection is still open (a half-open socket after a WiFi drop) leaves
      the old connection running; its last will comes out whenever that
      socket finally closes and overwrites the retained ``online = "1"`` of
      the new connection. With ``clean_session=False`` the new connection is
      even closed and the retained flag ends "0". Fixed: the old connection
      is taken over like mosquitto 2.0 does it: its will is published at
      once, before the new CONNACK (not when both keep their session), and
      its socket is closed;
    - on every CONNECT, a client is sent the retained messages matching any
      filter that any client subscribed, before it subscribed to anything
      (a charger got every other charger's retained state). Fixed: retained
      messages go out only for the client's own new subscription, at the
      lower of the two QoS.

    Known and left alone: a message is forwarded at the subscriber's QoS even
    when it was published at a lower one (a QoS 1 subscriber gets QoS 0
    publishes as QoS 1, which umqtt.simple acknowledges); a will is also
    forwarded at its own QoS.
``default_broker(url)``
    ``"mqtt://host:port"`` -> a handle on that external broker (no process);
    ``None`` -> mosquitto when it is installed (:func:`mosquitto_path`), else
    the embedded amqtt broker.
``SilentBroker()``
    A TCP listener that accepts, reads and discards everything and never
    answers: a broker that never sends CONNACK, for watchdog tests.

Every started broker is a :class:`Broker`: ``.host``, ``.port``, ``.url``,
``.stop()`` (SIGTERM, graceful), ``.kill()`` (SIGKILL, like ``kill -9``),
``.start()`` / ``.restart()`` (same port again), ``.wait_ready(timeout_s)`` and
use as a context manager. Processes do not leak: ``__exit__``, an ``atexit``
hook and, on Linux, a parent-death signal (the broker gets SIGTERM when the
thread that started it exits, so start brokers from a long-lived thread, such
as the main one) all stop them.

All times are in seconds (s).
"""
from __future__ import annotations

import argparse
import atexit
import getpass
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, cast
from urllib.parse import urlsplit

LOCALHOST = "127.0.0.1"
DEFAULT_MQTT_PORT = 1883
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_PROBE_INTERVAL_S = 0.02

# Brokers with a process running or a temporary directory to remove; the
# atexit hook closes them all.
_LIVE: set["Broker"] = set()
_LIVE_LOCK = threading.Lock()

# Runs before the broker binary is executed: asks Linux to send SIGTERM to the
# broker when its parent (the thread that started it) exits, then exec()s the
# broker in the same process, so the pid stays the broker's own. argv[1] is the
# parent's pid, to catch a parent that died before prctl() took effect.
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class BrokerError(RuntimeError):
    """A broker could not be started, found or controlled."""


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on ``host`` that is free now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary: ``PATH`` first, then /usr/sbin/mosquitto.
    None when neither exists."""
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = "/usr/sbin/mosquitto"
    if os.path.isfile(fallback) and os.access(fallback, os.X_OK):
        return fallback
    return None


def _listens(pid: int, port: int) -> bool:
    """True when process ``pid`` owns a listening TCP socket on ``port``, so a
    TCP probe reached the broker and not another process on that port.
    Linux only (``/proc``); elsewhere always True."""
    try:
        fd_dir = Path(f"/proc/{pid}/fd")
        inodes = set()
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return not sys.platform.startswith("linux")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            # local address "ADDR:PORT" (hex), state 0A = LISTEN, inode
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                return True
    return False


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(no log file)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    got = text.splitlines()[-lines:]
    return "\n".join(got) if got else f"({path} is empty)"


class Broker:
    """One MQTT broker: a subprocess started by this module, or an external one.

    ``argv`` is the command that runs the broker; it must listen on
    ``host:port``. ``argv=None`` makes a handle on an external broker that this
    process did not start: :meth:`wait_ready` works, while :meth:`start`,
    :meth:`stop`, :meth:`kill` and :meth:`restart` raise :class:`BrokerError`.

    ``kind`` is ``"mosquitto"``, ``"amqtt"`` or ``"external"``. ``log_path``
    holds the broker's log (its stdout and stderr go to ``log_path`` with a
    ``.out`` suffix added, when it has its own log file). ``owned_dir`` is a
    directory removed by :meth:`close`.
    """

    def __init__(self, host: str, port: int, *, kind: str, argv: list[str] | None = None,
                 workdir: Path | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, owned_dir: Path | None = None,
                 own_log: bool = True):
        self.host = host
        self.port = int(port)
        self.kind = kind
        self.argv = list(argv) if argv is not None else None
        self.workdir = workdir
        self.log_path = log_path
        self.out_path = (log_path.with_name(log_path.name + ".out")
                         if log_path is not None and own_log else log_path)
        self._env = env
        self._owned_dir = owned_dir
        self.proc: subprocess.Popen | None = None
        self._out: IO[bytes] | None = None

    # -- properties ----------------------------------------------------------
    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def managed(self) -> bool:
        """True when this module runs the broker process (not an external one)."""
        return self.argv is not None

    @property
    def pid(self) -> int | None:
        """Pid of the running broker process, else None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive (never for external brokers)."""
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        state = "external" if not self.managed else ("running" if self.running else "stopped")
        return f"<Broker {self.kind} {self.url} {state}>"

    # -- lifecycle ------------------------------------------------------------
    def _require_managed(self, what: str) -> None:
        if not self.managed:
            raise BrokerError(f"{what}: the broker at {self.url} is external (not started by "
                              f"evse_tools.broker), so this process cannot control it")

    def start(self, timeout: float = READY_TIMEOUT_S) -> "Broker":
        """Start the broker process on :attr:`port` and wait until it accepts TCP
        (at most ``timeout`` s). Raises :class:`BrokerError` if it is already
        running, exits, or does not listen in time (with the tail of its log)."""
        self._require_managed("start()")
        assert self.argv is not None
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError(f"start(): the {self.kind} broker at {self.url} is already "
                              f"running (pid {self.proc.pid}); use restart()")
        self._close_out()
        argv = self.argv
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
        self._out = open(self.out_path, "ab") if self.out_path else None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=self._out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, env=self._env,
                                         cwd=self.workdir, start_new_session=True)
        except OSError as exc:
            self._close_out()
            raise BrokerError(f"cannot run the {self.kind} broker ({self.argv[0]}): {exc}") from exc
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "Broker":
        """Connect a TCP probe to ``host:port`` until it is accepted, for at most
        ``timeout`` s. For a managed broker, fail at once if its process exits.
        Raises :class:`BrokerError` on failure (with the tail of the log)."""
        deadline = time.monotonic() + timeout
        last_error: OSError | None = None
        proc = self.proc
        while True:
            if self.managed:
                if proc is None:
                    raise BrokerError(f"wait_ready(): the {self.kind} broker at {self.url} "
                                      f"was never started; call start()")
                code = proc.poll()
                if code is not None:
                    raise BrokerError(self._failure(f"exited with status {code} before it "
                                                    f"listened on {self.host}:{self.port}"))
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if proc is None or _listens(proc.pid, self.port):
                    return self
                # Another process holds the port: ours should exit soon.
                last_error = OSError(f"port {self.port} is held by another process")
            except OSError as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise BrokerError(self._failure(f"does not accept TCP on {self.host}:{self.port} "
                                                f"after {timeout:.1f} s ({last_error})"))
            time.sleep(_PROBE_INTERVAL_S)

    def _failure(self, what: str) -> str:
        msg = f"the {self.kind} broker at {self.url} {what}"
        if self.managed:
            msg += f"\ncommand: {' '.join(self.argv or [])}"
            shown = False
            for path in dict.fromkeys((self.log_path, self.out_path)):
                if path is not None and path.exists() and path.stat().st_size:
                    msg += f"\nlast lines of {path}:\n{_tail(path)}"
                    shown = True
            if not shown:
                msg += "\n(the broker wrote no log)"
        return msg

    def _port_in_use(self) -> bool:
        """True when the broker's output says its port was taken."""
        return any(path is not None and path.exists()
                   and "address already in use" in _tail(path, 5).lower()
                   for path in (self.log_path, self.out_path))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the broker gracefully: SIGTERM, then SIGKILL if it is still alive
        after ``timeout`` s. Returns the exit status (None if it was not
        running). Clients see their connection closed."""
        self._require_managed("stop()")
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._reaped()

    def kill(self) -> int | None:
        """Kill the broker at once with SIGKILL (like ``kill -9``): no clean
        shutdown, clients are not told. Returns the exit status."""
        self._require_managed("kill()")
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self._reaped()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> "Broker":
        """Stop the broker if it runs, then start it again on the same port."""
        self._require_managed("restart()")
        if self.running:
            self.stop()
        return self.start(timeout)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the broker (if managed and running; SIGKILL after ``timeout``
        s) and remove its temporary working directory when this module
        created it. Safe to call twice."""
        if self.managed and self.proc is not None:
            self.stop(timeout)
        self._close_out()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the broker's log."""
        return _tail(self.log_path, lines)

    def _reaped(self) -> int | None:
        if self._owned_dir is None:
            with _LIVE_LOCK:
                _LIVE.discard(self)
        self._close_out()
        return self.proc.returncode if self.proc is not None else None

    def _own(self, directory: Path | None) -> None:
        """Remove ``directory`` on :meth:`close` (or at exit)."""
        self._owned_dir = directory
        if directory is not None:
            with _LIVE_LOCK:
                _LIVE.add(self)

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
        self._out = None

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for broker in live:
        try:
            broker.close(timeout=2.0)
        except Exception:   # at exit: best effort, never mask the real error
            pass


def _workdir(workdir: str | os.PathLike | None, prefix: str) -> tuple[Path, Path | None]:
    if workdir is None:
        d = Path(tempfile.mkdtemp(prefix=prefix))
        return d, d
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve(), None


def _start_with_retries(make, port: int | None, timeout: float) -> Broker:
    """Start ``make(port)``. With an automatic port, try up to twice more with
    another port when the chosen one was taken between the choice and the bind."""
    attempts = 1 if port else 3
    for attempt in range(attempts):
        broker = make(port or free_port())
        try:
            return broker.start(timeout)
        except BrokerError:
            broker.close()
            if attempt == attempts - 1 or not broker._port_in_use():
                raise
    raise AssertionError("unreachable")


# -- mosquitto ---------------------------------------------------------------
def _start_owned(make, port: int | None, timeout: float, owned: Path | None) -> Broker:
    """Start a broker with :func:`_start_with_retries`; the temporary
    directory ``owned`` (if any) goes with it, or is removed at once when the
    start fails."""
    try:
        broker = _start_with_retries(make, port, timeout)
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    broker._own(owned)
    return broker


def _conf_has(extra_conf: str, option: str) -> bool:
    return any(line.split()[:1] == [option] for line in extra_conf.splitlines())


def _harness_lines(workdir: Path, conf: str) -> list[str]:
    """Global options the harness needs, each left out when ``conf`` sets it:
    ``persistence false`` (or a ``persistence_location`` in ``workdir``), a
    log file ``workdir/mosquitto.log`` with connection messages, and, as
    root, ``user`` (the current one)."""
    lines = []
    if not _conf_has(conf, "persistence"):
        lines += ["persistence false"]
    elif not _conf_has(conf, "persistence_location"):
        lines += [f"persistence_location {workdir}/"]
    if not _conf_has(conf, "log_dest"):
        lines += [f"log_dest file {workdir / 'mosquitto.log'}"]
    if not _conf_has(conf, "log_type"):
        lines += ["log_type error", "log_type warning", "log_type notice", "log_type information"]
    if not _conf_has(conf, "connection_messages"):
        lines += ["connection_messages true"]
    if not _conf_has(conf, "log_timestamp_format"):
        lines += ["log_timestamp_format %Y-%m-%dT%H:%M:%S"]
    if os.geteuid() == 0 and not _conf_has(conf, "user"):
        # As root, mosquitto drops to the user "mosquitto", which cannot
        # write a private temporary workdir. Stay the current user.
        lines += [f"user {getpass.getuser()}"]
    return lines


def mosquitto_conf(port: int, workdir: Path, extra_conf: str = "") -> str:
    """The mosquitto config used by :func:`start_mosquitto`: a listener on
    127.0.0.1:``port``, then ``allow_anonymous true``, ``persistence false``
    and a log file ``workdir/mosquitto.log``, each left out when ``extra_conf``
    sets that option itself; then ``extra_conf``. A ``persistence true``
    without ``persistence_location`` stores in ``workdir``."""
    head, lines = [], []
    body = [line for line in extra_conf.splitlines()]
    # Global options that mosquitto wants before any listener.
    for line in list(body):
        if line.split()[:1] == ["per_listener_settings"]:
            head.append(line)
            body.remove(line)
    lines += head
    lines += [f"listener {port} {LOCALHOST}"]
    if not _conf_has(extra_conf, "allow_anonymous"):
        lines += ["allow_anonymous true"]
    lines += _harness_lines(workdir, extra_conf)
    lines += body
    return "\n".join(lines) + "\n"


def start_mosquitto(port: int | None = None, extra_conf: str = "",
                    workdir: str | os.PathLike | None = None,
                    timeout: float = READY_TIMEOUT_S) -> Broker:
    """Start mosquitto on 127.0.0.1:``port`` (a free port when None) and wait
    until it accepts TCP (at most ``timeout`` s).

    The config (:func:`mosquitto_conf`) is written to
    ``workdir/mosquitto.conf``, the log to ``workdir/mosquitto.log``.
    ``workdir=None`` uses a new temporary directory, removed by
    :meth:`Broker.close` (and so on leaving a ``with`` block).
    Raises :class:`BrokerError` (a RuntimeError) when mosquitto is not
    installed or fails to start, with the tail of its log.
    """
    exe = mosquitto_path()
    if exe is None:
        raise BrokerError("mosquitto is not installed (not on PATH and no /usr/sbin/mosquitto); "
                          "install it, e.g. `apt-get install -y mosquitto`, or use "
                          "start_embedded()")
    wd, owned = _workdir(workdir, "evse-mosquitto-")

    def make(p: int) -> Broker:
        conf = wd / "mosquitto.conf"
        conf.write_text(mosquitto_conf(p, wd, extra_conf))
        log = wd / "mosquitto.log"
        return Broker(LOCALHOST, p, kind="mosquitto", argv=[exe, "-c", str(conf)],
                      workdir=wd, log_path=log)

    return _start_owned(make, port, timeout, owned)


def start_mosquitto_conf(conf_for_port, port: int | None = None,
                         workdir: str | os.PathLike | None = None,
                         timeout: float = READY_TIMEOUT_S) -> Broker:
    """Start mosquitto on exactly the listeners of ``conf_for_port(port)`` (a
    config text for that port, e.g. ``evse-server broker-setup``'s) and wait
    until ``port`` accepts TCP. Only :func:`_harness_lines` are added, as
    global options after it: no listener of the harness's own. Otherwise as
    :func:`start_mosquitto`."""
    exe = mosquitto_path()
    if exe is None:
        raise BrokerError("mosquitto is not installed (not on PATH and no /usr/sbin/mosquitto); "
                          "install it, e.g. `apt-get install -y mosquitto`")
    wd, owned = _workdir(workdir, "evse-mosquitto-")

    def make(p: int) -> Broker:
        text = conf_for_port(p)
        conf = wd / "mosquitto.conf"
        conf.write_text(text + "\n".join(_harness_lines(wd, text)) + "\n")
        return Broker(LOCALHOST, p, kind="mosquitto", argv=[exe, "-c", str(conf)],
                      workdir=wd, log_path=wd / "mosquitto.log")

    return _start_owned(make, port, timeout, owned)


# -- embedded amqtt ------------------------------------------------------------
def amqtt_available() -> bool:
    """True when the amqtt package can be imported by this Python."""
    import importlib.util
    return importlib.util.find_spec("amqtt") is not None


def start_embedded(port: int | None = None, workdir: str | os.PathLike | None = None,
                   timeout: float = READY_TIMEOUT_S, fixes: bool = True) -> Broker:
    """Start the embedded amqtt broker on 127.0.0.1:``port`` (a free port when
    None) in its own Python process and wait until it accepts TCP (at most
    ``timeout`` s). Its log is ``workdir/amqtt.log``; ``workdir=None`` uses a
    temporary directory removed by :meth:`Broker.close`. Raises
    :class:`BrokerError` when amqtt is missing or the broker fails to start.
    ``fixes=False`` runs stock amqtt without this module's keep-alive and
    takeover fixes (to reproduce its deviations; never for real use).
    """
    if not amqtt_available():
        raise BrokerError(f"the embedded broker needs the Python package amqtt, which "
                          f"{sys.executable} cannot import; run `make venv` (it installs "
                          f"requirements-dev.txt) or install mosquitto")
    wd, owned = _workdir(workdir, "evse-amqtt-")
    tools_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tools_dir, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"

    def make(p: int) -> Broker:
        log = wd / "amqtt.log"
        argv = [sys.executable, "-m", "evse_tools.broker", "--embedded", "--host", LOCALHOST,
                "--port", str(p), "--log", str(log)] + ([] if fixes else ["--stock-amqtt"])
        return Broker(LOCALHOST, p, kind="amqtt", argv=argv, workdir=wd, log_path=log, env=env,
                      own_log=False)

    return _start_owned(make, port, timeout, owned)


def _drop_connection(handler) -> None:
    """Close a client's connection now (amqtt handler), without a goodbye: the
    broker's reader sees EOF and treats it as an abnormal disconnect."""
    writer = getattr(handler, "writer", None)
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is not None:
        transport.abort()
    reader = getattr(handler, "reader", None)
    if reader is not None and hasattr(reader, "feed_eof"):
        reader.feed_eof()


def _serve_embedded(host: str, port: int, log_path: str | None, fixes: bool = True) -> int:
    """Run amqtt on ``host:port`` until SIGTERM or SIGINT (runs in the child
    process started by :func:`start_embedded`). ``fixes=False`` runs stock
    amqtt, to reproduce its deviations."""
    import asyncio
    import contextvars
    import logging

    logging.basicConfig(
        level=logging.INFO, filename=log_path,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S")

    class _QuietProbes(logging.Filter):
        # wait_ready()'s TCP probe connects and closes without a CONNECT.
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(("No data from", "Failed to initialize client"))

    logging.getLogger("amqtt.broker").addFilter(_QuietProbes())
    logging.getLogger("transitions").setLevel(logging.WARNING)
    log = logging.getLogger("evse_tools.broker")

    import amqtt
    from amqtt.broker import Broker as AmqttBroker
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    # The fixes below hook amqtt internals, checked against amqtt 0.12.1 by
    # tests/host/test_broker.py; rerun those tests when amqtt changes.
    version = getattr(amqtt, "__version__", "?")
    if fixes and version != "0.12.1":
        log.warning("amqtt %s: the compatibility fixes were written for 0.12.1", version)

    # True while this task handles a SUBSCRIBE (see below).
    in_subscribe = contextvars.ContextVar("in_subscribe", default=False)
    # The session parsed from the CONNECT this task handles.
    incoming = contextvars.ContextVar("incoming", default=None)
    running: list = []      # the broker, for the CONNECT hook
    stock_init_from_connect = BrokerProtocolHandler.init_from_connect.__func__

    async def init_from_connect(cls, *args, **kwargs):
        handler, session = await stock_init_from_connect(cls, *args, **kwargs)
        incoming.set(session)
        if running and session.client_id:
            await running[0].take_over(session.client_id, session.clean_session)
        return handler, session

    class CompatBroker(AmqttBroker):
        """amqtt with keep-alive enforcement, a mosquitto-like takeover (clean
        or kept session) and retained messages sent only for the client's own
        new subscriptions."""

        async def _handle_subscription(self, *args, **kwargs):
            token = in_subscribe.set(True)
            try:
                return await super()._handle_subscription(*args, **kwargs)
            finally:
                in_subscribe.reset(token)

        async def _publish_retained_messages_for_subscription(self, subscription, session):
            # Stock amqtt also calls this on every CONNECT, for every filter
            # that any client subscribed, so a new client got other clients'
            # retained messages unasked. MQTT 3.1.1 sends retained messages
            # only for a new subscription, at min(subscription, message) QoS.
            if not in_subscribe.get():
                return
            topic_filter, qos = subscription
            handler = self._get_handler(session)
            if handler is None:
                return
            tasks = [asyncio.ensure_future(handler.mqtt_publish(
                         msg.topic, msg.data, min(qos, msg.qos or 0), retain=True))
                     for topic, msg in list(self._retained_messages.items())
                     if self._matches(topic, topic_filter)]
            if tasks:
                await asyncio.wait(tasks)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            running.append(self)

        async def _initialize_client_session(self, *args, **kwargs):
            handler, session = await super()._initialize_client_session(*args, **kwargs)
            new = incoming.get()
            if new is not None and new is not session:
                # A kept session took the new connection's will but not its
                # retain flag.
                session.will_retain = new.will_retain
            if session.keep_alive > 0:
                # MQTT-3.1.2-24: disconnect after 1.5 x keep-alive of silence.
                session.keep_alive = (3 * session.keep_alive + 1) // 2
            return handler, session

        async def take_over(self, client_id: str, clean: bool) -> None:
            """A CONNECT came for ``client_id`` (``clean``: its clean-session
            flag). If the old connection is still open, take it over like
            mosquitto 2.0: publish the old will now, before the new CONNACK,
            unless both connections keep their session; close the old socket
            and wait until the old connection is marked disconnected, so that
            nothing from it comes out later and a kept session is free for
            the new connection."""
            session, handler = self._sessions.get(client_id, (None, None))
            if session is None or handler is None or not session.transitions.is_connected():
                return
            log.info("client %s already connected, taking over its connection", client_id)
            if session.will_flag and (clean or session.clean_session):
                await self._broadcast_message(session, session.will_topic,
                                              session.will_message, session.will_qos)
                if session.will_retain:
                    await self.retain_message(session, session.will_topic,
                                              session.will_message, session.will_qos)
            session.will_flag = False      # the old connection ends without a will
            _drop_connection(handler)
            deadline = time.monotonic() + 2.0
            while session.transitions.is_connected() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    def _keepalive_expired(self) -> None:
        log.info("client %s silent for 1.5 x keep-alive, closing its connection",
                 getattr(self.session, "client_id", "?"))
        _drop_connection(self)

    if fixes:
        BrokerProtocolHandler.handle_read_timeout = _keepalive_expired
        setattr(BrokerProtocolHandler, "init_from_connect", classmethod(init_from_connect))
        broker_cls = CompatBroker
    else:
        broker_cls = AmqttBroker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: no $SYS plugin, no packet logger, no topic ACL.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = broker_cls(config)
        try:
            await broker.start()
        except Exception as exc:
            log.error("cannot start amqtt on %s:%s: %s", host, port, exc)
            print(f"error: cannot start amqtt on {host}:{port}: {exc}", file=sys.stderr)
            return 2
        log.info("amqtt listening on %s:%s (pid %d, fixes %s)", host, port, os.getpid(),
                 "on" if fixes else "off")
        await stop.wait()
        log.info("stopping")
        try:
            await asyncio.wait_for(broker.shutdown(), STOP_TIMEOUT_S - 1)
        except Exception as exc:   # a stuck shutdown must not hang stop()
            log.warning("shutdown did not finish cleanly: %r", exc)
        return 0

    return asyncio.run(main())


# -- silent broker --------------------------------------------------------------
class SilentBroker:
    """A TCP listener on 127.0.0.1 that accepts connections, reads and discards
    everything and never answers: a broker that never sends CONNACK.

    It listens as soon as it is created (``port=None`` picks a free port) and
    serves from one daemon thread. :attr:`accepted` counts the connections,
    :attr:`bytes_received` the bytes read. :meth:`stop` closes the listener
    and every connection (clients then see EOF); also on leaving a ``with``.
    """

    kind = "silent"

    def __init__(self, port: int | None = None, host: str = LOCALHOST):
        self.host = host
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._lsock.bind((host, port or 0))
        except OSError as exc:
            self._lsock.close()
            raise BrokerError(f"SilentBroker cannot listen on {host}:{port}: {exc}") from exc
        self._lsock.listen(16)
        self._lsock.setblocking(False)
        self.port = self._lsock.getsockname()[1]
        self.accepted = 0
        self.bytes_received = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"SilentBroker:{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the listener thread serves."""
        return self._thread.is_alive()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        conns: list[socket.socket] = []
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    if key.data == "listen":
                        try:
                            conn, _addr = self._lsock.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        conn.setblocking(False)
                        conns.append(conn)
                        self.accepted += 1
                        sel.register(conn, selectors.EVENT_READ, "conn")
                        continue
                    conn = cast(socket.socket, key.fileobj)
                    try:
                        data = conn.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.bytes_received += len(data)
                    else:   # the client closed: forget it
                        sel.unregister(conn)
                        conns.remove(conn)
                        conn.close()
        finally:
            for conn in conns:
                conn.close()
            sel.close()
            self._lsock.close()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the listener and all connections; wait at most ``timeout`` s
        for the thread. Safe to call twice."""
        if not self._stopping:
            self._stopping = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BrokerError(f"SilentBroker on port {self.port} did not stop within {timeout} s")
        self._wake_r.close()
        self._wake_w.close()

    close = stop

    def __enter__(self) -> "SilentBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SilentBroker {self.url} {'running' if self.running else 'stopped'}>"


# -- default ------------------------------------------------------------------------
def parse_mqtt_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` -> (host, port); the port defaults to 1883.
    Raises ValueError with a clear message for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"broker URL must be just mqtt://host:port, got {url!r}")
    try:
        port = parts.port or DEFAULT_MQTT_PORT
    except ValueError as exc:
        raise ValueError(f"bad port in broker URL {url!r}") from exc
    return parts.hostname, port


def default_broker(url: str | None = None) -> Broker:
    """The broker for the simulator.

    Order:
      1. ``url`` given (``mqtt://host:port``, port 1883 when left out): a handle
         on that external broker. No process is started and none is probed
         (call :meth:`Broker.wait_ready` to check it); stop/kill raise.
      2. mosquitto installed (:func:`mosquitto_path`): :func:`start_mosquitto`.
      3. otherwise: the embedded amqtt broker, :func:`start_embedded`.
    """
    if url:
        host, port = parse_mqtt_url(url)
        return Broker(host, port, kind="external")
    if mosquitto_path() is not None:
        return start_mosquitto()
    return start_embedded()


# -- command line (the embedded broker's child process) -------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evse_tools.broker",
        description="Run the embedded amqtt MQTT broker (TCP only, anonymous) until SIGTERM.")
    ap.add_argument("--embedded", action="store_true", required=True,
                    help="run the embedded amqtt broker (the only mode)")
    ap.add_argument("--host", default=LOCALHOST, help="address to listen on (default %(default)s)")
    ap.add_argument("--port", type=int, default=DEFAULT_MQTT_PORT,
                    help="TCP port (default %(default)s)")
    ap.add_argument("--log", help="log file (default: stderr)")
    ap.add_argument("--stock-amqtt", action="store_true",
                    help="run amqtt without this module's keep-alive and takeover fixes")
    args = ap.parse_args(argv)
    return _serve_embedded(args.host, args.port, args.log, fixes=not args.stock_amqtt)


if __name__ == "__main__":
    sys.exit(main())
