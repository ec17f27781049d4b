"""Replays the fuzzing corpus (tests/corpus/*.jsonl) through the firmware's
parsers, as the charger meets them: ``set`` and ``cmd`` payloads delivered
to the server bridge as the MQTT link hands them over, settings and state files
read at boot, OTA paths, versions, manifests and downloads (C3, C5, C9).

Runs on CPython (pytest) and on the MicroPython unix port
(tests/mpy_run.py), so both runtimes must give every case the verdict
written in the corpus. tests/corpus/README.md describes the format.

A refused ``set`` or ``cmd`` must change nothing: the limit in force, the
applied epoch and seq, the offline and start currents, the moment the
watchdog would fall back to the offline current, and the bytes of every
file on flash.
"""
import json
from binascii import a2b_base64

from fakes import CutFs, FakeClock, FakeLink
from harness import make_store

from firmware.core import charger as app
from firmware.core import faults
from firmware.ota import verify as ota_verify
from firmware.ota import boot as otaboot
from firmware.core import settings
from firmware.core import setpoint
from simboard.board import SimBoard
from firmware.ota.update import Updater
from firmware.net.bridge import OtaEdge, ServerBridge

CORPUS = __file__.rsplit("/", 2)[0] + "/corpus" if "/" in __file__ else "../corpus"
PRESET = {"unit_rating_a": 40, "installer_max_a": 40, "t_wd_s": 30}
FW = "1.0.0"


def cases(name):
    out = []
    with open(CORPUS + "/" + name) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    assert out, "empty corpus " + name
    return out


def payload(case):
    if "b64" in case:
        return a2b_base64(case["b64"])
    return case["text"].encode()


class Rig:
    """A charger on a simulated board with an injected clock (5 s before the
    tick wrap), its server bridge, a real OTA Updater that never downloads, and an
    in-memory flash."""

    def __init__(self, files=None, reset_reason="power_on"):
        self.clock = FakeClock()
        self.board = SimBoard(self.clock)
        self.board.reset_reason = reset_reason
        self.fs = CutFs(files)
        self.store = make_store(PRESET, self.fs)
        self.charger = app.Charger(self.board, self.clock, self.store)
        self.link = FakeLink()
        self.reboots = []
        self.updater = Updater("", FW, self.fs)
        self.updater._run = lambda req: None      # no download thread work
        self.bridge = ServerBridge(self.charger, self.link, PRESET.get("charger_id", "evse-1"), FW,
                                   self.updater)
        self.ota = OtaEdge(self.charger, self.updater, None, FW)
        self.charger.tick()
        self.clock.advance(1000)

    def deliver(self, kind, data):
        self.link.inbox.append((kind, data))
        for _ in range(2):             # the bridge queues; the core carries out at its tick
            self.bridge.poll()
            self.ota.poll()
            self.tick()

    def tick(self):
        """One control tick and the write-behind, as the control loop runs them;
        a reboot (the stop path's SystemExit(3)) is counted."""
        try:
            self.charger.tick()
        except SystemExit as exc:
            assert exc.args[0] == 3, exc.args
            self.reboots.append(1)
        self.charger.writer.flush()

    def snapshot(self):
        """Everything a refused message must leave alone."""
        c = self.charger
        a = c.arbiter
        now = self.clock.ticks_ms()
        t_wd_ms = self.store["t_wd_s"] * 1000
        fallback_at = self.clock.ticks_add(now, t_wd_ms - a.lease_age_ms(now))
        return [a.epoch, a.ack_seq, a._setpoint_a, a.limit(now), a.online(now), fallback_at,
                self.store["offline_a"], self.store["start_a"], self.store["t_wd_s"],
                sorted(self.store.values.items()), sorted(self.fs.files.items()),
                c.evse.fault, self.updater.status, len(self.reboots)]


def _expected_limit(amps):
    cap = min(PRESET["unit_rating_a"], PRESET["installer_max_a"])
    a = min(amps, cap)
    return (0, "pause") if a < 6 else (a, "unit" if amps > cap else "setpoint")


def test_setpoint_corpus_gives_the_same_verdict_on_every_runtime_and_a_refusal_changes_nothing():
    for case in cases("setpoint.jsonl"):
        r = Rig()
        for before in case.get("before", []):
            assert r.charger.on_setpoint(before.encode()), (case["why"], before)
            r.clock.advance(100)
        before = r.snapshot()
        refused = r.charger.arbiter.rejected
        r.deliver("set", payload(case))
        want = case["accept"]
        a = r.charger.arbiter
        if want is False:
            assert r.snapshot() == before, case["why"]
            assert a.rejected == refused + 1, case["why"]
            continue
        now = r.clock.ticks_ms()
        assert a.rejected == refused, (case["why"], a.last_error)
        assert (a.epoch, a.ack_seq, a._setpoint_a) == (want["epoch"], want["seq"], want["current_a"]), case["why"]
        assert a.lease_age_ms(now) == 0, case["why"]            # the lease is renewed
        assert a.limit(now) == _expected_limit(want["current_a"]), case["why"]
        assert r.store["offline_a"] == want.get("offline_a", 8), case["why"]
        assert r.store["start_a"] == want.get("start_a", 8), case["why"]


def test_cmd_corpus_gives_the_same_verdict_on_every_runtime_and_a_refusal_changes_nothing():
    for case in cases("cmd.jsonl"):
        r = Rig()
        before = r.snapshot()
        refused = r.bridge.commands_refused
        r.deliver("cmd", payload(case))
        want = case["accept"]
        if want is False:
            assert r.snapshot() == before, case["why"]
            assert r.bridge.commands_refused == refused + 1, case["why"]
            continue
        assert r.bridge.commands_refused == refused, (case["why"], r.charger.events[-1:])
        # No command feeds the watchdog or touches the limit in force; only a
        # new T_wd moves the fallback, by the change of T_wd.
        after = r.snapshot()
        assert after[:5] == before[:5], case["why"]
        moved = (after[8] - before[8]) * 1000
        assert after[5] == r.clock.ticks_add(before[5], moved), case["why"]
        done = want["done"]
        if done == "reboot":
            assert r.reboots == [1] and r.board.pilot_mode == "high" and not r.board.relay
        elif done == "ota":
            assert r.updater.status == "running", case["why"]   # no car: started at once
        elif done == "config":
            assert r.store["t_wd_s"] == want["t_wd_s"], case["why"]
            on_flash = json.loads(r.fs.files["settings.json"])
            assert on_flash["t_wd_s"] == want["t_wd_s"], case["why"]
            if want["t_wd_s"] == PRESET["t_wd_s"]:
                assert after[10] == before[10], "written although nothing changed"


def test_settings_corpus_loads_to_the_values_written_and_never_rewrites_the_file():
    for case in cases("settings.jsonl"):
        name = case["file"]
        data = payload(case)
        text = data.decode() if "text" in case else data
        fs = CutFs({name: text})
        schema = settings.SCHEMA if name == "settings.json" else settings.SECRETS
        store = settings.Settings(name, schema, fs)
        for key in case["expect"]:
            assert store[key] == case["expect"][key], (case["why"], key, store[key])
        assert fs.files == {name: text} and fs.steps == [], case["why"]


def test_state_file_corpus_lockout_fault_log_and_ota_slots_read_as_written():
    for case in cases("state_files.jsonl"):
        name = case["file"]
        data = payload(case)
        text = data.decode() if "text" in case else data
        want = case["expect"]
        if name == "lockout.json":
            r = Rig({name: text}, reset_reason="watchdog")
            c = r.charger
            assert c.evse.fault == want["fault"], (case["why"], c.evse.fault)
            assert c.safety.lockout == (want["fault"] is not None), case["why"]
            if want["fault"] is not None:
                assert c.limit_a == 0 and c.limit_by == "fault" and not r.board.relay, case["why"]
        elif name == "faults.json":
            log = faults.FaultLog(name, CutFs({name: text}))
            assert len(log.recent()) == want["entries"], case["why"]
        else:
            fs = CutFs({name: text})
            st = otaboot.read_state("", fs)
            assert [st["active"], st["pending"], st["boots"]] == [
                want["active"], want["pending"], want["boots"]], case["why"]
            assert fs.steps == [], case["why"]


def test_ota_corpus_paths_versions_manifests_and_downloads_get_their_verdict():
    with open(CORPUS + "/ota_key.json", "rb") as f:
        key = ota_verify.load_key(f.read())
    for case in cases("ota.jsonl"):
        kind = case["kind"]
        want = case["accept"]
        try:
            if kind == "path":
                ota_verify.check_path(case["value"])
            elif kind == "version":
                ota_verify.parse_version(case["value"])
            elif kind == "manifest":
                body = ota_verify.verify_manifest(payload(case), key)
                assert want, case["why"]
                assert (body["version"], len(body["files"])) == (want["version"], want["files"]), case["why"]
            else:
                check = ota_verify.FileCheck(case["size"], case["sha256"])
                data = payload(case)
                for i in range(0, len(data), 3):
                    check.update(data[i:i + 3])
                check.finish()
        except ValueError:
            assert want is False, case["why"]
            continue
        assert want is not False, "accepted: " + case["why"]


# -- hazards found by fuzzing (each also in the corpus) ------------------------

def _refused(data):
    try:
        setpoint.parse(data)
    except ValueError as exc:
        return str(exc)
    return None


def test_setpoint_with_a_duplicate_key_is_refused_so_no_two_parsers_read_different_currents():
    assert "duplicate key" in _refused(b'{"v":1,"epoch":7,"seq":1,"current_a":40,"current_a":0}')
    assert "duplicate key" in _refused(b'{"v":1,"epoch":7,"seq":1,"current_a":0,"\\u0063urrent_a":40}')
    assert _refused(b'{"v":1,"epoch":7,"seq":1,"current_a":16,"x":{"current_a":40}}') is None


def test_lone_surrogate_escape_is_refused_on_both_runtimes():
    for text in (b'"\\ud800"', b'"\\udfff"', b'"\\ud800\\u0041"', b'"\\ud800x"'):
        try:
            settings.strictjson.loads(text)
        except ValueError as exc:
            assert "surrogate" in str(exc), text
            continue
        raise AssertionError("accepted %r" % text)
    assert settings.strictjson.loads(b'"\\ud83d\\ude00"')   # a pair is fine


def test_setpoint_too_large_for_the_chargers_floats_is_refused_on_every_runtime():
    huge = b'{"v":1,"epoch":7,"seq":1,"current_a":' + b"1" + b"0" * 39 + b"}"
    assert "finite" in _refused(huge)
    assert "finite" in _refused(b'{"v":1,"epoch":7,"seq":1,"current_a":' + b"9" * 400 + b"}")
    assert setpoint.parse(b'{"v":1,"epoch":7,"seq":1,"current_a":1000000}').current_a == 1000000


def test_blank_lockout_record_is_a_lockout_not_an_empty_fault_code():
    r = Rig({"lockout.json": "\n"}, reset_reason="watchdog")
    assert r.charger.evse.fault == faults.LOCKOUT_UNREADABLE and r.charger.safety.lockout
    r.charger.tick()
    assert r.charger.limit_a == 0 and r.charger.status()["state"] == "F"


def test_unreadable_lockout_record_keeps_the_charger_locked_out_after_a_watchdog_reset():
    r = Rig({"lockout.json": b"\xff\xfegfci"}, reset_reason="watchdog")
    assert r.charger.evse.fault == faults.LOCKOUT_UNREADABLE and r.charger.safety.lockout
    assert faults.policy(faults.LOCKOUT_UNREADABLE) == faults.LOCKOUT
    fresh = Rig({"lockout.json": b"\xff\xfegfci"}, reset_reason="power_on")
    assert fresh.charger.evse.fault is None       # a power cycle ends any lockout (C9)
