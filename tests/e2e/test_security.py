"""Broker security on a real mosquitto (DESIGN.md §4 "Security", issue 6):
per-charger accounts and the ACL made by ``evse-server broker-setup``, no
anonymous clients, TLS with the CA it makes, and firmware chargers on the
MicroPython unix port that connect over TLS or, with the wrong CA, refuse the
broker and fall back to their offline current (C4)."""
import json
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from evse_tools import broker as brokers
from evse_tools.charger_sim import SimCharger
from evse_tools.netfault import Proxy
from evse_tools.server import secure
from evse_tools.server.db import GroupStore

HOST = "127.0.0.1"
CHARGERS = ["bay-1", "bay-2"]
T_WD_S = 10
OFFLINE_A = 6
NOT_AUTHORIZED = 135
"""MQTT 3.1.1 CONNACK return code 5, "not authorized", as paho 2 reports it
(the MQTT 5 reason code 0x87)."""


class SecureBroker:
    """mosquitto on broker-setup's own mosquitto.conf and nothing else (the
    harness adds only a log file and, as root, ``user``): one TLS listener
    on ``tls_port``, passwd, ACL, no anonymous clients."""

    def __init__(self, directory, workdir):
        self.dir = directory
        self.broker = brokers.start_mosquitto_conf(
            lambda port: secure.mosquitto_conf_text(directory, port, HOST), workdir=workdir)
        self.tls_port = self.broker.port
        self.log = workdir / "mosquitto.log"

    def password(self, user):
        return (self.dir / "passwords" / user).read_text().strip()


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    if brokers.mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto` (.ci/run does it)")
    d = tmp_path_factory.mktemp("broker-setup")
    secure.setup(d, [HOST], CHARGERS)
    b = SecureBroker(d, tmp_path_factory.mktemp("mosquitto-secure"))
    yield b
    b.broker.close()


class Client:
    """A paho client that records CONNACK codes and received (topic, payload)."""

    def __init__(self, b, user=None, password=None, subscribe=(), client_id="", tls_ca=True):
        self.connacks = []
        self.got = []
        self.subscribed = []
        self.disconnects = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if user:
            c.username_pw_set(user, password)
        if tls_ca:
            c.tls_set(ca_certs=str(b.dir / "ca.pem" if tls_ca is True else tls_ca))

        def on_connect(cl, u, f, rc, p=None):
            self.connacks.append(rc.value)
            if not rc.is_failure and subscribe:
                cl.subscribe([(t, 1) for t in subscribe])

        def on_disconnect(*a):
            self.disconnects += 1

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_subscribe = lambda *a: self.subscribed.append(1)
        c.on_message = lambda cl, u, m: self.got.append((m.topic, m.payload))
        self.c = c
        c.connect(HOST, b.tls_port)
        c.loop_start()
        end = time.monotonic() + 5
        while time.monotonic() < end and not self.connacks:
            time.sleep(0.02)
        while subscribe and time.monotonic() < end and self.connacks[-1:] == [0] and not self.subscribed:
            time.sleep(0.02)

    def publish(self, topic, payload, retain=False):
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def as_user(b, user, **kw):
    return Client(b, user, b.password(user), **kw)


def settle():
    time.sleep(0.5)   # let mosquitto deliver whatever it is going to deliver


def test_anonymous_client_is_refused(sec):
    c = Client(sec)
    try:
        assert c.connacks[:1] == [NOT_AUTHORIZED]
    finally:
        c.close()


def test_generated_config_opens_only_its_tls_listener(sec):
    """Found by a walkthrough: a per-listener option before the listener line
    made mosquitto open a default plain listener on 1883 as well."""
    import re

    opened = set(re.findall(r"listen socket on port (\d+)", sec.log.read_text()))
    assert opened == {str(sec.tls_port)}
    plain = Client(sec, secure.SERVER_USER, sec.password(secure.SERVER_USER), tls_ca=False)
    try:
        assert plain.connacks == []       # MQTT in the clear is no MQTT to a TLS listener
    finally:
        plain.close()


def test_wrong_password_is_refused(sec):
    c = Client(sec, "bay-1", sec.password("bay-2"))
    try:
        assert c.connacks[:1] == [NOT_AUTHORIZED]
    finally:
        c.close()


def test_charger_cannot_report_state_for_another_charger(sec):
    server = as_user(sec, secure.SERVER_USER, subscribe=["evse/#"])
    a = as_user(sec, "bay-1")
    try:
        assert a.connacks[:1] == [0]
        a.publish("evse/bay-2/state", b'{"v": 1, "id": "bay-2", "state": "C", "measured_a": 40}')
        a.publish("evse/bay-2/online", b"0", retain=True)
        a.publish("evse/bay-1/state", b'{"v": 1, "id": "bay-1", "state": "A"}')  # its own: allowed
        settle()
        assert [t for t, _ in server.got] == ["evse/bay-1/state"]
    finally:
        a.close()
        server.close()


def test_charger_cannot_publish_any_setpoint_or_command(sec):
    server = as_user(sec, secure.SERVER_USER, subscribe=["evse/#", "loadgroup/#"])
    victim = as_user(sec, "bay-2", subscribe=["evse/bay-2/set", "evse/bay-2/cmd"])
    a = as_user(sec, "bay-1")
    try:
        assert victim.connacks[:1] == [0] and a.connacks[:1] == [0]
        sp = json.dumps({"v": 1, "epoch": 99, "seq": 1, "current_a": 80})
        for topic in ("evse/bay-2/set", "evse/bay-1/set", "evse/bay-2/cmd", "evse/bay-1/cmd",
                      "loadgroup/garage/state"):
            a.publish(topic, sp)
        settle()
        assert victim.got == [] and server.got == []
        # The same setpoint from the server's account does arrive: the test can fail.
        server.publish("evse/bay-2/set", sp)
        settle()
        assert [t for t, _ in victim.got] == ["evse/bay-2/set"]
    finally:
        for c in (a, victim, server):
            c.close()


def test_oversized_publish_from_a_charger_never_reaches_the_server(sec):
    server = as_user(sec, secure.SERVER_USER, subscribe=["evse/#"])
    a = as_user(sec, "bay-1")
    try:
        a.c.publish("evse/bay-1/state", b"x" * (secure.MAX_PACKET + 1), qos=0)
        a.publish("evse/bay-1/online", b"1")     # may fail: the broker drops the client
    except Exception:
        pass
    settle()
    b = as_user(sec, "bay-1")
    b.publish("evse/bay-1/state", b'{"v": 1, "id": "bay-1", "state": "A"}')
    settle()
    try:
        assert [len(p) for t, p in server.got if t == "evse/bay-1/state"] == [37]
    finally:
        for c in (a, b, server):
            c.close()


def test_charger_cannot_take_over_another_chargers_session(sec):
    """With the victim's client id a takeover would disconnect the victim
    (MQTT 3.1.1 §3.1.4); the broker names each client after its account."""
    victim = as_user(sec, "bay-2", subscribe=["evse/bay-2/set"], client_id="bay-2")
    server = as_user(sec, secure.SERVER_USER)
    try:
        thief = as_user(sec, "bay-1", client_id="bay-2")
        settle()
        assert thief.connacks[:1] == [0] and victim.disconnects == 0
        server.publish("evse/bay-2/set", b'{"v": 1, "epoch": 1, "seq": 1, "current_a": 16}')
        settle()
        assert [t for t, _ in victim.got] == ["evse/bay-2/set"] and thief.got == []
        thief.close()
    finally:
        victim.close()
        server.close()


def test_tools_account_sends_commands_but_no_setpoints(sec):
    victim = as_user(sec, "bay-2", subscribe=["evse/bay-2/set", "evse/bay-2/cmd"])
    admin = as_user(sec, secure.ADMIN_USER)
    try:
        admin.publish("evse/bay-2/set", b'{"v": 1, "epoch": 1, "seq": 1, "current_a": 80}')
        admin.publish("evse/bay-2/cmd", b'{"v": 1, "cmd": "reset_fault"}')
        settle()
        assert [t for t, _ in victim.got] == ["evse/bay-2/cmd"]
    finally:
        victim.close()
        admin.close()


def test_charger_cannot_read_another_chargers_setpoints(sec):
    a = as_user(sec, "bay-1", subscribe=["evse/#"])
    server = as_user(sec, secure.SERVER_USER)
    try:
        server.publish("evse/bay-2/set", b'{"v": 1, "epoch": 1, "seq": 1, "current_a": 16}')
        server.publish("evse/bay-1/set", b'{"v": 1, "epoch": 1, "seq": 1, "current_a": 16}')
        settle()
        assert [t for t, _ in a.got] == ["evse/bay-1/set"]
    finally:
        a.close()
        server.close()


def charger(sec, workdir, cid, ca_pem, password=None, **extra):
    """A firmware charger on the unix port that talks TLS to the broker with its
    own account (or ``password``); ``ca_pem``: the CA it trusts (PEM text)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "secrets.json").write_text(json.dumps(
        {"mqtt_user": cid, "mqtt_password": password or sec.password(cid), "ca_cert": ca_pem}))
    s = {"charger_id": cid, "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": T_WD_S,
         "offline_a": OFFLINE_A, "mqtt_host": HOST, "mqtt_port": sec.tls_port, "mqtt_tls": True,
         "keepalive_s": 5}
    s.update(extra)
    return SimCharger(s, workdir)


def watch(ch, until_s, pred=None):
    """Telemetry until ``until_s`` after the charger's boot, or until ``pred``."""
    seen = []
    first = ch.wait_ready()
    t0 = time.monotonic() - first["t_ms"] / 1000
    while time.monotonic() - t0 < until_s:
        for s in ch.poll(0.1):
            seen.append(s)
            if pred and pred(s):
                return seen
    return seen


def test_tls_with_the_wrong_ca_fails_cleanly_and_the_charger_falls_back(sec, tmp_path):
    _, wrong_ca, _ = secure.make_ca(tmp_path / "other-ca")
    wrong_pem = (tmp_path / "other-ca" / "ca.pem").read_text()
    server = as_user(sec, secure.SERVER_USER, subscribe=["evse/bay-1/#"])
    try:
        with charger(sec, tmp_path / "bay-1", "bay-1", wrong_pem) as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            seen = watch(ch, T_WD_S + 3)
            assert ch.proc.poll() is None                       # no crash
        log = (tmp_path / "bay-1" / "firmware.log").read_text()
        assert "not correctly signed by the trusted CA" in log
        assert "mqtt connected" not in log
        assert server.got == []          # not one byte reached the broker's clients
        fell = next(s for s in seen if s["limit_by"] == "offline")
        assert fell["t_ms"] <= (T_WD_S + 1) * 1000 and fell["pilot_a"] == OFFLINE_A
        assert max(s["pilot_a"] for s in seen) == 8           # the start current, never more
    finally:
        server.close()


def test_blackholed_tls_session_cannot_delay_the_offline_fallback(sec, tmp_path):
    """C4: "a blackholed TLS session" must not hold up the watchdog. The TLS
    session is up and a setpoint applied; then the path goes silent."""
    ca_pem = (sec.dir / "ca.pem").read_text()
    server = as_user(sec, secure.SERVER_USER)
    with Proxy((HOST, sec.tls_port)) as path:
        with charger(sec, tmp_path / "bay-1", "bay-1", ca_pem, mqtt_port=path.port) as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            end = time.monotonic() + 20
            seq = 0
            applied = None
            while time.monotonic() < end and applied is None:
                seq += 1
                server.publish("evse/bay-1/set", json.dumps(
                    {"v": 1, "epoch": 7, "seq": seq, "current_a": 16}))
                for s in ch.poll(0.5):
                    if s["pilot_a"] == 16 and s["ack_seq"] == seq:
                        applied = s     # the newest setpoint: no later one renews the lease
            assert applied is not None, "no setpoint applied over TLS"
            path.blackhole = True
            t_black = applied["tick_ms"]
            fell = None
            gaps, last = [], time.monotonic()
            end = time.monotonic() + T_WD_S + 4
            while time.monotonic() < end and fell is None:
                for s in ch.poll(0.1):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                    if s["limit_by"] == "offline":
                        fell = s
    server.close()
    assert fell is not None and fell["pilot_a"] == OFFLINE_A
    # The last setpoint was applied at or before t_black: the fallback comes
    # at most T_wd + 1 s after it.
    assert fell["tick_ms"] - t_black <= (T_WD_S + 1) * 1000
    assert max(gaps) < 1.0      # the control loop never waited on the dead TLS session


def test_charger_with_the_right_ca_but_a_wrong_password_stays_offline(sec, tmp_path):
    ca_pem = (sec.dir / "ca.pem").read_text()
    with charger(sec, tmp_path / "bay-2", "bay-2", ca_pem, password=sec.password("bay-1")) as ch:
        seen = watch(ch, T_WD_S + 2)
    log = (tmp_path / "bay-2" / "firmware.log").read_text()
    assert "mqtt link down: MQTTException: 5" in log and "mqtt connected" not in log
    assert seen[-1]["limit_by"] == "offline" and seen[-1]["limit_a"] == OFFLINE_A


def test_secure_load_group_shares_the_limit_over_tls_with_per_charger_accounts(sec, tmp_path):
    db = tmp_path / "server.db"
    with GroupStore(str(db)) as store:
        store.create_group("garage", 50, 40, t_wd_s=T_WD_S)
        for cid in CHARGERS:
            store.add_member("garage", cid, 32)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "evse_tools.server.cli", "--db", str(db), "run",
         "--broker", f"{HOST}:{sec.tls_port}", "--cafile", str(sec.dir / "ca.pem"),
         "--username", secure.SERVER_USER,
         "--password-file", str(sec.dir / "passwords" / secure.SERVER_USER)],
        stdout=log, stderr=subprocess.STDOUT)
    ca_pem = (sec.dir / "ca.pem").read_text()
    chargers = [charger(sec, tmp_path / cid, cid, ca_pem, t_wd_s=T_WD_S) for cid in CHARGERS]
    try:
        for ch in chargers:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
        latest = {}
        end = time.monotonic() + 40
        while time.monotonic() < end:
            for cid, ch in zip(CHARGERS, chargers):
                for s in ch.poll(0.05):
                    latest[cid] = s
                    assert s["pilot_a"] <= 32
            if all(latest.get(c, {}).get("pilot_a") == 20 for c in CHARGERS):
                break
        # Limit 40 A shared 50/50 (seed), every setpoint delivered over TLS.
        assert {c: (latest[c]["pilot_a"], latest[c]["limit_by"]) for c in CHARGERS} == \
            {c: (20, "setpoint") for c in CHARGERS}
        for cid in CHARGERS:
            text = (tmp_path / cid / "firmware.log").read_text()
            assert "(TLS) started" in text and "mqtt connected" in text
    finally:
        for ch in chargers:
            ch.close()
        server.terminate()
        server.wait(10)
        log.close()
