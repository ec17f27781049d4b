"""Firmware benchmarks (issue 7, items 1-4): the firmware on the MicroPython
unix port with its simulated board, mosquitto on loopback.

* setpoint latency: a ``set`` published -> the pilot's duty changed, from the
  publisher's clock to the board's record of the PWM write (both
  CLOCK_MONOTONIC on Linux, so the figures are end to end);
* contactor-open latency after C -> B and after a GFCI trip: in control
  ticks and ms of virtual time (the firmware logic, deterministic) and in
  real ms on the unix port (from the UDP command to the contactor write);
* watchdog fallback accuracy: the time from a setpoint to the offline
  current, against ``T_wd``, with the broker reachable and with the path
  blackholed right after the setpoint (:class:`evse_tools.netfault.Proxy`);
* the control tick's duration (p50, p99, max) while setpoints with new
  offline currents, faults and lockouts are persisted with a modelled flash
  latency, against a baseline in the same run that writes on the tick
  (issue 13; ``tests/fw/tick_bench.py``);

Every charger runs on the device runtime (MicroPython v1.28.0, 32-bit,
single-precision floats, a GIL) at a 48 KB heap. The memory figures are the
``memory`` part (:mod:`evse_tools.bench.memory`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from evse_tools import broker as brokers
from evse_tools.charger_sim import REPO, SimCharger
from evse_tools.device_runtime import device_env, micropython_cmd
from evse_tools.netfault import Proxy

FLASH_MS = 30
"""Modelled littlefs write latency, ms: an erase of a 4 KB block on the
ESP32's SPI flash takes tens of ms (issue 13)."""


def _ms() -> float:
    return time.monotonic() * 1000


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": round(_pct(values, 50), 1), "p99": round(_pct(values, 99), 1),
            "max": round(max(values), 1)}


def _charger(b, workdir: Path, cid: str, **extra) -> SimCharger:
    s = {"charger_id": cid, "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": 10,
         "mqtt_host": b.host, "mqtt_port": b.port, "keepalive_s": 10}
    s.update(extra)
    return SimCharger(s, workdir / cid)


def _wait(ch: SimCharger, pred, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for s in ch.poll(0.05):
            if pred(s):
                return s
    raise RuntimeError("bench: condition not reached")


def _publisher(b):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(b.host, b.port)
    c.loop_start()
    return c


def setpoint_latency(b, workdir: Path, count: int) -> dict:
    """Publish ``count`` setpoints (alternating 16 and 20 A, 50 ms apart) to a
    charging charger; latency from publish to the PWM write, ms."""
    with _charger(b, workdir, "lat-1") as ch:
        ch.wait_ready()
        ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
        _wait(ch, lambda s: s["state"] == "C" and s["relay"], 15)
        pub = _publisher(b)
        sent: dict[int, float] = {}
        lat: list[float] = []
        seen_seq = set()
        for seq in range(1, count + 1):
            amps = 16 if seq % 2 else 20
            sent[seq] = _ms()
            pub.publish("evse/lat-1/set", json.dumps({"v": 1, "epoch": 1, "seq": seq, "current_a": amps}), qos=1)
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                for s in ch.poll(0.01):
                    q = s.get("ack_seq")
                    if q in sent and q not in seen_seq and s["pilot_a"] == (16 if q % 2 else 20):
                        seen_seq.add(q)
                        lat.append(s["pilot_at"] - sent[q])
        for s in ch.poll(0.5):
            q = s.get("ack_seq")
            if q in sent and q not in seen_seq:
                seen_seq.add(q)
                lat.append(s["pilot_at"] - sent[q])
        pub.loop_stop()
        pub.disconnect()
    out = _summary(lat)
    out["lost"] = count - len(lat)
    return out


def relay_latency_virtual() -> dict:
    """Control ticks and ms of virtual time from the EV leaving C (to B) and
    from a GFCI trip to the contactor opening: the firmware logic alone."""
    sys.path[:0] = [str(REPO / "tests" / "fw"), str(REPO / "tools")]   # the harness, simboard
    try:
        from harness import ev, make_charger, run_ms, setpoint   # the test harness, both runtimes
    finally:
        del sys.path[:2]
    out = {}
    for case in ("c_to_b", "gfci"):
        c, board, clock = make_charger()
        car = ev(max_a=32)
        board.plug(car)
        run_ms(c, clock, 100)
        c.on_setpoint(setpoint(1, 32))
        run_ms(c, clock, 14000)              # past the 10 s early-trip window
        if case == "c_to_b":
            car.wants = False
        else:
            board.gfci = True
        ticks = 0
        while board.relay:
            c.tick()
            clock.advance(10)
            ticks += 1
        out[case] = {"ticks": ticks, "ms": ticks * 10}
    return out


def relay_latency_real(b, workdir: Path, rounds: int) -> dict:
    """Real ms on the unix port from the UDP command (EV to B, GFCI trip) to
    the contactor write."""
    res = {"c_to_b": [], "gfci": []}
    with _charger(b, workdir, "relay-1") as ch:
        ch.wait_ready()
        ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
        for i in range(rounds):
            _wait(ch, lambda s: s["relay"], 20)
            t = _ms()
            ch.send({"cmd": "wants", "wants": False})
            s = _wait(ch, lambda s: not s["relay"], 5)
            res["c_to_b"].append(s["relay_at"] - t)
            ch.send({"cmd": "wants", "wants": True})
        _wait(ch, lambda s: s["relay"], 20)
        time.sleep(11)                          # past the early-trip window: a plain trip
        t = _ms()
        ch.send({"cmd": "gfci", "on": True})
        s = _wait(ch, lambda s: not s["relay"], 5)
        res["gfci"].append(s["relay_at"] - t)
    return {k: _summary(v) for k, v in res.items()}


def fallback_accuracy(b, workdir: Path, t_wd: int = 10) -> dict:
    """Time from a setpoint's publish to the offline current, minus T_wd, ms:
    with the broker reachable, and with the path blackholed after it."""
    out = {}
    for case in ("reachable", "blackholed"):
        with Proxy((b.host, b.port)) as proxy:
            with SimCharger({"charger_id": "wd-" + case, "unit_rating_a": 32, "installer_max_a": 32,
                             "t_wd_s": t_wd, "offline_a": 6, "mqtt_host": proxy.host,
                             "mqtt_port": proxy.port, "keepalive_s": 10}, workdir / ("wd-" + case)) as ch:
                ch.wait_ready()
                time.sleep(1.5)                  # connected and subscribed
                pub = _publisher(b)
                t0 = _ms()
                pub.publish(f"evse/wd-{case}/set", json.dumps({"v": 1, "epoch": 1, "seq": 1,
                                                               "current_a": 16}), qos=1)
                s = _wait(ch, lambda s: s["ack_seq"] == 1, 5)
                if case == "blackholed":
                    proxy.blackhole = True
                s = _wait(ch, lambda s: not s["online"], t_wd + 5)
                pub.loop_stop()
                pub.disconnect()
                out[case] = {"t_wd_ms": t_wd * 1000, "measured_ms": round(s["tick_ms"] - t0, 1),
                             "error_ms": round(s["tick_ms"] - t0 - t_wd * 1000, 1)}
    return out


def _mem(ch: SimCharger, collect: bool = True) -> int | None:
    ch.replies.clear()
    ch.send({"cmd": "mem", "collect": collect})
    end = time.monotonic() + 1
    while time.monotonic() < end:
        ch.poll(0.02)
        for r in ch.replies:
            if "mem_alloc" in r:
                return r["mem_alloc"]
    return None


def tick_duration(workdir: Path, ticks: int) -> dict:
    """Tick duration on the device runtime while persisting with
    :data:`FLASH_MS` per write: the firmware (write-behind) and the baseline
    (writes on the tick), ``ticks`` ticks each, 10 ms apart in real time."""
    out = {}
    fw = REPO / "tests" / "fw"
    for mode in ("behind", "inside"):
        d = workdir / ("tick-" + mode)
        d.mkdir(parents=True, exist_ok=True)
        code = "import tick_bench; tick_bench.run(%r, %r, %d, %d)" % (str(d), mode, ticks, FLASH_MS)
        r = subprocess.run([micropython_cmd(), "-X", "heapsize=256K", "-c", code], cwd=fw,
                           env=dict(device_env(), MICROPYPATH=".frozen:" + str(fw)),
                           capture_output=True, text=True, timeout=ticks / 50 + 60)
        if r.returncode != 0:
            raise RuntimeError("tick benchmark (%s) failed: %s" % (mode, r.stderr[-2000:]))
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def run(quick: bool = True) -> dict:
    """All firmware figures; ``quick`` uses fewer samples (for CI smoke runs)."""
    with tempfile.TemporaryDirectory(prefix="evse-bench-") as tmp:
        tmp = Path(tmp)
        b = brokers.start_mosquitto(workdir=tmp / "broker")
        try:
            res = {
                "setpoint_latency_ms": setpoint_latency(b, tmp, 100 if quick else 1000),
                "relay_open_virtual": relay_latency_virtual(),
                "relay_open_real_ms": relay_latency_real(b, tmp, 3 if quick else 20),
                "watchdog_fallback": fallback_accuracy(b, tmp),
                "tick_under_flash_writes": tick_duration(tmp, 600 if quick else 3000),
            }
        finally:
            b.close()
    return res


def table(r: dict) -> str:
    """The firmware figures as a plain-text table."""
    sl = r["setpoint_latency_ms"]
    rv = r["relay_open_virtual"]
    rr = r["relay_open_real_ms"]
    wd = r["watchdog_fallback"]
    rows = [
        ("setpoint publish -> PWM change (n=%d)" % sl["n"], "p50 %.1f / p99 %.1f / max %.1f ms" % (
            sl["p50"], sl["p99"], sl["max"])),
        ("contactor open after C->B (logic)", "%d ticks = %d ms" % (rv["c_to_b"]["ticks"], rv["c_to_b"]["ms"])),
        ("contactor open after GFCI trip (logic)", "%d ticks = %d ms" % (rv["gfci"]["ticks"], rv["gfci"]["ms"])),
        ("contactor open after C->B (device runtime)", "p50 %.1f / max %.1f ms" % (rr["c_to_b"]["p50"], rr["c_to_b"]["max"])),
        ("contactor open after GFCI (device runtime)", "max %.1f ms" % rr["gfci"]["max"]),
        ("watchdog fallback, broker reachable", "%.0f ms for T_wd %d ms (%+.0f ms)" % (
            wd["reachable"]["measured_ms"], wd["reachable"]["t_wd_ms"], wd["reachable"]["error_ms"])),
        ("watchdog fallback, path blackholed", "%.0f ms for T_wd %d ms (%+.0f ms)" % (
            wd["blackholed"]["measured_ms"], wd["blackholed"]["t_wd_ms"], wd["blackholed"]["error_ms"])),
    ]
    tf = r.get("tick_under_flash_writes")
    if tf:
        b, i = tf["behind"], tf["inside"]
        rows += [
            ("tick while persisting, %d ms flash (n=%d, %d writes)" % (b["flash_ms"], b["ticks"], b["writes"]),
             "p50 %.2f / p99 %.2f / max %.2f ms; write-behind between ticks max %.1f ms" % (
                 b["tick_us"]["p50"] / 1000, b["tick_us"]["p99"] / 1000, b["tick_us"]["max"] / 1000,
                 b["gap_us"]["max"] / 1000)),
            ("  baseline: the same writes on the tick (n=%d, %d writes)" % (i["ticks"], i["writes"]),
             "p50 %.2f / p99 %.2f / max %.2f ms: max %.0fx the write-behind's" % (
                 i["tick_us"]["p50"] / 1000, i["tick_us"]["p99"] / 1000, i["tick_us"]["max"] / 1000,
                 i["tick_us"]["max"] / max(1, b["tick_us"]["max"]))),
        ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)
