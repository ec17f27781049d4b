"""A signed update pushed by the server to a charger on the MicroPython unix
port, end to end (issue 5): deferred while the car charges, downloaded over
HTTP, verified, installed in an A/B slot, switched, the process restarted,
the new ``fw`` reported and kept once healthy; safe throughout."""
import json
import shutil
import subprocess
import sys
import threading
import time

from evse_tools import ota
from evse_tools.charger_sim import SLOT_HEAP, SimCharger
from evse_tools.server import otapush
from evse_tools.server.db import GroupStore

NEW = "9.0.0"


def make_bundle(tmp_path):
    keys = tmp_path / "keys"
    ota.keygen(keys)
    files = ota.default_files()
    version = tmp_path / "version.py"
    version.write_text('FW = "%s"\n"""Firmware version, reported as ``fw`` in the state message."""\n' % NEW)
    files["firmware/version.py"] = version
    bundle = ota.build(keys / "ota_private.pem", NEW, files, tmp_path / "bundles" / "v9")
    return bundle, keys / "ota_key.json"


def test_signed_update_is_deferred_while_charging_then_installed_and_kept(mosquitto, tmp_path):
    bundle, pubkey = make_bundle(tmp_path)
    dev = tmp_path / "dev"
    dev.mkdir()
    shutil.copy(pubkey, dev / "ota_key.json")
    db = tmp_path / "server.db"
    with GroupStore(str(db)) as store:
        store.create_group("g", 50, t_wd_s=10)
        store.add_member("g", "ota-1", 32)
    server = subprocess.Popen([sys.executable, "-m", "evse_tools.server.cli", "--db", str(db), "run",
                               "--broker", f"{mosquitto.host}:{mosquitto.port}"],
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    settings = {"charger_id": "ota-1", "unit_rating_a": 32, "installer_max_a": 32, "t_wd_s": 10,
                "mqtt_host": mosquitto.host, "mqtt_port": mosquitto.port, "keepalive_s": 10,
                "ota_health_s": 5}
    lines = []
    result = []
    try:
        # After the switch it boots the slot: bytecode in RAM (SLOT_HEAP).
        with SimCharger(settings, dev, heap=SLOT_HEAP) as ch:
            ch.wait_ready()
            ch.send({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}})
            samples = []
            t_end = time.monotonic() + 20
            while time.monotonic() < t_end and not any(s["state"] == "C" and s["relay"] and s["pilot_a"] > 8
                                                       for s in samples):
                samples += ch.poll(0.2)
            pusher = threading.Thread(target=lambda: result.append(otapush.push(
                bundle, "ota-1", (mosquitto.host, mosquitto.port), pubkey=pubkey, timeout_s=120,
                out=lines.append)))
            pusher.start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8:                 # charging: the update must wait
                samples += ch.poll(0.2)
            assert any("ota deferred" in l for l in lines), lines
            assert not (dev / "ota.json").exists()
            ch.send({"cmd": "wants", "wants": False})        # the car stops charging (state B)
            while pusher.is_alive() and time.monotonic() - t0 < 120:
                ch.check_watchdog()                          # the board reboots after the switch
                samples += ch.poll(0.2)
            assert result == [0], lines
            assert ch.exits and ch.exits[0] == 3             # it rebooted on its own to switch
            state = json.loads((dev / "ota.json").read_text())
            assert state["active"] == "a" and state["version"] == NEW
            t1 = time.monotonic()                            # healthy for 5 s after a setpoint: kept
            while json.loads((dev / "ota.json").read_text())["pending"] and time.monotonic() - t1 < 30:
                ch.check_watchdog()
                samples += ch.poll(0.2)
            assert json.loads((dev / "ota.json").read_text())["pending"] is False
            # Safe throughout: the contactor only ever closed in C with current
            # offered, and nothing above the unit's 32 A was offered.
            assert all(not s["relay"] or (s["state"] == "C" and s["pilot_a"] > 0) for s in samples)
            assert max(s["pilot_a"] for s in samples) <= 32
    finally:
        server.terminate()
        server.wait(10)
