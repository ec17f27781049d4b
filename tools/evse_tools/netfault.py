"""A TCP proxy for fault injection on loopback (benchmarks, tests and the
fault-injection suite, :mod:`evse_tools.faultsuite`): the charger connects to
the proxy, the proxy to the broker. Only 127.0.0.1 is used.

Faults, all changeable while connections are open:

``blackhole = True``
    Every socket stays open but nothing is forwarded in either direction,
    like a dead WiFi path (bytes read meanwhile are swallowed). False
    forwards again.
``delay_s`` (s, >= 0)
    One-way latency added to every chunk in each direction: a 2 s delay
    gives a 4 s round trip.
``loss`` (share 0..1) and ``rto_s`` (s)
    Packet loss as TCP experiences it. TCP never loses bytes: a lost segment
    is retransmitted after the retransmission timeout (RTO), and everything
    behind it waits (head-of-line blocking, byte order kept). So each chunk
    read from one side is "lost" with probability ``loss``; every loss adds
    one RTO, doubled for each further loss of the same segment (Linux's
    exponential backoff, RFC 6298 §5.5), and a chunk is never released
    before the one in front of it. ``rto_s`` None means the round trip +
    0.2 s: Linux's SRTT + max(4 x RTTVAR, 200 ms) on a path of constant
    delay. Sparse MQTT traffic rarely has the three segments behind a loss
    that fast retransmit needs, so the RTO is the realistic penalty. A
    chunk is what one ``recv`` returned (at most 4 KB: one MQTT packet or a
    few, as the firmware sends with TCP_NODELAY).

``max_keepalive`` (s, None = no rule)
    A broker that refuses an MQTT 3.1.1 client asking for a longer keepalive:
    the client's CONNECT is answered with CONNACK return code 2 ("identifier
    rejected") and the connection closed (``refused`` records each one).
    mosquitto 2.0.11 applies its ``max_keepalive`` to MQTT v5 clients only
    (its mosquitto.conf(5)); the mosquitto.conf(5) of later releases says a
    3.1.1 client asking for more is refused this way, so the suite plays
    that rule here.

``publishes`` records every MQTT PUBLISH the proxy delivered, as
``(time.monotonic() s, direction, topic, payload bytes)``, ``direction``
being ``"down"`` (broker to client) or ``"up"``; the time is when the last
byte of the packet was written to the receiving socket. It is the ground
truth for "when did the charger get its last setpoint", whatever the faults
did to the path. ``seed`` makes the loss draws repeatable.
"""
from __future__ import annotations

import heapq
import random
import socket
import threading
import time


class _MqttTap:
    """Splits one direction of an MQTT 3.1.1 byte stream into packets and
    reports each PUBLISH (topic, payload). Tolerates junk: a malformed length
    stops the tap for that connection (forwarding goes on)."""

    def __init__(self, report):
        self.buf = bytearray()
        self.report = report
        self.dead = False

    def feed(self, data: bytes, t: float) -> None:
        if self.dead:
            return
        self.buf += data
        while len(self.buf) >= 2:
            mult, length, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return                       # length not complete yet
                b = self.buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    self.dead = True
                    return
            if len(self.buf) < i + length:
                return
            first = self.buf[0]
            body = bytes(self.buf[i:i + length])
            del self.buf[:i + length]
            if first >> 4 == 3 and len(body) >= 2:     # PUBLISH
                tlen = body[0] << 8 | body[1]
                topic = body[2:2 + tlen].decode("utf-8", "replace")
                qos = (first >> 1) & 3
                # QoS 1 and 2 carry a 2-byte packet id before the payload.
                self.report(t, topic, body[2 + tlen + (2 if qos else 0):])


def _connect_keepalive(buf: bytes | bytearray) -> int | None:
    """The keepalive (s) of the MQTT CONNECT at the start of ``buf``, or None
    while the packet is incomplete (-1: not a CONNECT). Decided only once the
    whole packet has arrived."""
    if len(buf) < 2:
        return None
    if buf[0] >> 4 != 1:
        return -1
    i, size, shift = 1, 0, 0
    while True:                            # remaining length (MQTT 3.1.1 §2.2.3)
        if i >= len(buf):
            return None
        size |= (buf[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not buf[i - 1] & 0x80:
            break
    # The whole packet, not just its keepalive: a socket closed with the rest
    # of the CONNECT unread sends RST, and the client may lose the CONNACK.
    if len(buf) < i + size:
        return None
    n = buf[i] << 8 | buf[i + 1] if size >= 2 else 0   # protocol name length ("MQTT": 4)
    at = i + 2 + n + 2                     # + protocol level + connect flags
    if at + 2 > i + size:
        return -1                          # too short for a CONNECT
    return buf[at] << 8 | buf[at + 1]


class Proxy:
    """Listens on 127.0.0.1 (``port``, 0 = any free one) and forwards to
    ``upstream`` (host, port). Use as a context manager or call :meth:`close`.
    See the module docstring for the faults (``blackhole``, ``delay_s``,
    ``loss``, ``rto_s``) and the record of delivered PUBLISH packets
    (``publishes``)."""

    def __init__(self, upstream: tuple[str, int], port: int = 0, seed: int | None = None):
        self.upstream = upstream
        self.blackhole = False
        self.delay_s = 0.0
        self.loss = 0.0
        self.rto_s: float | None = None
        self.publishes: list[tuple[float, str, str, bytes]] = []
        self.segments_lost = 0
        self.max_keepalive: int | None = None
        self.refused: list[tuple[float, int]] = []
        self.connections = 0
        self._rng = random.Random(seed)
        self._stop = False
        self._lock = threading.Lock()
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", port))
        self._lsock.listen(8)
        self._lsock.settimeout(0.2)
        self.port = self._lsock.getsockname()[1]
        self.host = "127.0.0.1"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def rto(self) -> float:
        """The retransmission timeout in force, s."""
        return self.rto_s if self.rto_s is not None else 2.0 * self.delay_s + 0.2

    def drop_connections(self) -> None:
        """Close every open connection (both sides see a reset/EOF)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, up]
                self.connections += 1
            for a, b, d in ((client, up, "up"), (up, client, "down")):
                threading.Thread(target=self._pump, args=(a, b, d), daemon=True).start()

    def _record(self, direction):
        def report(t, topic, payload):
            self.publishes.append((t, direction, topic, payload))
        return report

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str):
        """Read from ``src``; a sender thread writes to ``dst`` when each
        chunk is due (so that a delay never stalls the reading side)."""
        queue: list[tuple[float, int, bytes]] = []
        cv = threading.Condition()
        state = {"done": False, "n": 0, "last_due": 0.0}
        tap = _MqttTap(self._record(direction))

        def sender():
            while True:
                with cv:
                    while not queue and not state["done"]:
                        cv.wait(0.2)
                    if not queue and state["done"]:
                        break
                    due, _n, data = queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        cv.wait(min(wait, 0.2))
                        continue
                    heapq.heappop(queue)
                try:
                    dst.sendall(data)
                except OSError:
                    break
                tap.feed(data, time.monotonic())
            state["done"] = True
            self._close(src, dst)

        threading.Thread(target=sender, daemon=True).start()
        try:
            src.settimeout(0.2)
        except OSError:                       # closed already (drop_connections, close)
            state["done"] = True
        # The client's CONNECT is held until complete when a keepalive rule is set.
        gate = bytearray() if direction == "up" and self.max_keepalive is not None else None
        while not self._stop and not state["done"]:
            try:
                data = src.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            if self.blackhole:
                continue                      # swallowed: the path is dead
            if gate is not None:
                gate += data
                verdict = _connect_keepalive(gate)
                if verdict is None:
                    continue                  # the CONNECT is not complete yet
                if self.max_keepalive is not None and verdict > self.max_keepalive:
                    # CONNACK, return code 2 "identifier rejected", then close.
                    self.refused.append((time.monotonic(), verdict))
                    try:
                        src.sendall(b"\x20\x02\x00\x02")
                    except OSError:
                        pass
                    break
                data, gate = bytes(gate), None
            now = time.monotonic()
            due = now + self.delay_s
            rto, lost = self.rto(), 0
            while self.loss > 0 and self._rng.random() < self.loss and lost < 6:
                due += rto * (2 ** lost)      # retransmitted after the (backed-off) RTO
                lost += 1
            with cv:
                self.segments_lost += lost
                due = max(due, state["last_due"])   # byte order: never overtakes
                state["last_due"] = due
                state["n"] += 1
                heapq.heappush(queue, (due, state["n"], data))
                cv.notify()
        # The sender flushes what is queued (the FIN follows the data), then
        # closes both sockets.
        with cv:
            state["done"] = True
            cv.notify()

    @staticmethod
    def _close(*socks):
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._lsock.close()
        self.drop_connections()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
