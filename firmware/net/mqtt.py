"""The charger's MQTT link: umqtt.simple, bounded, on its own thread (C4).

The control loop must never wait on the network (C4): a connect that never
gets a CONNACK, DNS that never answers or a blackholed TLS session must not
delay the watchdog fallback or a contactor opening. So the link runs on a
thread of its own and talks to the control loop only through a mailbox
guarded by a lock that is never held across a network call; the control loop
takes that lock without waiting (``acquire(0)``) and simply tries again next
tick. If the link thread hangs or dies, nothing stops the control loop: no
valid setpoint arrives, and the connectivity watchdog does its job.

umqtt.simple is wrapped, not modified (DESIGN.md §6):

* its module-level ``socket`` is replaced by :class:`_SocketModule`, whose
  sockets turn every "blocking" read, write and connect into one bounded by
  ``io_timeout_ms``; ``check_msg()``'s ``setblocking(True)`` can therefore no
  longer hang forever on the ESP32;
* every byte read goes through :class:`_Framer`, which follows the MQTT
  fixed headers, so the link knows when a PINGRESP arrived (umqtt.simple
  swallows it) and whether a PUBLISH carried the retain flag (umqtt.simple's
  callback does not say; retained ``set``/``cmd`` messages are ignored, §4);
* keepalive is always explicit (mosquitto >= 2.0.12 refuses 0), a PINGREQ goes
  out every keepalive/2, and a PINGRESP missing for a whole keepalive counts
  as a dead link; the reconnect backoff doubles from 1 s to 60 s;
* the state is published with QoS 0 (retained), so no publish waits for a
  PUBACK; the online flag is QoS 1 retained, with ``"0"`` as the last will.

A PINGRESP proves the link is alive, but it never feeds the connectivity
watchdog: only a valid setpoint does (C4).
"""
import select
import time

import _thread

_INBOX_MAX = 8
_NOTHING = ()
_IO_TIMEOUT_MS = 15000
"""Longest wait of one socket call, ms: the CONNACK, SUBACK and PUBACK waits
included. The fault suite measured 3 s to be too short for a lossy WiFi path
with 2 s latency (no connection got through); only the link thread waits."""
_KEEPALIVE_REFUSED_MAX_S = 60
"""Keepalive tried after a broker refused the connection as "identifier
rejected", s: mosquitto answers so to an MQTT 3.1.1 client asking for more
than its ``max_keepalive``. Each further refusal halves it, down to 10 s."""
_BACKOFF_MIN_MS = 1000
_BACKOFF_MAX_MS = 60000


class _Framer:
    """Follows MQTT packet boundaries in the received byte stream.

    ``publish_header`` is the fixed-header byte of the latest PUBLISH (bit 0 is
    the retain flag); ``pingresp`` counts PINGRESPs; ``rx_bytes`` counts bytes.
    """

    def __init__(self):
        self.publish_header = 0
        self.pingresp = 0
        self.rx_bytes = 0
        self._phase = 0       # 0: fixed header, 1: remaining length, 2: body
        self._header = 0
        self._left = 0
        self._shift = 0

    def feed(self, data):
        for b in data:
            self.rx_bytes += 1
            if self._phase == 0:
                self._header = b
                self._left = 0
                self._shift = 0
                self._phase = 1
                if b & 0xF0 == 0x30:
                    self.publish_header = b
            elif self._phase == 1:
                self._left |= (b & 0x7F) << self._shift
                self._shift += 7
                if not b & 0x80:
                    if self._left == 0:
                        self._packet_done()
                    else:
                        self._phase = 2
            else:
                self._left -= 1
                if self._left == 0:
                    self._packet_done()

    def _packet_done(self):
        if self._header == 0xD0:
            self.pingresp += 1
        self._phase = 0


class _BoundedSocket:
    """A socket for umqtt.simple whose every call returns within the timeout.

    ``setblocking(False)`` makes the next reads non-blocking (return None when
    nothing waits); ``setblocking(True)`` makes them wait at most
    ``timeout_ms`` for all the bytes asked, then raise OSError(110, timeout).

    After ``connect`` the TCP socket itself is non-blocking and every wait is
    a ``select.poll`` on it, never a socket timeout: MicroPython's TLS socket
    has no ``settimeout``, and a timeout inside an mbedTLS read poisons the
    session (every later call raises ETIMEDOUT). A non-blocking TLS read
    returns None while mbedTLS needs more bytes, so the same loop serves plain
    TCP and TLS. ``tls_wrap(sock)`` (optional) returns the TLS socket; its
    handshake runs while the TCP socket still has the ``timeout_ms`` timeout,
    so each handshake read is bounded too.
    """

    def __init__(self, sockmod, timeout_ms, framer, tls_wrap, clock, poller, beat=None):
        self._beat = beat        # called on every bounded wait: the link thread's heartbeat
        self._sockmod = sockmod
        self._raw = sockmod.socket()
        self._s = self._raw
        self._timeout_ms = timeout_ms
        self._framer = framer
        self._tls_wrap = tls_wrap
        self._clock = clock
        self._nonblocking = False
        self._poll = poller()

    def connect(self, addr):
        self._raw.settimeout(self._timeout_ms / 1000)
        self._raw.connect(addr)
        try:
            # umqtt.simple writes each packet in pieces; without TCP_NODELAY
            # Nagle holds the later pieces for an ACK (about 40 ms a packet).
            self._raw.setsockopt(6, 1, 1)     # IPPROTO_TCP, TCP_NODELAY
        except (OSError, AttributeError):
            pass
        if self._tls_wrap is not None:
            self._s = self._tls_wrap(self._raw)
        self._raw.settimeout(0)
        self._poll.register(self._raw, select.POLLIN)

    def setblocking(self, flag):
        self._nonblocking = not flag

    def settimeout(self, timeout):
        """umqtt.simple 1.7.0 (the one frozen into the v1.28.0 image) calls
        ``settimeout(None)`` before it connects. None ("blocking") keeps every
        wait bounded by ``timeout_ms``; 0 is ``setblocking(False)``; a number
        of seconds can only shorten the bound, never lengthen it."""
        self._nonblocking = timeout == 0
        if timeout:
            self._timeout_ms = min(self._timeout_ms, int(timeout * 1000))

    def _deadline(self):
        return self._clock.ticks_add(self._clock.ticks_ms(), self._timeout_ms)

    def _wait(self, deadline, event):
        """Wait until the TCP socket is ready for ``event`` (select.POLLIN or
        POLLOUT) or ``deadline`` (ticks_ms) passes; OSError(110) after it."""
        left = self._clock.ticks_diff(deadline, self._clock.ticks_ms())
        if left <= 0:
            raise OSError(110, "timeout")
        if self._beat is not None:
            self._beat()
        self._poll.modify(self._raw, event)
        # A hang-up or error also ends the wait: the next call sees it.
        self._poll.poll(min(left, 100))

    def _read_now(self, n):
        try:
            return self._s.read(n)
        except OSError as exc:
            if exc.args and exc.args[0] == 11:   # EAGAIN: nothing waits
                return None
            raise

    def read(self, n):
        if self._nonblocking:
            data = self._read_now(n)
            if data:
                self._framer.feed(data)
            return data
        deadline = self._deadline()
        buf = b""
        while len(buf) < n:
            data = self._read_now(n - len(buf))
            if data is None:
                self._wait(deadline, select.POLLIN)
                continue
            if not data:
                break          # peer closed: umqtt raises on the short read
            self._framer.feed(data)
            buf += data
        return buf

    def write(self, data, length=None):
        if type(data) is str:      # umqtt passes the client id and topics as given
            data = data.encode()
        if length is not None:
            data = memoryview(data)[:length]
        deadline = self._deadline()
        sent = 0
        total = len(data)
        while sent < total:
            try:
                n = self._s.write(memoryview(data)[sent:])
            except OSError as exc:
                if not (exc.args and exc.args[0] == 11):
                    raise
                n = None
            if not n:
                # mbedTLS wants the same bytes offered again after WANT_WRITE.
                self._wait(deadline, select.POLLOUT)
                continue
            sent += n
        return total

    def close(self):
        try:
            self._s.close()
        except OSError:
            pass
        if self._s is not self._raw:
            try:
                self._raw.close()
            except OSError:
                pass


class _SocketModule:
    """Stands in for the ``socket`` module inside umqtt.simple. ``sockmod``
    and ``poller`` are the real ``socket`` module and ``select.poll`` unless a
    test passes fakes that hold a broker's bytes."""

    def __init__(self, link, sockmod=None, poller=None):
        if sockmod is None:
            import socket as sockmod
        self._socket = sockmod
        self._poller = poller or select.poll
        self._link = link

    def socket(self, *args):
        return self._link.open_socket(self._socket, self._poller)

    def getaddrinfo(self, host, port, *args):
        return self._socket.getaddrinfo(host, port)


class MqttLink:
    """Connection to the broker for one charger.

    ``topics``: dict with ``set``, ``cmd``, ``state`` and ``online`` topics
    (bytes). ``keepalive_s`` 5..600 s; ``io_timeout_ms`` bounds every socket
    call. ``client_factory(client_id, host, port, user, password, keepalive)``
    returns an ``umqtt.simple.MQTTClient``-like object (default: the real
    umqtt.simple with bounded sockets, :func:`umqtt_factory`).
    ``network_ready()`` (optional) returns False while WiFi is down.

    Control-loop side (never blocks): :meth:`take` returns received messages,
    :meth:`offer_state` hands over the latest state payload, :meth:`stats`
    reports. Link side: :meth:`start` runs :meth:`serve` on a new thread;
    :meth:`step` is one bounded iteration (for tests).
    """

    def __init__(self, client_id, host, port, topics, keepalive_s=30, user=None,
                 password=None, io_timeout_ms=_IO_TIMEOUT_MS, network_ready=None, tls_wrap=None,
                 clock=time, client_factory=None):
        self.client_factory = client_factory or umqtt_factory(self)
        self.client_id = client_id
        self.host = host
        self.port = port
        self.topics = topics
        self.keepalive_s = keepalive_s
        self.user = user
        self.password = password
        self.io_timeout_ms = io_timeout_ms
        self.network_ready = network_ready
        self.tls_wrap = tls_wrap
        self.clock = clock
        self.framer = _Framer()
        self.sock = None
        self.client = None
        self.connected = False
        self.connects = 0
        self.failures = 0
        self.retained_dropped = 0
        self.inbox_dropped = 0
        self.last_error = None
        self.last_connack = None
        self.last_connect_ms = None
        self.running = False
        self.beat = 0            # counts up while the link thread makes progress (LinkWatch)
        self._stop = False
        self._abandoned = False
        self._lock = _thread.allocate_lock()
        self._inbox = []
        self._state = None
        self._state_sent = None
        self._backoff_ms = _BACKOFF_MIN_MS
        self._next_try = clock.ticks_ms()
        self._ping_at = 0
        self._pings_seen = 0
        self._pingresp_at = 0

    # -- control-loop side: never blocks ---------------------------------------

    def take(self):
        """Return the received ``(kind, payload)`` list (kind ``set`` or
        ``cmd``), oldest first, and empty the inbox. Returns an empty tuple at once if the
        link thread holds the lock right now. Nothing waiting costs no
        allocation (the control loop asks every tick)."""
        if not self._inbox or not self._lock.acquire(0):
            return _NOTHING
        got = self._inbox
        self._inbox = []
        self._lock.release()
        return got

    def offer_state(self, payload):
        """Hand over the latest state payload (bytes) for publishing; a newer
        one replaces an unsent older one. Returns False if it must be retried."""
        if not self._lock.acquire(0):
            return False
        self._state = payload
        self._lock.release()
        return True

    def stats(self):
        """Link status for reports and diagnostics (dict)."""
        now = self.clock.ticks_ms()
        return {
            "connected": self.connected,
            "connects": self.connects,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_connack": self.last_connack,
            "last_connect_ms": self.last_connect_ms,
            "keepalive_s": self.keepalive_s,
            "pingresp_age_ms": self.clock.ticks_diff(now, self._pingresp_at) if self._pings_seen else None,
            "retained_dropped": self.retained_dropped,
            "inbox_dropped": self.inbox_dropped,
        }

    # -- link side -------------------------------------------------------------

    def _tick_beat(self):
        self.beat = (self.beat + 1) & 0x3FFFFFFF

    def open_socket(self, sockmod, poller):
        """A bounded socket for the next connection (umqtt.simple asks through
        :class:`_SocketModule`); it gets a fresh framer."""
        self.framer = _Framer()
        self.sock = _BoundedSocket(sockmod, self.io_timeout_ms, self.framer, self.tls_wrap,
                                   self.clock, poller, self._tick_beat)
        return self.sock

    def _on_message(self, topic, payload):
        kind = "set" if topic == self.topics["set"] else "cmd" if topic == self.topics["cmd"] else None
        if kind is None or not payload:
            return    # a zero-length payload only clears a retained message (§4)
        if self.framer.publish_header & 0x01:
            self.retained_dropped += 1     # §4: set and cmd are never retained
            return
        self._lock.acquire()
        try:
            if len(self._inbox) >= _INBOX_MAX:
                self._inbox.pop(0)
                self.inbox_dropped += 1
            self._inbox.append((kind, payload))
        finally:
            self._lock.release()

    def _connect(self):
        t0 = self.clock.ticks_ms()
        c = self.client_factory(self.client_id, self.host, self.port, self.user, self.password,
                                self.keepalive_s)
        c.set_callback(self._on_message)
        c.set_last_will(self.topics["online"], b"0", True, 1)
        self.client = c
        try:
            c.connect()
            self.last_connack = 0
        except Exception as exc:
            # umqtt.simple's MQTTException(code) is a refused CONNACK; an
            # OSError's errno must not be read as one.
            if type(exc).__name__ == "MQTTException" and exc.args \
                    and type(exc.args[0]) is int and 0 < exc.args[0] < 6:
                self.last_connack = exc.args[0]
                if exc.args[0] == 2 and self.keepalive_s > 10:
                    # Perhaps the broker's max_keepalive: ask for less next time
                    # rather than stay locked out (mosquitto.conf(5)).
                    self.keepalive_s = (_KEEPALIVE_REFUSED_MAX_S if self.keepalive_s > _KEEPALIVE_REFUSED_MAX_S
                                        else max(10, self.keepalive_s // 2))
            raise
        if self._stop:
            # Abandoned while it connected (a hung DNS lookup or handshake that
            # came back): a new link owns this client id now. Leave quietly,
            # without a DISCONNECT's "0" or a will that would say offline.
            self._close_quietly()
            raise OSError(125, "link abandoned")
        c.subscribe(self.topics["set"], 1)
        c.subscribe(self.topics["cmd"], 1)
        c.publish(self.topics["online"], b"1", True, 1)
        now = self.clock.ticks_ms()
        self.last_connect_ms = self.clock.ticks_diff(now, t0)
        self._ping_at = now
        self._pingresp_at = now
        self._pings_seen = self.framer.pingresp
        self._state_sent = None
        self.connected = True
        self.connects += 1
        self._backoff_ms = _BACKOFF_MIN_MS

    def _drop(self, exc):
        self.connected = False
        self.failures += 1
        self.last_error = "%s: %s" % (type(exc).__name__, str(exc).strip())
        if self.sock is not None:
            self.sock.close()
        now = self.clock.ticks_ms()
        self._next_try = self.clock.ticks_add(now, self._backoff_ms)
        self._backoff_ms = min(self._backoff_ms * 2, _BACKOFF_MAX_MS)

    def step(self):
        """One bounded iteration: (re)connect when due, receive what waits,
        publish a new state, ping. Each socket call returns within
        ``io_timeout_ms``. Never raises."""
        now = self.clock.ticks_ms()
        try:
            if not self.connected:
                if self.clock.ticks_diff(now, self._next_try) < 0:
                    return
                if self.network_ready is not None and not self.network_ready():
                    self._next_try = self.clock.ticks_add(now, _BACKOFF_MIN_MS)
                    return
                self._connect()
                now = self.clock.ticks_ms()
            c = self.client
            if c is None:
                return
            for _ in range(_INBOX_MAX):     # drain what waits, a bounded amount
                seen = self.framer.rx_bytes
                c.check_msg()
                if self.framer.rx_bytes == seen:
                    break
            if self.framer.pingresp != self._pings_seen:
                self._pings_seen = self.framer.pingresp
                self._pingresp_at = now
            payload = self._state
            if payload is not None and payload is not self._state_sent:
                c.publish(self.topics["state"], payload, True, 0)
                self._state_sent = payload
            half = self.keepalive_s * 500
            if self.clock.ticks_diff(now, self._ping_at) >= half:
                c.ping()
                self._ping_at = now
            if self.clock.ticks_diff(now, self._pingresp_at) > self.keepalive_s * 1000 + half:
                raise OSError(110, "no PINGRESP for %d s" % (self.keepalive_s * 3 // 2))
        except Exception as exc:  # every failure means: reconnect with backoff
            self._drop(exc)

    def serve(self, idle_ms=20):
        """Run :meth:`step` until :meth:`stop`; the link thread's body."""
        self.running = True
        try:
            while not self._stop:
                self._tick_beat()
                self.step()
                time.sleep_ms(idle_ms)
        finally:
            c = self.client
            if self._abandoned:
                self._close_quietly()    # a new link is up: say nothing in its name
            elif self.connected and c is not None:
                try:   # a clean DISCONNECT suppresses the will: say "0" first
                    c.publish(self.topics["online"], b"0", True, 0)
                    c.disconnect()
                except Exception:
                    pass
            self.connected = False
            self.running = False

    def _close_quietly(self):
        self.connected = False
        if self.sock is not None:
            self.sock.close()

    def start(self, spawn=None):
        """Start :meth:`serve` on its own thread (``spawn``: the thread
        starter, ``_thread.start_new_thread`` unless a test makes it fail).
        Raises what the starter raises; ``running`` stays False then."""
        self.running = True
        try:
            (spawn or _thread.start_new_thread)(self.serve, ())
        except BaseException:
            self.running = False
            raise

    def abandon(self):
        """Give up on this link's thread (dead or hung, see
        :class:`firmware.net.watch.LinkWatch`): if it ever wakes it ends
        without finishing a connect and without publishing anything (the
        new link owns the client id); nothing waits for it."""
        self._abandoned = True
        self._stop = True

    def stop(self, wait_ms=500):
        """Ask the link thread to end, and give it up to ``wait_ms`` to say
        offline and disconnect. Only for shutdown: the board is already safe."""
        self._stop = True
        t0 = self.clock.ticks_ms()
        while self.running and self.clock.ticks_diff(self.clock.ticks_ms(), t0) < wait_ms:
            time.sleep_ms(10)


def pem_certificates(pem, limit=4):
    """The DER bytes of each certificate in ``pem`` (str, the ``ca_cert``
    secret), as a list of at most ``limit``. MicroPython's mbedTLS build parses
    only DER. Several CAs may be trusted at once (to move to a new CA). Raises
    ValueError when there is no complete, decodable certificate, or a broken
    one."""
    import binascii

    out = []
    at = 0
    while len(out) < limit:
        begin = pem.find("-----BEGIN CERTIFICATE-----", at)
        if begin < 0:
            break
        end = pem.find("-----END CERTIFICATE-----", begin)
        if end < 0:
            raise ValueError("PEM certificate %d has no END line" % (len(out) + 1))
        body = pem[begin + 27:end]
        for ch in "\r\n\t ":
            body = body.replace(ch, "")
        try:
            der = binascii.a2b_base64(body)
        except Exception:
            raise ValueError("bad base64 in PEM certificate %d" % (len(out) + 1))
        if len(der) < 64 or der[0] != 0x30:
            raise ValueError("PEM certificate %d holds no DER certificate" % (len(out) + 1))
        out.append(der)
        at = end + 25
    if not out:
        raise ValueError("no PEM certificate")
    return out


def tls_wrapper(cas, host):
    """Return a ``tls_wrap(sock)`` for :class:`MqttLink`: a TLS client that
    accepts the broker only if its certificate chains to one of the CAs in
    ``cas`` (list of DER bytes, see :func:`pem_certificates`; the CA comes
    from ``evse-server broker-setup``) and names ``host`` (DNS name or IP
    address, as in ``mqtt_host``). There is no mode without verification. The
    handshake raises ValueError (certificate refused) or OSError (network);
    the link then retries with backoff, and the connectivity watchdog (C4)
    sees no setpoint either way. Each handshake read waits at most the
    socket's timeout, but a broker that drips bytes can stretch the whole
    handshake: that only delays the link, never the control loop."""
    import ssl

    def wrap(sock):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED
        for der in cas:
            ctx.load_verify_locations(cadata=der)   # each call adds to the trusted set
        return ctx.wrap_socket(sock, server_hostname=host)

    return wrap


def _utf8(text):
    return text.encode() if type(text) is str else text


def umqtt_factory(link, sockmod=None, poller=None):
    """Return a ``client_factory`` building umqtt.simple clients whose socket
    calls are bounded by ``link.io_timeout_ms`` (see :class:`_SocketModule`;
    ``sockmod`` and ``poller`` replace ``socket`` and ``select.poll`` in tests).
    Written for umqtt.simple 1.7.0, the version frozen into the MicroPython
    v1.28.0 ESP32 image (``lib/manifest.json`` pins the same file)."""
    from umqtt import simple

    setattr(simple, "socket", _SocketModule(link, sockmod, poller))  # bounded sockets

    def make(client_id, host, port, user, password, keepalive):
        # umqtt counts a string's length in characters but the socket sends
        # UTF-8: as bytes, a non-ASCII password gets a correct CONNECT.
        return simple.MQTTClient(_utf8(client_id), host, port, _utf8(user), _utf8(password),
                                 keepalive)

    return make
