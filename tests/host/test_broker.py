"""The brokers of evse_tools.broker: mosquitto, the embedded amqtt broker, an
external handle and the silent listener.

Tests that need mosquitto fail (never skip) when it is missing: CI installs it.
The umqtt.simple checks run the real client (lib/umqtt/simple.py, `make lib`)
on the real MicroPython unix port in a subprocess.
"""
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from evse_tools import broker as brokers
from evse_tools.charger_sim import device_env, micropython_cmd
from evse_tools.broker import Broker, BrokerError, SilentBroker

REPO = Path(__file__).resolve().parents[2]
KINDS = ["mosquitto", "amqtt"]


def require_mosquitto() -> str:
    path = brokers.mosquitto_path()
    if path is None:
        pytest.fail("mosquitto is not installed (not on PATH, no /usr/sbin/mosquitto): these "
                    "tests need it; install it with `apt-get install -y mosquitto`")
    return path


def start(kind: str, **kw) -> Broker:
    if kind == "mosquitto":
        require_mosquitto()
        return brokers.start_mosquitto(**kw)
    return brokers.start_embedded(**kw)


@pytest.fixture(params=KINDS)
def broker(request):
    with start(request.param) as b:
        yield b


# -- helpers -------------------------------------------------------------------
class Paho:
    """A paho-mqtt 2 client (MQTT 3.1.1, callback API 2) with a message queue."""

    def __init__(self, b, client_id: str, timeout: float = 5.0):
        self.msgs: queue.Queue = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_connect = lambda c, u, flags, rc, props: self.connected.put(rc)
        self.c.connect(b.host, b.port, keepalive=30)
        self.c.loop_start()
        rc = self.connected.get(timeout=timeout)
        assert not rc.is_failure, f"CONNACK refused: {rc}"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done: queue.Queue = queue.Queue()
        self.c.on_subscribe = lambda c, u, mid, rcs, props: done.put(rcs)
        self.c.subscribe(topic, qos)
        rcs = done.get(timeout=5)
        assert not rcs[0].is_failure, f"SUBACK refused: {rcs}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def get(self, timeout: float = 5.0):
        return self.msgs.get(timeout=timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def mqtt_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def raw_connect(client_id: str, keepalive_s: int, will_topic: str, will_msg: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a retained QoS 1 last will, built by hand."""
    flags = 0x02 | 0x04 | 0x08 | 0x20     # clean session, will, will QoS 1, will retain
    body = (mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s)
            + mqtt_string(client_id) + mqtt_string(will_topic) + mqtt_string(will_msg))
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a TCP socket listening on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


# -- every broker kind ---------------------------------------------------------------
def test_paho_publishes_and_receives_a_retained_message(broker):
    pub = Paho(broker, "pub")
    pub.publish("evse/t-1/online", b"1", qos=1, retain=True)
    sub = Paho(broker, "sub")
    sub.subscribe("evse/+/online", qos=1)
    m = sub.get()
    assert (m.topic, m.payload, m.retain) == ("evse/t-1/online", b"1", True)
    pub.publish("evse/t-1/online", b"2", qos=0)          # live: not flagged retained
    m = sub.get()
    assert (m.topic, m.payload, m.retain) == ("evse/t-1/online", b"2", False)
    pub.publish("evse/t-1/online", b"", qos=1, retain=True)   # clears the retained one
    assert sub.get().payload == b""
    late = Paho(broker, "late")
    late.subscribe("evse/+/online", qos=1)
    with pytest.raises(queue.Empty):
        late.get(timeout=0.5)
    for c in (pub, sub, late):
        c.close()


def test_listens_on_loopback_only(broker):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/net/tcp")
    assert listening_addresses(broker.port) == {"0100007F"}     # 127.0.0.1
    assert broker.host == "127.0.0.1" and broker.url == f"mqtt://127.0.0.1:{broker.port}"


@pytest.mark.parametrize("kind", KINDS)
def test_kill_then_start_again_on_the_same_port(kind):
    with start(kind) as b:
        port, pid = b.port, b.pid
        c = Paho(b, "before")
        c.publish("k/retained", b"x", retain=True)
        lost: queue.Queue = queue.Queue()
        c.c.on_disconnect = lambda *a: lost.put(True)
        t = time.monotonic()
        assert b.kill() == -signal.SIGKILL
        t_kill = time.monotonic() - t
        assert not b.running and b.pid is None and not pid_alive(pid)
        assert lost.get(timeout=5)
        c.c.loop_stop()
        with pytest.raises(OSError):
            socket.create_connection((b.host, port), timeout=1).close()
        t = time.monotonic()
        b.start()
        print(f"{kind}: kill() {t_kill:.3f} s, start() until ready {time.monotonic() - t:.3f} s")
        assert b.port == port and b.running and b.pid != pid
        again = Paho(b, "after")
        again.subscribe("k/#")
        with pytest.raises(queue.Empty):       # persistence is off: nothing survived
            again.get(timeout=0.5)
        again.publish("k/live", b"y")
        assert again.get().payload == b"y"
        again.close()
        b.restart()                             # graceful stop, start, same port
        assert b.port == port and b.running
        Paho(b, "after-restart").close()
        with pytest.raises(BrokerError, match="already running"):
            b.start()
    assert not b.running
    assert b.stop() == 0                        # stopped with SIGTERM: a clean exit


@pytest.mark.parametrize("kind", KINDS)
def test_context_exit_stops_the_process_and_removes_its_temp_dir(kind):
    with start(kind) as b:
        pid, wd = b.pid, b.workdir
        assert wd.is_dir() and b.log_path.exists()
    assert not pid_alive(pid) and not wd.exists()
    assert b not in brokers._LIVE


@pytest.mark.parametrize("kind", KINDS)
def test_broker_dies_with_the_process_that_started_it(kind, tmp_path):
    """Even a SIGKILLed parent (no atexit) leaves no broker behind (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux only")
    code = textwrap.dedent(f"""
        import sys, time
        from evse_tools import broker
        b = broker.{'start_mosquitto' if kind == 'mosquitto' else 'start_embedded'}(workdir={str(tmp_path)!r})
        print(b.pid, flush=True)
        time.sleep(60)
    """)
    if kind == "mosquitto":
        require_mosquitto()
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "tools")))
    try:
        pid = int(parent.stdout.readline())
        assert pid_alive(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), f"{kind} broker pid {pid} outlived its parent"
    finally:
        parent.kill()


# -- mosquitto specifics ----------------------------------------------------------------
def test_mosquitto_path_finds_the_installed_binary():
    path = require_mosquitto()
    assert os.access(path, os.X_OK)


def test_mosquitto_bad_config_raises_with_the_log_tail():
    require_mosquitto()
    with pytest.raises(RuntimeError, match="bogus_option") as err:
        brokers.start_mosquitto(extra_conf="bogus_option 1\n")
    assert "mosquitto" in str(err.value) and "exited with status" in str(err.value)


def test_mosquitto_extra_conf_can_turn_anonymous_off(tmp_path):
    require_mosquitto()
    conf = brokers.mosquitto_conf(1883, tmp_path, "allow_anonymous false\n")
    assert "allow_anonymous true" not in conf and conf.count("allow_anonymous") == 1
    with brokers.start_mosquitto(extra_conf="allow_anonymous false\n", workdir=tmp_path) as b:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anon",
                        protocol=mqtt.MQTTv311)
        got: queue.Queue = queue.Queue()
        c.on_connect = lambda c, u, flags, rc, props: got.put(rc)
        c.connect(b.host, b.port, 30)
        c.loop_start()
        assert got.get(timeout=5).is_failure      # "not authorised"
        c.loop_stop()
    assert (tmp_path / "mosquitto.log").exists()   # a caller's workdir is kept


def test_missing_mosquitto_is_a_clear_error_and_default_falls_back_to_embedded(monkeypatch):
    monkeypatch.setattr(brokers, "mosquitto_path", lambda: None)
    with pytest.raises(RuntimeError, match="mosquitto is not installed"):
        brokers.start_mosquitto()
    with brokers.default_broker(None) as b:
        assert b.kind == "amqtt" and b.running


# -- default_broker and external handles -----------------------------------------------
def test_default_broker_prefers_mosquitto():
    require_mosquitto()
    with brokers.default_broker(None) as b:
        assert b.kind == "mosquitto" and b.running


def test_default_broker_with_a_url_is_an_external_handle():
    require_mosquitto()
    with brokers.start_mosquitto() as real:
        ext = brokers.default_broker(real.url)
        assert (ext.kind, ext.host, ext.port, ext.managed) == ("external", "127.0.0.1",
                                                              real.port, False)
        ext.wait_ready(2)
        Paho(ext, "via-url").close()
        for op in (ext.stop, ext.kill, ext.start, ext.restart):
            with pytest.raises(BrokerError, match="external"):
                op()
        with ext:           # leaving the block leaves the external broker alone
            pass
        assert real.running
    with pytest.raises(BrokerError, match="does not accept TCP"):
        ext.wait_ready(0.3)
    assert brokers.default_broker("mqtt://example.org").port == 1883
    for bad in ("http://h:1", "h:1883", "mqtt://h:1/x", "mqtt://h:99999"):
        with pytest.raises(ValueError, match="mqtt://"):
            brokers.default_broker(bad)


# -- silent broker ---------------------------------------------------------------------------
def test_silent_broker_accepts_tcp_but_never_answers_connect():
    connect = raw_connect("silent-1", 30, "evse/silent-1/online", "0")
    with SilentBroker() as sb:
        assert sb.url == f"mqtt://127.0.0.1:{sb.port}"
        s = socket.create_connection((sb.host, sb.port), timeout=2)
        s.sendall(connect)
        t = time.monotonic()
        with pytest.raises(socket.timeout):
            s.recv(1)                        # no CONNACK, nothing at all, in 2 s
        assert time.monotonic() - t >= 1.9
        deadline = time.monotonic() + 2
        while sb.bytes_received < len(connect) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sb.accepted == 1 and sb.bytes_received == len(connect)
        s2 = socket.create_connection((sb.host, sb.port), timeout=2)   # more clients welcome
        s2.sendall(b"\xc0\x00")
        t = time.monotonic()
        sb.stop()
        assert time.monotonic() - t < 1 and not sb.running
        s.settimeout(2)
        assert s.recv(1) == b""             # clients see EOF once it stops
        s.close()
        s2.close()
        sb.stop()                           # twice is fine
    with pytest.raises(OSError):
        socket.create_connection((sb.host, sb.port), timeout=1).close()


def test_silent_broker_keeps_a_paho_client_waiting():
    with SilentBroker() as sb:
        got: queue.Queue = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="waits",
                        protocol=mqtt.MQTTv311)
        c.on_connect = lambda *a: got.put(a)
        c.connect(sb.host, sb.port, 30)     # TCP succeeds
        c.loop_start()
        with pytest.raises(queue.Empty):
            got.get(timeout=1)              # but CONNACK never comes
        c.loop_stop()
        c.socket().close()


# -- umqtt.simple on the MicroPython unix port -------------------------------------------------
UMQTT_CHECK = r'''
import sys
import time
from umqtt.simple import MQTTClient

host, port, pre = sys.argv[1], int(sys.argv[2]), sys.argv[3]
T = 5  # s: bound on every blocking read
t0 = time.ticks_ms()


def ok(step):
    print("OK", step, time.ticks_diff(time.ticks_ms(), t0))


def client(name, inbox, will=False):
    c = MQTTClient(pre + "-" + name, host, port, keepalive=30)
    if will:
        c.set_last_will(pre + "/a/online", b"0", retain=True, qos=1)
    c.set_callback(lambda t, m: inbox.append((t, m)))
    assert c.connect() == 0       # clean session: no session present
    c.sock.settimeout(T)
    return c


def wait_for(c, inbox, item):
    deadline = time.ticks_add(time.ticks_ms(), T * 1000)
    while item not in inbox:
        assert time.ticks_diff(deadline, time.ticks_ms()) > 0, "no %r in %r" % (item, inbox)
        c.sock.settimeout(T)
        c.wait_msg()


def m(topic, payload):
    return ((pre + topic).encode(), payload)


got_a, got_b, got_c = [], [], []
a = client("a", got_a, will=True)
ok("connect_keepalive30_will_retained_qos1")
a.subscribe(pre + "/a/set", qos=1)
ok("subscribe_qos1")
a.publish(pre + "/a/online", b"1", retain=True, qos=1)
ok("publish_qos1_retained_puback")
a.publish(pre + "/a/state", b'{"v": 1}', qos=0)
ok("publish_qos0")

b = client("b", got_b)
b.subscribe(pre + "/a/#", qos=1)
wait_for(b, got_b, m("/a/online", b"1"))
ok("retained_delivered_on_subscribe")

b.publish(pre + "/a/set", b"s1", qos=1)
wait_for(a, got_a, m("/a/set", b"s1"))
ok("receive_qos1_wait_msg")

b.publish(pre + "/a/set", b"s0", qos=0)
deadline = time.ticks_add(time.ticks_ms(), T * 1000)
while m("/a/set", b"s0") not in got_a:
    assert time.ticks_diff(deadline, time.ticks_ms()) > 0, "check_msg never got s0"
    a.check_msg()
    time.sleep_ms(5)
ok("receive_qos0_check_msg")
t = time.ticks_ms()
assert a.check_msg() is None
assert time.ticks_diff(time.ticks_ms(), t) < 100
ok("check_msg_nonblocking_when_idle")

a.sock.settimeout(T)
a.ping()
assert a.sock.read(2) == b"\xd0\x00"
ok("pingreq_pingresp")

wait_for(b, got_b, m("/a/set", b"s0"))
a.sock.close()   # drop the socket without DISCONNECT
t = time.ticks_ms()
wait_for(b, got_b, m("/a/online", b"0"))
print("will_after_ms", time.ticks_diff(time.ticks_ms(), t))
ok("last_will_on_socket_drop")

c = client("c", got_c)
c.subscribe(pre + "/a/online", qos=1)
wait_for(c, got_c, m("/a/online", b"0"))
ok("last_will_retained")
b.disconnect()
c.disconnect()
print("ALL OK")
'''

UMQTT_TAKEOVER = r'''
import sys
import time
from umqtt.simple import MQTTClient

host, port, pre = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def client(name, inbox):
    c = MQTTClient(pre + "-" + name, host, port, keepalive=30)
    c.set_last_will(pre + "/a/online", b"0", retain=True, qos=1)
    c.set_callback(lambda t, m: inbox.append((t, m)))
    c.connect()
    c.sock.settimeout(5)
    return c


old = client("a", [])
old.publish(pre + "/a/online", b"1", retain=True, qos=1)
# The charger reconnects while its old socket is still open (a half-open link
# after a WiFi drop), then the old socket finally closes.
new = client("a", [])
new.publish(pre + "/a/online", b"1", retain=True, qos=1)
old.sock.close()
time.sleep_ms(500)
seen = []
c = client("c", seen)
c.subscribe(pre + "/a/online", qos=1)
deadline = time.ticks_add(time.ticks_ms(), 1000)
while time.ticks_diff(deadline, time.ticks_ms()) > 0:
    c.check_msg()
    time.sleep_ms(10)
print("SEEN", repr(seen))
new.ping()
new.sock.settimeout(5)
print("PING", repr(new.sock.read(2)))
'''


def run_micropython(script: str, b, tmp_path) -> str:
    # The device runtime's frozen umqtt.simple (1.7.0): the image's client.
    exe = micropython_cmd()
    path = tmp_path / "umqtt_script.py"
    path.write_text(script)
    env = device_env()
    t = time.monotonic()
    r = subprocess.run([exe, str(path), b.host, str(b.port), f"t{b.port}"], env=env,
                       capture_output=True, text=True, timeout=30)
    print(f"{b.kind}: micropython ran {time.monotonic() - t:.2f} s\n{r.stdout}{r.stderr}")
    assert r.returncode == 0, f"micropython failed against {b.kind}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_umqtt_simple_on_the_unix_port(broker, tmp_path):
    out = run_micropython(UMQTT_CHECK, broker, tmp_path)
    for step in ("connect_keepalive30_will_retained_qos1", "subscribe_qos1",
                 "publish_qos1_retained_puback", "publish_qos0", "retained_delivered_on_subscribe",
                 "receive_qos1_wait_msg", "receive_qos0_check_msg",
                 "check_msg_nonblocking_when_idle", "pingreq_pingresp",
                 "last_will_on_socket_drop", "last_will_retained"):
        assert f"OK {step} " in out, step
    assert out.rstrip().endswith("ALL OK")
    # The will of a dropped socket comes out at once (within 2 s).
    will_ms = int(out.split("will_after_ms ")[1].split()[0])
    assert will_ms < 2000


def test_umqtt_reconnect_with_a_still_open_old_socket_keeps_online_1(broker, tmp_path):
    """The old connection's will comes out at the takeover, never after the new
    connection's retained "1": the retained online flag ends as "1"."""
    out = run_micropython(UMQTT_TAKEOVER, broker, tmp_path)
    seen = out.split("SEEN ")[1].splitlines()[0]
    pre = f"t{broker.port}"
    assert seen == repr([(f"{pre}/a/online".encode(), b"1")])
    assert "PING b'\\xd0\\x00'" in out       # the new connection still works


def test_last_will_when_a_client_goes_silent_past_its_keepalive(broker):
    """A client that stops talking (socket still open) is dropped after about
    1.5 x keep-alive and its retained will is published."""
    obs = Paho(broker, "observer")
    obs.subscribe("evse/quiet/online", qos=1)
    s = socket.create_connection((broker.host, broker.port), timeout=5)
    try:
        s.sendall(raw_connect("quiet", 1, "evse/quiet/online", "0"))
        assert s.recv(4) == b"\x20\x02\x00\x00"      # CONNACK accepted
        t = time.monotonic()
        m = obs.get(timeout=10)
        took = time.monotonic() - t
        print(f"{broker.kind}: will {took:.2f} s after the last packet (keep-alive 1 s)")
        assert (m.topic, m.payload) == ("evse/quiet/online", b"0")
        assert 1.0 <= took <= 8.0
    finally:
        s.close()
        obs.close()
    late = Paho(broker, "late")
    late.subscribe("evse/quiet/online")
    m = late.get()
    assert (m.payload, m.retain) == (b"0", True)
    late.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_port_is_a_clear_error_or_a_retry_when_the_port_was_automatic(kind, monkeypatch):
    if kind == "mosquitto":
        require_mosquitto()
    with SilentBroker() as busy:
        with pytest.raises(RuntimeError, match="(?i)address already in use") as err:
            start(kind, port=busy.port)
        assert f"exited with status" in str(err.value)
        real_free_port = brokers.free_port
        picks = iter([busy.port])
        monkeypatch.setattr(brokers, "free_port", lambda: next(picks, None) or real_free_port())
        with start(kind) as b:           # the first pick is taken: it tries another port
            assert b.port != busy.port and b.running


def test_retained_messages_only_for_the_clients_own_subscription(broker):
    """A client gets no retained message before it subscribes, even when other
    clients subscribed to matching filters; then it gets each one once."""
    server = Paho(broker, "server")
    server.subscribe("evse/+/state", qos=1)
    server.publish("evse/other/state", b'{"v": 1}', qos=0, retain=True)
    assert server.get().payload == b'{"v": 1}'
    charger = Paho(broker, "charger")
    with pytest.raises(queue.Empty):
        charger.get(timeout=0.5)
    charger.subscribe("evse/+/state", qos=1)
    m = charger.get()
    assert (m.topic, m.retain, m.qos) == ("evse/other/state", True, 0)
    with pytest.raises(queue.Empty):
        charger.get(timeout=0.5)
    server.close()
    charger.close()


def test_takeover_of_a_kept_session_keeps_the_new_connection(broker):
    """clean_session=False: a reconnect while the old socket is open ends the
    old connection only; the new one works and online stays "1"."""
    def connect(cid):
        flags = 0x04 | 0x08 | 0x20           # kept session, will QoS 1 retained
        body = (mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
                + mqtt_string(cid) + mqtt_string("evse/kept/online") + mqtt_string("0"))
        s = socket.create_connection((broker.host, broker.port), timeout=5)
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4)[:2] == b"\x20\x02"
        return s

    old = connect("kept")
    new = connect("kept")
    body = mqtt_string("evse/kept/online") + b"1"
    new.sendall(bytes([0x31, len(body)]) + body)       # QoS 0, retained
    time.sleep(0.3)
    old.close()
    time.sleep(0.5)
    new.sendall(b"\xc0\x00")
    assert new.recv(2) == b"\xd0\x00"                   # PINGRESP: still connected
    obs = Paho(broker, "observer")
    obs.subscribe("evse/kept/online")
    assert obs.get().payload == b"1"
    with pytest.raises(queue.Empty):
        obs.get(timeout=0.5)
    obs.close()
    new.close()
