"""The charger's bounded MQTT link on the real unix port (C4, DESIGN.md §4, §6)."""
import json
import time

import paho.mqtt.client as mqtt

from evse_tools import broker as brokers
from evse_tools.charger_sim import SimCharger


def settings(cid, b, **extra):
    s = {"charger_id": cid, "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": 10,
         "offline_a": 6, "mqtt_host": b.host, "mqtt_port": b.port, "keepalive_s": 5}
    s.update(extra)
    return s


def wait_for(ch, pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for s in ch.poll(0.1):
            if pred(s):
                return s
    raise AssertionError("condition not reached in %.0f s" % timeout)


def publisher(b):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(b.host, b.port)
    c.loop_start()
    return c


def test_broker_that_never_answers_cannot_delay_the_offline_fallback(tmp_path):
    with brokers.SilentBroker() as silent:
        with SimCharger(settings("silent-1", silent), tmp_path) as ch:
            first = ch.wait_ready()
            t0 = time.monotonic() - first["t_ms"] / 1000
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            gaps, last = [], time.monotonic()
            fell = None
            while time.monotonic() - t0 < 13:
                for s in ch.poll(0.1):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                    if fell is None and not s["online"]:
                        fell = s
            assert silent.accepted >= 1          # the charger did connect and wait for CONNACK
            assert fell is not None and fell["t_ms"] <= 11000   # T_wd + 1 s after boot
            assert fell["pilot_a"] == 6 and fell["limit_by"] == "offline"
            # Telemetry kept coming while the link waited on the silent broker:
            # the control loop never waited on the network.
            assert max(gaps) < 1.0


def test_retained_setpoint_is_ignored_and_live_one_applied(mosquitto, tmp_path):
    pub = publisher(mosquitto)
    stale = {"v": 1, "epoch": 1, "seq": 99, "current_a": 32}
    pub.publish("evse/ret-1/set", json.dumps(stale), qos=1, retain=True).wait_for_publish()
    try:
        with SimCharger(settings("ret-1", mosquitto), tmp_path) as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            s = wait_for(ch, lambda s: s["state"] == "C", 10)
            time.sleep(1.0)
            s = wait_for(ch, lambda s: True, 2)
            assert s["pilot_a"] == 8 and s["limit_by"] == "start" and s["ack_seq"] is None
            pub.publish("evse/ret-1/set", json.dumps({"v": 1, "epoch": 2, "seq": 1, "current_a": 16}),
                        qos=1).wait_for_publish()
            s = wait_for(ch, lambda s: s["pilot_a"] == 16, 5)
            assert s["limit_by"] == "setpoint" and s["ack_seq"] == 1
    finally:
        pub.publish("evse/ret-1/set", b"", qos=1, retain=True).wait_for_publish()
        pub.loop_stop()


def test_charger_reconnects_and_resubscribes_after_the_broker_restarts(tmp_path):
    b = brokers.start_mosquitto(workdir=tmp_path / "broker")
    try:
        with SimCharger(settings("re-1", b), tmp_path / "c") as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            time.sleep(1.5)
            pub = publisher(b)
            pub.publish("evse/re-1/set", json.dumps({"v": 1, "epoch": 5, "seq": 1, "current_a": 20}), qos=1)
            wait_for(ch, lambda s: s["pilot_a"] == 20, 5)
            pub.loop_stop()
            b.kill()
            time.sleep(2.0)
            b.start()
            pub = publisher(b)
            # Keep sending until the charger is back (backoff 1, 2, 4 s ...).
            end = time.monotonic() + 20
            seq = 2
            got = None
            while time.monotonic() < end and got is None:
                pub.publish("evse/re-1/set", json.dumps({"v": 1, "epoch": 5, "seq": seq, "current_a": 24}), qos=1)
                seq += 1
                for s in ch.poll(0.5):
                    if s["pilot_a"] == 24:
                        got = s
            pub.loop_stop()
            assert got is not None and got["limit_by"] == "setpoint"
    finally:
        b.close()


def test_hung_control_loop_is_reset_by_the_watchdog_and_restarts_at_8a(mosquitto, tmp_path):
    with SimCharger(settings("hang-1", mosquitto), tmp_path) as ch:
        ch.wait_ready()
        ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
        wait_for(ch, lambda s: s["state"] == "C" and s["relay"], 10)
        pub = publisher(mosquitto)
        pub.publish("evse/hang-1/set", json.dumps({"v": 1, "epoch": 9, "seq": 1, "current_a": 24}), qos=1)
        wait_for(ch, lambda s: s["pilot_a"] == 24, 5)
        pub.loop_stop()
        ch.send({"cmd": "hang"})
        t0 = time.monotonic()
        while not ch.check_watchdog():
            ch.poll(0.2)
            assert time.monotonic() - t0 < 10
        assert ch.resets == 1
        s = wait_for(ch, lambda s: s["pilot_a"] > 0, 10)
        # Back with the start current, not the 24 A it had, and it says why.
        assert s["pilot_a"] == 8 and s["limit_by"] == "start"
        assert s["reset_reason"] == "watchdog"
        log = (tmp_path / "faults.json").read_text()
        assert '"reset"' in log and "watchdog" in log
