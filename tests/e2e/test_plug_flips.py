"""Issue 11, finding 1, end to end: the real ``evse-server run`` process on
mosquitto, and two chargers that follow the wire contract (§4) with EVs
that lag the pilot as IEC 61851-1 allows.

Each charger is the firmware's own limit arbiter (``firmware/core/limit.py``,
through :class:`evse_tools.sim.virtual.VirtualCharger`) behind a paho client:
it applies ``set`` messages, reports its state on change and every second
(with ``ack_seq`` and ``ack_epoch``), and its EV follows every pilot change
3 s late. Car 2 is plugged in and out a second apart while car 1 charges, so
car 1's measured drop always answers an earlier decrease: the case that put
60 A on a 50 A breaker.

Checked every 0.1 s: what the EVs may draw (the highest pilot offered to
each in the last 5 s) and what they draw stay within the 50 A breaker; every
``loadgroup/garage/state`` message's worst case stays within it too.
"""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from evse_tools.server.db import GroupStore
from evse_tools.sim.virtual import TickClock, VirtualCharger, VirtualEv

BREAKER, LIMIT, T_WD = 50, 40, 10
EV_LAG_S = 3.0


class WireCharger:
    """A charger on the wire: the firmware's arbiter, a lagging EV, and an MQTT
    client. ``step(now)`` advances it (s, monotonic) and reports when due."""

    def __init__(self, cid: str, broker):
        self.id = cid
        self.clock = TickClock()
        self.base = self.clock.now
        self.t0 = time.monotonic()
        self.core = VirtualCharger(cid, 40.0, self.clock, T_WD)
        self.lock = threading.Lock()
        self.seq = 0
        self._said = None
        self._last = -1e9
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{cid}",
                                  protocol=mqtt.MQTTv311)
        self.client.will_set(f"evse/{cid}/online", b"0", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        client.subscribe(f"evse/{self.id}/set", qos=1)
        client.publish(f"evse/{self.id}/online", b"1", qos=1, retain=True)

    def _on_message(self, client, userdata, msg):
        if msg.retain or not msg.payload:
            return            # §4: a retained set is ignored
        with self.lock:
            self.clock.set_seconds(self.base, self._now())
            self.core.deliver(msg.payload)

    def plug(self, on: bool) -> None:
        with self.lock:
            if on and self.core.ev is None:
                self.core.plug(VirtualEv(max_a=48, delay_s=EV_LAG_S))
            elif not on:
                self.core.unplug()

    def step(self, dt: float) -> tuple[float, float]:
        """Advance; returns (may draw, draws), A."""
        with self.lock:
            now = self._now()
            self.clock.set_seconds(self.base, now)
            self.core.advance(now, dt)
            r = self.core.report()
            said = (r.state, r.pilot_a, r.ack_seq, r.offline_a, r.start_a, round(r.measured_a))
            if said != self._said or now - self._last >= 1.0:
                self._said, self._last = said, now
                self.seq += 1
                body = {"v": 1, "id": self.id, "seq": self.seq, "uptime_s": int(now),
                        "state": r.state, "pilot_a": r.pilot_a, "measured_a": r.measured_a,
                        "limit_by": r.limit_by, "ack_seq": r.ack_seq, "ack_epoch": r.ack_epoch,
                        "offline_a": r.offline_a, "start_a": r.start_a, "t_wd_s": T_WD,
                        "session_wh": r.session_wh, "fault": None, "relay": r.relay,
                        "fw": "test"}
                self.client.publish(f"evse/{self.id}/state", json.dumps(body), qos=0, retain=True)
            drawn = self.core.ev.drawn_a if self.core.ev else 0.0
            return max(self.core.may_draw(now), drawn), drawn

    def limit(self) -> float:
        with self.lock:
            return self.core.limit()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_plug_flips_beside_a_lagging_ev_never_put_the_group_over_the_breaker(mosquitto, tmp_path):
    db = tmp_path / "server.db"
    with GroupStore(str(db)) as store:
        store.create_group("garage", BREAKER, t_wd_s=T_WD)
        store.add_member("garage", "c1", 40)
        store.add_member("garage", "c2", 40)
    group_states = []
    watch = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch", protocol=mqtt.MQTTv311)
    watch.on_message = lambda c, u, m: group_states.append(json.loads(m.payload)) if m.payload else None
    watch.connect(mosquitto.host, mosquitto.port)
    watch.subscribe("loadgroup/garage/state", qos=1)
    watch.loop_start()
    chargers = {cid: WireCharger(cid, mosquitto) for cid in ("c1", "c2")}
    exe = Path(sys.executable).with_name("evse-server")
    server = subprocess.Popen([str(exe), "--db", str(db), "run", "--broker",
                               f"{mosquitto.host}:{mosquitto.port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = []
    try:
        def run(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                may = drawn = 0.0
                for c in chargers.values():
                    m, d = c.step(0.1)
                    may += m
                    drawn += d
                samples.append((may, drawn))
                time.sleep(0.1)

        run(6.0)                                   # the server provisions both chargers
        chargers["c1"].plug(True)
        run(15.0)
        assert chargers["c1"].limit() == 40        # a lone car gets the limit
        for i in range(16):                        # car 2 in and out, a second apart
            chargers["c2"].plug(i % 2 == 0)
            run(1.0)
        chargers["c2"].plug(True)
        run(25.0)
        assert [chargers[c].limit() for c in ("c1", "c2")] == [20.0, 20.0]
    finally:
        server.terminate()
        log = server.communicate(timeout=20)[0]
        for c in chargers.values():
            c.close()
        watch.loop_stop()
        watch.disconnect()
    worst_may = max(m for m, _d in samples)
    worst_drawn = max(d for _m, d in samples)
    assert worst_may <= BREAKER, (worst_may, log[-2000:])
    assert worst_drawn <= BREAKER
    assert group_states, log[-2000:]
    assert max(s["worst_case_a"] for s in group_states) <= BREAKER
    # Damping: car 1 is never raised within the EV's 5 s (+1 s) of a decrease
    # (the server logs whole seconds: at least 5 s apart there).
    c1 = []
    for line in log.splitlines():
        parts = line.split()
        if parts[1:3] == ["set", "c1"]:
            h, m, sec = (int(x) for x in parts[0].split(":"))
            c1.append((h * 3600 + m * 60 + sec, float(parts[3])))
    last_down = None
    for (_t0, a0), (t1, a1) in zip(c1, c1[1:]):
        if a1 < a0:
            last_down = t1
        elif a1 > a0 and last_down is not None:
            assert (t1 - last_down) % 86400 >= 5, c1

