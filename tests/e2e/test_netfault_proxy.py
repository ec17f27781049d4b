"""The fault-injection proxy (tools/evse_tools/netfault.py) itself: a fault
that silently reorders or loses bytes would make every fault scenario test
the wrong thing. TCP never loses bytes, so neither may the proxy."""
import socket
import threading
import time

from evse_tools.netfault import Proxy, _connect_keepalive


def echo_server():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=lambda: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return ls


def recv_exactly(s, n, timeout=30.0):
    s.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        assert d, "connection closed early"
        buf += d
    return buf


def test_lossy_delayed_path_delivers_every_byte_in_order_no_sooner_than_the_delay():
    ls = echo_server()
    with Proxy(ls.getsockname(), seed=7) as p:
        p.loss, p.delay_s, p.rto_s = 0.3, 0.2, 0.1
        c = socket.create_connection((p.host, p.port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = b"".join(bytes([i]) * 10 for i in range(60))
        t0 = time.monotonic()
        for i in range(60):
            c.sendall(sent[i * 10:(i + 1) * 10])
            time.sleep(0.005)
        got = recv_exactly(c, len(sent))
        assert got == sent
        assert time.monotonic() - t0 >= 2 * 0.2       # one delay each way
        assert p.segments_lost > 0
        c.close()
    ls.close()


def test_blackholed_path_forwards_nothing_until_restored():
    ls = echo_server()
    with Proxy(ls.getsockname()) as p:
        c = socket.create_connection((p.host, p.port))
        p.blackhole = True
        c.sendall(b"lost")
        c.settimeout(0.5)
        try:
            assert c.recv(10) == b"", "bytes crossed a blackholed path"
        except socket.timeout:
            pass
        p.blackhole = False
        c.sendall(b"back")
        assert recv_exactly(c, 4) == b"back"
        c.close()
    ls.close()


def test_publish_tap_records_topic_and_payload_of_a_qos1_setpoint():
    ls = echo_server()
    with Proxy(ls.getsockname()) as p:
        c = socket.create_connection((p.host, p.port))
        topic, payload = b"evse/garage-1/set", b'{"v": 1, "current_a": 16}'
        body = len(topic).to_bytes(2, "big") + topic + b"\x00\x07" + payload
        pkt = bytes([0x32, len(body)]) + body               # PUBLISH, QoS 1
        c.sendall(pkt)
        recv_exactly(c, len(pkt))
        time.sleep(0.1)
        assert [(d, t, pl) for _t, d, t, pl in p.publishes] == [
            ("up", "evse/garage-1/set", payload), ("down", "evse/garage-1/set", payload)]
        c.close()
    ls.close()


def test_broker_with_max_keepalive_60_refuses_a_120s_keepalive_with_identifier_rejected():
    def connect(keepalive):
        vh = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
        pl = b"\x00\x02c1"
        return bytes([0x10, len(vh) + len(pl)]) + vh + pl

    assert _connect_keepalive(connect(120)) == 120
    assert _connect_keepalive(connect(120)[:5]) is None
    # umqtt.simple writes the CONNECT in pieces: a verdict given on the
    # keepalive alone closes the socket with the client id unread, the RST can
    # beat the CONNACK, and the refused charger never learns to ask for less.
    assert _connect_keepalive(connect(120)[:12]) is None
    assert _connect_keepalive(connect(120)[:-1]) is None
    ls = echo_server()
    with Proxy(ls.getsockname()) as p:
        p.max_keepalive = 60
        c = socket.create_connection((p.host, p.port))
        c.sendall(connect(120))
        assert recv_exactly(c, 4) == b"\x20\x02\x00\x02"   # CONNACK, 2: identifier rejected
        c2 = socket.create_connection((p.host, p.port))
        c2.sendall(connect(60))
        assert recv_exactly(c2, len(connect(60))) == connect(60)   # passed on to the broker
        assert [k for _t, k in p.refused] == [120]
        c.close()
        c2.close()
    ls.close()
