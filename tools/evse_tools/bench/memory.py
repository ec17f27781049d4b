"""The charger's memory on the device runtime (issue 12): the smallest heap
(``micropython -X heapsize``) at which each job passes, the live heap in
steady state and at its peaks, the code sizes, and what one control tick
allocates, against the 48 KB goal.

An ESP32 starts MicroPython v1.28.0 with a 56 KB heap, which grows to about
112 KB only by taking the memory that WiFi and mbedTLS need (about 40 KB,
DESIGN.md §6). A charger that passes at 48 KB never has to grow into it.

Smallest heap: a bisection in 2 KB steps, each try a fresh charger process;
a try passes when its job is done and no charger logged a MemoryError or
was reset. The searches assume that a job passing at N KB passes above N too.

* boot and charge: the simulated board, no server; an EV plugged in must
  reach state C with the contactor closed and current flowing, and the
  charger must run on for 3 s;
* TLS session: a verified TLS session to mosquitto (``evse-server
  broker-setup``'s CA and accounts), a setpoint followed;
* OTA download and install: a signed bundle of the whole firmware (``.mpy``)
  downloaded, verified and switched in, while connected to the broker;
* OTA slot boot: the charger boots that slot (its bytecode in RAM),
  connects to the broker and charges;
* the garage end to end and the quick fault suite take minutes a try: the
  full run tries 48, 40 and 32 KB (stopping at the first failure); the quick
  run only 48 KB.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evse_tools import broker as brokers
from evse_tools import ota
from evse_tools.bench.firmware import _charger, _mem, _publisher, _wait
from evse_tools.charger_sim import SLOT_HEAP, SimCharger
from evse_tools.device_runtime import REPO, RUNTIME_DIR, compile_mpy, device_env, micropython_cmd

GOAL_KB = 48
ESP32_START_KB = 56
STEP_KB = 2


def _log_ok(dirs: list[Path]) -> bool:
    """No MemoryError in any charger log under ``dirs``."""
    for d in dirs:
        for log in Path(d).rglob("firmware.log"):
            if "MemoryError" in log.read_text(errors="replace"):
                return False
    return True


def smallest_heap(probe, lo_kb: int, hi_kb: int) -> tuple[int | None, list[tuple[int, bool]]]:
    """The smallest multiple of :data:`STEP_KB` in ``lo_kb..hi_kb`` at which
    ``probe(kb)`` is True, by bisection, and the tries as ``[(kb, passed)]``.
    None when it fails even at ``hi_kb``."""
    tries = []
    if not probe(hi_kb):
        return None, [(hi_kb, False)]
    tries.append((hi_kb, True))
    good, bad = hi_kb, lo_kb - STEP_KB
    while good - bad > STEP_KB:
        mid = (good + bad) // 2 // STEP_KB * STEP_KB
        if mid <= bad:
            mid = bad + STEP_KB
        ok = probe(mid)
        tries.append((mid, ok))
        if ok:
            good = mid
        else:
            bad = mid
    return good, tries


# -- the jobs -----------------------------------------------------------------------------------

def boot_and_charge(kb: int, workdir: Path) -> bool:
    d = Path(tempfile.mkdtemp(prefix=f"boot-{kb}-", dir=workdir))
    try:
        with SimCharger({"charger_id": "mem-boot", "unit_rating_a": 32, "installer_max_a": 32},
                        d, heap=f"{kb}K", restart_on_exit=False) as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            _wait(ch, lambda s: s["state"] == "C" and s["relay"] and s["measured_a"] > 0, 10)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                ch.poll(0.1)
            alive = ch.proc.poll() is None
        return alive and _log_ok([d])
    except RuntimeError:
        return False


def _tls_setup(workdir: Path):
    from evse_tools.server import secure
    d = workdir / "tls-setup"
    if not d.exists():
        secure.setup(d, [brokers.LOCALHOST], ["tls-1"])
    port = brokers.free_port()
    b = brokers.start_mosquitto(extra_conf=secure.mosquitto_conf_text(d, port, brokers.LOCALHOST),
                                workdir=Path(tempfile.mkdtemp(prefix="tls-broker-", dir=workdir)))
    return d, port, b


def tls_session(kb: int, workdir: Path, b=None, setup=None) -> bool:
    d, port = setup
    dev = Path(tempfile.mkdtemp(prefix=f"tls-{kb}-", dir=workdir))
    (dev / "secrets.json").write_text(json.dumps({
        "mqtt_user": "tls-1", "mqtt_password": (d / "passwords" / "tls-1").read_text().strip(),
        "ca_cert": (d / "ca.pem").read_text()}))
    settings = {"charger_id": "tls-1", "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": 10,
                "mqtt_host": b.host, "mqtt_port": port, "keepalive_s": 10, "mqtt_tls": True}
    try:
        with SimCharger(settings, dev, heap=f"{kb}K", restart_on_exit=False) as ch:
            ch.wait_ready()
            end = time.monotonic() + 15
            log = dev / "firmware.log"
            while time.monotonic() < end and "mqtt connected" not in log.read_text(errors="replace"):
                ch.poll(0.1)
            if "mqtt connected" not in log.read_text(errors="replace"):
                return False
            pub = _publisher_tls(b, d, port)
            try:
                pub.publish("evse/tls-1/set", json.dumps({"v": 1, "epoch": 1, "seq": 1, "current_a": 20}),
                            qos=1)
                _wait(ch, lambda s: s["limit_a"] == 20 and s["limit_by"] == "setpoint", 10)
            finally:
                pub.loop_stop()
                pub.disconnect()
            alive = ch.proc.poll() is None
        return alive and _log_ok([dev])
    except RuntimeError:
        return False


def _publisher_tls(b, d: Path, port: int):
    """A paho client logged in as the server over the same TLS listener."""
    import paho.mqtt.client as mqtt

    from evse_tools.server.secure import SERVER_USER
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.tls_set(ca_certs=str(d / "ca.pem"))
    c.username_pw_set(SERVER_USER, (d / "passwords" / SERVER_USER).read_text().strip())
    c.connect(b.host, port)
    c.loop_start()
    return c


def _bundle(workdir: Path, version: str) -> tuple[Path, Path]:
    keys = workdir / "keys"
    if not keys.exists():
        ota.keygen(keys)
    files = ota.default_files()
    vfile = workdir / f"version-{version}.py"
    vfile.write_text('FW = "%s"\n' % version)
    files["firmware/version.py"] = vfile
    out = workdir / "bundles" / version
    if not out.exists():
        ota.build(keys / "ota_private.pem", version, files, out)
    return out, keys / "ota_key.json"


def _on_broker(cid: str, dev: Path, b, kb: int) -> SimCharger:
    """A charger on broker ``b`` at a ``kb`` KB heap, started in ``dev`` and
    given up to 10 s to connect (RuntimeError when it does not even boot)."""
    ch = SimCharger({"charger_id": cid, "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": 10,
                     "mqtt_host": b.host, "mqtt_port": b.port, "keepalive_s": 10},
                    dev, heap=f"{kb}K", restart_on_exit=False)
    try:
        ch.wait_ready()
        end = time.monotonic() + 10
        while time.monotonic() < end and "mqtt connected" not in (dev / "firmware.log").read_text():
            ch.poll(0.1)
    except BaseException:
        ch.close()
        raise
    return ch


def ota_install(kb: int, workdir: Path, b=None) -> bool:
    bundle, pub_key = _bundle(workdir, "99.0.0")
    dev = Path(tempfile.mkdtemp(prefix=f"ota-{kb}-", dir=workdir))
    shutil.copy(pub_key, dev / "ota_key.json")
    server, base = ota.serve(bundle.parent)
    pub = _publisher(b)
    try:
        with _on_broker("ota-m", dev, b, kb) as ch:
            pub.publish("evse/ota-m/cmd", json.dumps({"v": 1, "cmd": "ota", "url": base + "/99.0.0/",
                                                      "version": "99.0.0"}), qos=1)
            end = time.monotonic() + 30
            while time.monotonic() < end and ch.proc.poll() is None:
                ch.poll(0.1)
                if (dev / "ota.json").exists():
                    break
        state = json.loads((dev / "ota.json").read_text()) if (dev / "ota.json").exists() else {}
        return state.get("version") == "99.0.0" and _log_ok([dev])
    except RuntimeError:       # it did not even boot at this heap
        return False
    finally:
        server.shutdown()
        pub.loop_stop()
        pub.disconnect()


def ota_slot_boot(kb: int, workdir: Path, b=None) -> bool:
    bundle, _ = _bundle(workdir, "99.0.0")
    dev = Path(tempfile.mkdtemp(prefix=f"slot-{kb}-", dir=workdir))
    slot = dev / "ota" / "a"
    shutil.copytree(bundle / "files", slot)
    (slot / "complete").write_text("99.0.0")
    (dev / "ota.json").write_text(json.dumps({"active": "a", "previous": "factory", "pending": False,
                                              "boots": 0, "version": "99.0.0", "rolled_back": None}))
    try:
        with _on_broker("slot-m", dev, b, kb) as ch:
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            _wait(ch, lambda s: s["state"] == "C" and s["relay"], 10)
            ran_slot = str(slot) in ch.ask({"cmd": "code"}, "code")
            alive = ch.proc.poll() is None
        return ran_slot and alive and _log_ok([dev])
    except RuntimeError:
        return False


def garage(kb: int, workdir: Path, b=None) -> bool:
    from evse_tools.sim.run import SCENARIOS, LoadGroupSim, summarize
    from evse_tools.sim.scenario import load
    d = Path(tempfile.mkdtemp(prefix=f"garage-{kb}-", dir=workdir))
    os.environ["EVSE_HEAP"] = f"{kb}K"
    try:
        with LoadGroupSim(load(SCENARIOS / "garage.toml"), b, d, out=lambda *_: None) as sim:
            rec = sim.run()
            resets = sum(ch.resets for ch in sim.chargers.values())
    except RuntimeError as exc:         # a charger that never became ready: a failed try
        print(f"    garage at {kb} KB: {exc}", flush=True)
        return False
    finally:
        os.environ.pop("EVSE_HEAP", None)
    s = summarize(rec)
    both_20 = any(all(abs(c["pilot_a"] - 20) < 0.05 for c in smp.chargers.values())
                  for smp in rec.samples if len(smp.chargers) == 2)
    return resets == 0 and s["seconds_above_breaker"] == 0 and both_20 and _log_ok([d])


def quick_faults(kb: int, workdir: Path) -> bool:
    out = workdir / f"faults-{kb}.json"
    r = subprocess.run([sys.executable, "-m", "evse_tools.faultsuite", "--quick", "--out", str(out)],
                       env=dict(os.environ, EVSE_HEAP=f"{kb}K"), capture_output=True, text=True)
    return r.returncode == 0


def descending(probe, sizes=(48, 40, 32)) -> tuple[int | None, list[tuple[int, bool]]]:
    """Try ``sizes`` from the largest down, stopping at the first failure."""
    best, tries = None, []
    for kb in sizes:
        ok = probe(kb)
        tries.append((kb, ok))
        if not ok:
            break
        best = kb
    return best, tries


# -- live heap, code size, allocation per tick --------------------------------------------------

def live_heap(b, workdir: Path) -> dict:
    """Live heap (``gc.mem_alloc()`` after ``gc.collect()``) of a charging
    charger on the broker at :data:`GOAL_KB`: steady, and the largest sample
    (about 20 a second) while the broker is killed and restarted."""
    with _charger(b, workdir, "live-1") as ch:
        ch.wait_ready()
        ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
        time.sleep(4)
        steady = [m for m in (_mem(ch) for _ in range(10)) if m]
        peak = max(steady)
        b.kill()
        end = time.monotonic() + 4
        while time.monotonic() < end:
            peak = max(peak, _mem(ch) or 0)
        b.start()
        end = time.monotonic() + 6
        while time.monotonic() < end:
            peak = max(peak, _mem(ch) or 0)
    return {"steady_bytes": min(steady), "peak_bytes": peak}


def tick_allocation(workdir: Path) -> dict:
    """Bytes allocated in steady state on the device runtime, charging at
    20 A from the server (``tests/fw/steady.py``): by 1,000 control ticks,
    by 400 iterations of the whole loop (tick, write-behind, every edge)
    between two reports, and by one iteration that sends a report."""
    fw = REPO / "tests" / "fw"
    r = subprocess.run([micropython_cmd(), "-X", "heapsize=256K", "-c",
                        "import steady; print(*steady.measure())"], cwd=fw,
                       env=dict(device_env(), MICROPYPATH=".frozen:" + str(fw)),
                       capture_output=True, text=True, check=True)
    tick, loop, report = (int(x) for x in r.stdout.split())
    return {"ticks": 1000, "tick_bytes": tick, "loop_iterations": 400, "loop_bytes": loop,
            "report_bytes": report}


def code_sizes(workdir: Path) -> dict:
    """``.mpy`` bytes of the device firmware (mpy-cross v1.28.0) and the
    frozen firmware's share of the device runtime (its compiled .mpy)."""
    total, n = 0, 0
    for p in sorted((REPO / "firmware").rglob("*.py")):
        rel = p.relative_to(REPO).as_posix()
        total += len(compile_mpy(p, workdir / "mpy" / (rel[:-3] + ".mpy"), rel))
        n += 1
    # Only the modules the firmware has now: the build folder keeps the .mpy
    # of modules since moved or removed.
    frozen_root = RUNTIME_DIR / "unix" / "frozen_mpy"
    frozen = [frozen_root / (p.relative_to(REPO).as_posix()[:-3] + ".mpy")
              for p in (REPO / "firmware").rglob("*.py")]
    frozen_bytes = sum(f.stat().st_size for f in frozen if f.is_file())
    return {"mpy_files": n, "mpy_bytes": total, "frozen_firmware_bytes": frozen_bytes}


# -- the part -----------------------------------------------------------------------------------

def run(quick: bool = True) -> dict:
    res: dict = {"goal_kb": GOAL_KB, "esp32_start_kb": ESP32_START_KB}
    with tempfile.TemporaryDirectory(prefix="evse-mem-") as tmp:
        tmp = Path(tmp)
        b = brokers.start_mosquitto(workdir=tmp / "broker")
        d, port, tb = _tls_setup(tmp)
        try:
            jobs = [
                ("boot_and_charge", lambda kb: boot_and_charge(kb, tmp), 16, 64),
                ("tls_session", lambda kb: tls_session(kb, tmp, tb, (d, port)), 16, 64),
                ("ota_install", lambda kb: ota_install(kb, tmp, b), 16, 64),
                ("ota_slot_boot", lambda kb: ota_slot_boot(kb, tmp, b), 48, 128),
            ]
            res["smallest"] = {}
            for name, probe, lo, hi in jobs:
                t0 = time.monotonic()
                kb, tries = smallest_heap(probe, lo, hi)
                res["smallest"][name] = {"kb": kb, "tries": tries, "s": round(time.monotonic() - t0)}
                print(f"  {name}: {kb} KB ({len(tries)} tries)", flush=True)
            sizes = (GOAL_KB,) if quick else (48, 40, 32)
            for name, probe in (("garage", lambda kb: garage(kb, tmp, b)),
                                ("quick_faults", lambda kb: quick_faults(kb, tmp))):
                t0 = time.monotonic()
                kb, tries = descending(probe, sizes)
                res["smallest"][name] = {"kb": kb, "tries": tries, "s": round(time.monotonic() - t0),
                                         "searched": list(sizes)}
                print(f"  {name}: {kb} KB (tried {tries})", flush=True)
            res["live"] = live_heap(b, tmp)
        finally:
            b.close()
            tb.close()
        res["tick"] = tick_allocation(tmp)
        res["code"] = code_sizes(tmp)
    res["slot_heap"] = SLOT_HEAP
    return res


def table(r: dict) -> str:
    goal = r["goal_kb"]
    labels = {"boot_and_charge": "boot and charge (no server)", "tls_session": "TLS session to mosquitto",
              "ota_install": "OTA download and install", "ota_slot_boot": "OTA slot boot (bytecode in RAM)",
              "garage": "garage end to end", "quick_faults": "quick fault suite"}
    rows = []
    for name, v in r["smallest"].items():
        kb = v["kb"]
        if "searched" in v:
            low = min(v["searched"])
            if kb is None:
                fig = f"fails at {max(v['searched'])} KB"
            elif kb == low:
                fig = f"<= {kb} KB (passes at every size tried: {', '.join(map(str, v['searched']))})"
            else:
                fig = f"{kb} KB (fails at {kb - 8} KB)"
        else:
            fig = f"{kb} KB" if kb is not None else "fails at the top of the search"
        verdict = "" if kb is None else ("  within the goal" if kb <= goal else f"  OVER the {goal} KB goal")
        rows.append((f"smallest heap: {labels[name]}", fig + verdict))
    live = r["live"]
    rows.append(("live heap, charging on the broker (48 KB cap)", "%d bytes steady, %d peak (broker restart)" % (
        live["steady_bytes"], live["peak_bytes"])))
    t = r["tick"]
    rows.append(("allocation, 1,000 steady control ticks (charging)", "%d bytes" % t["tick_bytes"]))
    rows.append(("allocation, 400 loop iterations with every edge", "%d bytes between reports; %d bytes "
                 "per report (every 5 s when nothing changes)" % (t["loop_bytes"], t["report_bytes"])))
    c = r["code"]
    rows.append(("firmware .mpy (mpy-cross v1.28.0)", "%d bytes in %d files" % (c["mpy_bytes"], c["mpy_files"])))
    rows.append(("frozen firmware in the image", "%d bytes of bytecode (flash, not heap)" % c["frozen_firmware_bytes"]))
    rows.append(("the goal", f"{goal} KB, below the ESP32's initial {r['esp32_start_kb']} KB heap"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)
