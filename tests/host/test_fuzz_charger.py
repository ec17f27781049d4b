"""Property-based fuzzing (hypothesis) of everything the charger reads from
the network or from flash (C3, C4, C5, C9; issue 6).

Messages go in as they arrive: the bytes of an MQTT PUBLISH pass the link's
framer (which sees the retain flag), the link queues the payload, and the
server bridge queues it for the core, which applies it at its next tick, with the repo's FakeClock
(2^30 ms ticks) started anywhere, near the wrap included.

The setpoint's verdict is checked against an independent reference built on
CPython's strict ``json`` (no NaN, no duplicate keys, no lone surrogates,
numbers without exponent and with at most 2 decimals, nesting at most 4,
ASCII, 512 bytes). A refused message must change nothing: the limit in
force, the applied epoch and seq, offline and start current, the moment the
watchdog would fall back to the offline current, and the bytes on flash.

CPython only (hypothesis). The corpus of cases found lives in tests/corpus/
and is replayed on both runtimes by tests/fw/test_corpus_replay.py.
``EVSE_FUZZ_EXAMPLES=N`` runs N examples per property instead of the CI's few.
"""
import json
import math
import os

from fakes import CutFs, FakeClock, PERIOD
from harness import make_store
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from firmware.core import charger as app
from firmware.core import faults
from firmware.ota import update as ota
from firmware.ota import verify as ota_verify
from firmware.ota import boot as otaboot
from firmware.core import settings
from simboard.board import SimBoard
from firmware.net.mqtt import MqttLink
from firmware.net.bridge import OtaEdge, ServerBridge

FUZZ = hsettings(max_examples=int(os.environ.get("EVSE_FUZZ_EXAMPLES", "400")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FW = "1.0.0"
PRESET = {"unit_rating_a": 40, "installer_max_a": 32, "t_wd_s": 30}
TOPICS = {"set": b"evse/bay-1/set", "cmd": b"evse/bay-1/cmd", "state": b"evse/bay-1/state",
          "online": b"evse/bay-1/online"}

# -- input strategies ------------------------------------------------------------

HOSTILE_NUMBERS = ["0", "-0", "-0.0", "5.999", "5.99", "6", "6.0001", "6.01", "80", "81", "1e309",
                   "1e2", "NaN", "Infinity", "-Infinity", "-1", "true", "false", "null", '"16"',
                   "9" * 40, "9" * 400, "1" + "0" * 39, "016", "1.", ".5", "[]", "{}", "1.00", "2147483648"]
HOSTILE_PAYLOADS = [b"", b" ", b"0", b"null", b"true", b"[]", b"{}", b'"32"', b"\xef\xbb\xbf{}",
                    b"\xff", b"[" * 1000 + b"]" * 1000, b"{" * 300, b"A" * 4096,
                    b'{"v":1,"epoch":7,"seq":9,"current_a":40,"current_a":0}',
                    b'{"v":1,"epoch":7,"seq":9,"current_a":16,"x":"\\ud800"}',
                    b'{"v":1 "epoch":7,"seq":9,"current_a":16}',
                    b'{"v":1,"epoch":7,"seq":9,"current_a":16,}']

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(10 ** 50), 10 ** 50)
           | st.floats() | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
amps = (st.integers(0, 100) | st.integers(0, 10000).map(lambda c: c / 100)
        | st.sampled_from([5.999, 6.0001, -0.0, 1e309, float("nan"), -1, True, False, None, "8"]))


def _num(x):
    return json.dumps(x) if not isinstance(x, float) or math.isfinite(x) else repr(x)


def _mostly(draw, good, bad, odds=6):
    """A value from ``good``, or one time in ``odds`` from ``bad``."""
    return draw(bad) if draw(st.integers(1, odds)) == odds else draw(good)


good_amps = st.integers(0, 100) | st.integers(0, 10000).map(lambda c: c / 100)
stored_amps = st.sampled_from([0, 6, 8, 16, 80, 6.5, 12.25])


@st.composite
def setpoint_texts(draw):
    """A near-valid setpoint: the right fields, any of them hostile, in any
    order, spelt out by hand so that duplicate keys and raw number tokens fit."""
    hostile = st.sampled_from(HOSTILE_NUMBERS)
    fields = [("v", _mostly(draw, st.just("1"), st.sampled_from(["2", "0", "1.0", '"1"', "null", "true"]))),
              ("epoch", _mostly(draw, st.sampled_from(["5", "6", "7", "8"]), hostile)),
              ("seq", _mostly(draw, st.integers(0, 30).map(str), hostile)),
              ("current_a", _mostly(draw, good_amps.map(_num), amps.map(_num) | hostile, 4))]
    for name in ("offline_a", "start_a"):
        if draw(st.integers(0, 3)) == 0:
            fields.append((name, _mostly(draw, stored_amps.map(_num), amps.map(_num) | hostile, 3)))
    if draw(st.integers(0, 3)) == 0:
        fields.append((draw(st.text(max_size=6)), json.dumps(draw(json_values))))
    if draw(st.integers(0, 9)) == 9:
        fields = [f for f in fields if f[0] != draw(st.sampled_from(["v", "epoch", "seq", "current_a"]))]
    if draw(st.integers(0, 9)) == 9 and fields:
        fields.append(draw(st.sampled_from(fields)))           # a key twice
    fields = draw(st.permutations(fields))
    sep = draw(st.sampled_from([",", ", ", ",\n"]))
    text = "{" + sep.join("%s:%s" % (json.dumps(k), v) for k, v in fields) + "}"
    cut = draw(st.integers(0, 15))
    if cut == 15:
        text = text[:draw(st.integers(0, len(text)))]          # truncated
    elif cut == 14:
        text = draw(st.sampled_from([" ", "\t", "\xef\xbb\xbf", "\x00"])) + text
    return text.encode("utf-8", "surrogatepass")


set_payloads = st.one_of(setpoint_texts(), setpoint_texts(), setpoint_texts(), st.binary(max_size=600),
                         st.sampled_from(HOSTILE_PAYLOADS), json_values.map(lambda v: json.dumps(v).encode()))
rarely = st.integers(0, 9).map(lambda n: n == 9)


# -- the reference verdict (CPython's json, independent of firmware code) -------

class Refused(Exception):
    pass


def _no_dup(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Refused("duplicate key")
    return dict(pairs)


def _float_token(tok):
    if "e" in tok or "E" in tok or len(tok.split(".")[1]) > 2:
        raise Refused("number format")
    return float(tok)


def _nan(tok):
    raise Refused("non-finite literal")


def _depth(x):
    """Nesting depth of a parsed value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(x, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _texts(x):
    """Every string in a parsed value, keys included, without recursion."""
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            yield from v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            yield v


def reference_set(data, prior):
    """The C3 verdict: ``(epoch, seq, current_a, offline_a, start_a)`` or Refused."""
    if len(data) > 512 or any(b >= 0x80 for b in data):
        raise Refused("size or non-ASCII")
    try:
        obj = json.loads(data.decode("ascii"), object_pairs_hook=_no_dup, parse_float=_float_token,
                         parse_constant=_nan)
    except (ValueError, RecursionError) as exc:
        raise Refused(str(exc))
    if _depth(obj) > 4 or any(0xD800 <= ord(c) <= 0xDFFF for t in _texts(obj) for c in t):
        raise Refused("depth or surrogate")
    if type(obj) is not dict or type(obj.get("v")) is not int or obj["v"] != 1:
        raise Refused("not a v1 object")
    for name in ("epoch", "seq"):
        if type(obj.get(name)) is not int or obj[name] < 0:
            raise Refused(name)
    out = []
    for name in ("current_a", "offline_a", "start_a"):
        if name not in obj:
            if name == "current_a":
                raise Refused("no current_a")
            out.append(None)
            continue
        x = obj[name]
        if type(x) not in (int, float) or not -3.4e38 < x < 3.4e38 or x < 0:
            raise Refused(name)
        if name != "current_a" and x != 0 and not 6 <= x <= 80:
            raise Refused(name)
        out.append(x)
    if prior is not None and (obj["epoch"] < prior[0] or (obj["epoch"] == prior[0] and obj["seq"] <= prior[1])):
        raise Refused("stale")
    return (obj["epoch"], obj["seq"], *out)


# -- the charger as it runs ------------------------------------------------------

class Rig:
    def __init__(self, start_ms):
        self.clock = FakeClock(start_ms)
        self.board = SimBoard(self.clock)
        self.fs = CutFs()
        self.store = make_store(PRESET, self.fs)
        self.charger = app.Charger(self.board, self.clock, self.store)
        self.link = MqttLink("bay-1", "broker", 1883, TOPICS, clock=self.clock,
                             client_factory=lambda *a: None)
        self.reboots = 0
        self.updater = ota.Updater("", FW, self.fs)
        self.updater._run = lambda req: None           # never downloads
        self.bridge = ServerBridge(self.charger, self.link, "bay-1", FW, self.updater)
        self.ota = OtaEdge(self.charger, self.updater, None, FW)

    def tick(self):
        """One control tick and the write-behind, as the control loop runs
        them; a reboot (the stop path's SystemExit(3)) is counted."""
        try:
            self.charger.tick()
        except SystemExit as exc:
            assert exc.args[0] == 3, exc.args
            self.reboots += 1
        self.charger.writer.flush()

    def run_ms(self, ms):
        for _ in range(ms // app.TICK_MS):
            self.tick()
            self.bridge.poll()
            self.ota.poll()
            self.clock.advance(app.TICK_MS)

    def arrive(self, topic, payload, retain=False, qos=1):
        """One PUBLISH from the broker, as umqtt.simple reads it: the framer
        sees the bytes, then the callback gets topic and payload."""
        body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x01" if qos else b"") + payload
        n, length = len(body), b""
        while True:
            n, byte = n >> 7, n & 0x7F
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                break
        self.link.framer.feed(bytes([0x30 | qos << 1 | int(retain)]) + length + body)
        self.link._on_message(topic, payload)
        for _ in range(2):           # the bridge queues; the core carries it out at its tick
            self.bridge.poll()
            self.ota.poll()
            self.tick()

    def snapshot(self):
        a = self.charger.arbiter
        now = self.clock.ticks_ms()
        fallback_at = self.clock.ticks_add(now, self.store["t_wd_s"] * 1000 - a.lease_age_ms(now))
        return {"epoch": a.epoch, "seq": a.ack_seq, "setpoint": a._setpoint_a, "limit": a.limit(now),
                "online": a.online(now), "fallback_at": fallback_at,
                "offline_a": self.store["offline_a"], "start_a": self.store["start_a"],
                "t_wd_s": self.store["t_wd_s"], "files": dict(self.fs.files),
                "fault": self.charger.evse.fault, "ota": self.updater.status,
                "reboot": (self.reboots, self.bridge._reboot_pending)}


def _prior(rig, draw_prior):
    if draw_prior is None:
        return None
    epoch, seq, amps_ = draw_prior
    assert rig.charger.on_setpoint(json.dumps({"v": 1, "epoch": epoch, "seq": seq, "current_a": amps_}).encode())
    return (epoch, seq)


priors = st.none() | st.tuples(st.integers(5, 8), st.integers(0, 20), st.integers(0, 48))
starts = st.integers(0, PERIOD - 1) | st.integers(PERIOD - 40000, PERIOD - 1)


@FUZZ
@given(payload=set_payloads, prior=priors, start=starts, wait=st.integers(0, 40000),
       retain=rarely, qos=st.integers(0, 1))
def test_setpoint_as_delivered_gets_the_reference_verdict_and_a_refusal_changes_nothing(
        payload, prior, start, wait, retain, qos):
    rig = Rig(start)
    rig.run_ms(200)
    prior = _prior(rig, prior)
    rig.clock.advance(wait)
    before = rig.snapshot()
    refused = rig.charger.arbiter.rejected
    rig.arrive(TOPICS["set"], payload, retain, qos)
    try:
        want = reference_set(payload, prior)
    except Refused:
        want = None
    after = rig.snapshot()
    event("retained or empty" if retain or not payload else "refused" if want is None else "accepted")
    if retain or not payload:
        assert after == before        # retained (§4) or empty (a retained-message clear): ignored
        assert rig.charger.arbiter.rejected == refused
        return
    if want is None:
        assert after == before, rig.charger.arbiter.last_error
        assert rig.charger.arbiter.rejected == refused + 1
        return
    epoch, seq, current, offline, start_a = want
    assert rig.charger.arbiter.rejected == refused, rig.charger.arbiter.last_error
    assert (after["epoch"], after["seq"], after["setpoint"]) == (epoch, seq, current)
    now = rig.clock.ticks_ms()
    assert after["fallback_at"] == rig.clock.ticks_add(now, 30000)      # the lease is renewed
    cap = min(current, 32)
    assert after["limit"] == ((0, "pause") if cap < 6 else (cap, "unit" if current > 32 else "setpoint"))
    assert after["offline_a"] == (before["offline_a"] if offline is None else offline)
    assert after["start_a"] == (before["start_a"] if start_a is None else start_a)
    stored = settings.Settings("settings.json", settings.SCHEMA, CutFs(dict(rig.fs.files)))
    assert (stored["offline_a"], stored["start_a"]) == (after["offline_a"], after["start_a"])


@FUZZ
@given(payload=set_payloads, start=starts, silence=st.integers(0, 60000))
def test_refused_setpoints_never_hold_off_the_fallback_to_the_offline_current(payload, start, silence):
    rig = Rig(start)
    rig.charger.on_setpoint(b'{"v":1,"epoch":9,"seq":50,"current_a":32,"offline_a":6}')
    fed_at = rig.clock.ticks_ms()
    rig.clock.advance(silence)
    rig.arrive(TOPICS["set"], payload)
    try:
        reference_set(payload, (9, 50))
        return                                       # accepted: a real renewal
    except Refused:
        pass
    rig.charger.tick()
    gone = rig.clock.ticks_diff(rig.clock.ticks_ms(), fed_at)
    if gone >= 30000:
        assert (rig.charger.limit_a, rig.charger.limit_by) == (6, "offline")
    else:
        assert rig.charger.limit_by in ("setpoint", "unit")
    rig.clock.advance(max(0, 30000 - gone))
    rig.charger.tick()
    assert (rig.charger.limit_a, rig.charger.limit_by) == (6, "offline")


# -- commands ---------------------------------------------------------------------

@st.composite
def cmd_texts(draw):
    cmd = _mostly(draw, st.sampled_from(["reset_fault", "config", "reboot", "ota"]),
                  st.sampled_from(["explode", "", "REBOOT", "reboot "]))
    msg = {"v": _mostly(draw, st.just(1), st.sampled_from([2, 0, "1", None, True, 1.0])), "cmd": cmd}
    if cmd == "config" or draw(st.integers(0, 5)) == 0:
        name = draw(st.sampled_from(["t_wd_s", "t_wd_s", "t_wd_s", "unit_rating_a", "installer_max_a",
                                     "offline_a", "charger_id", "mqtt_host"]))
        value = draw(st.integers(-5, 700) | st.sampled_from([30.0, 30.5, True, None, "60", 1e309, 10 ** 30]))
        msg["settings"] = draw(st.sampled_from([{name: value}, {}, [name], {name: value, "t_wd_s": 60}]))
    if cmd == "ota" or draw(st.integers(0, 5)) == 0:
        msg["url"] = draw(st.sampled_from(["http://h/b/", "http://h:8080/b", "ftp://h/", "http://",
                                           "http://h:x/", 5, None, "http://" + "h" * 300]))
        msg["version"] = draw(st.sampled_from(["9.9.9", "1.0.1", "1.0.0", "0.9.9", "1.2", "../x", 9, None]))
    text = json.dumps(msg, allow_nan=True)
    if draw(st.integers(0, 9)) == 9:
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode()


cmd_payloads = cmd_texts() | cmd_texts() | st.binary(max_size=1200) | st.sampled_from(HOSTILE_PAYLOADS) | \
    json_values.map(lambda v: json.dumps(v).encode())


def _strict(data):
    try:
        return json.loads(data.decode("ascii"), object_pairs_hook=_no_dup, parse_constant=_nan)
    except (ValueError, Refused, RecursionError):
        return None


@FUZZ
@given(payload=cmd_payloads, start=starts, retain=rarely, prior=priors)
def test_command_as_delivered_never_crashes_and_a_refused_one_changes_nothing(payload, start, retain, prior):
    rig = Rig(start)
    rig.run_ms(100)
    _prior(rig, prior)
    before = rig.snapshot()
    refused = rig.bridge.commands_refused
    rig.arrive(TOPICS["cmd"], payload, retain)
    after = rig.snapshot()
    event("retained or empty" if retain or not payload else
          "refused" if rig.bridge.commands_refused == refused + 1 else "accepted")
    if retain or not payload:
        assert after == before and rig.bridge.commands_refused == refused
        return
    if rig.bridge.commands_refused == refused + 1:
        assert after == before
        return
    # Accepted: a strict-JSON v1 object naming a known command.
    msg = _strict(payload)
    assert type(msg) is dict and type(msg.get("v")) is int and msg["v"] == 1, payload
    assert len(payload) <= 1024 and msg["cmd"] in ("reset_fault", "config", "reboot", "ota")
    # No command feeds the watchdog or raises the limit in force.
    for key in ("epoch", "seq", "setpoint", "limit", "online", "offline_a", "start_a"):
        assert after[key] == before[key], key
    moved = (after["t_wd_s"] - before["t_wd_s"]) * 1000
    assert after["fallback_at"] == rig.clock.ticks_add(before["fallback_at"], moved)
    if msg["cmd"] == "config":
        assert list(msg["settings"]) == ["t_wd_s"]
        t = msg["settings"]["t_wd_s"]
        assert type(t) is int and 10 <= t <= 600 and after["t_wd_s"] == t
        assert json.loads(rig.fs.files["settings.json"])["t_wd_s"] == t
    else:
        assert after["files"] == before["files"] and after["t_wd_s"] == before["t_wd_s"]
    if msg["cmd"] == "ota":
        assert msg["url"].startswith("http://") and len(msg["url"]) <= 200
        assert ota_verify.is_upgrade(msg["version"], FW) and after["ota"] == "running"
    if msg["cmd"] == "reboot":
        assert after["reboot"] == (1, False) and rig.board.relay is False


@FUZZ
@given(payload=set_payloads | cmd_payloads, topic=st.sampled_from([b"evse/bay-1/set", b"evse/bay-1/cmd"]))
def test_retained_set_or_cmd_is_dropped_by_the_link_whatever_it_holds(payload, topic):
    rig = Rig(PERIOD - 5000)
    before = rig.snapshot()
    dropped = rig.link.retained_dropped
    rig.arrive(topic, payload, retain=True)
    assert rig.snapshot() == before
    assert rig.link.retained_dropped == dropped + (1 if payload else 0)


# -- files on flash -----------------------------------------------------------------

file_bytes = (st.binary(max_size=300) | st.sampled_from(HOSTILE_PAYLOADS)
              | json_values.map(lambda v: json.dumps(v).encode())
              | st.dictionaries(st.sampled_from(sorted(settings.SCHEMA) + sorted(settings.SECRETS)),
                                json_values | st.sampled_from([0, 6, 8, 80, 81, 5.999, 600, 10])).map(
                                    lambda d: json.dumps(d).encode()))


def _valid(name, value, schema):
    try:
        return schema[name][1](value, name) == value
    except ValueError:
        return False


@FUZZ
@given(data=file_bytes, which=st.sampled_from(["settings.json", "secrets.json"]), as_text=st.booleans())
def test_any_settings_or_secrets_file_loads_to_valid_values_and_is_never_rewritten(data, which, as_text):
    content = data.decode("utf-8", "replace") if as_text else data
    fs = CutFs({which: content})
    schema = settings.SCHEMA if which == "settings.json" else settings.SECRETS
    store = settings.Settings(which, schema, fs)
    assert fs.files == {which: content} and fs.steps == []
    parsed = _strict(content.encode("utf-8", "surrogatepass") if as_text else data)
    if len(content) > settings.MAX_FILE or _depth(parsed) > 4 or any(
            0xD800 <= ord(c) <= 0xDFFF for t in _texts(parsed) for c in t):
        parsed = None
    for name in schema:
        if isinstance(parsed, dict) and name in parsed and _valid(name, parsed[name], schema):
            assert store[name] == parsed[name], name
        else:
            assert store[name] == schema[name][0], name       # its own default, never the unit max
    if which == "settings.json":
        assert store["start_a"] == 0 or 6 <= store["start_a"] <= 80


@FUZZ
@given(data=st.binary(max_size=80) | st.sampled_from([b"gfci", b"relay_welded\n", b"", b" ", b"\n\n",
                                                      b"GFCI", b"\xff"]),
       reason=st.sampled_from(["watchdog", "crash", "reboot", "power_on"]))
def test_any_lockout_record_never_lifts_a_lockout_except_a_power_cycle(data, reason):
    clock = FakeClock()
    board = SimBoard(clock)
    board.reset_reason = reason
    store = make_store(PRESET, CutFs({"lockout.json": data}))
    c = app.Charger(board, clock, store)
    c.tick()
    if reason == "power_on" or not data:
        assert c.evse.fault is None and not c.safety.lockout
        return
    code = data.strip()
    if code and len(code) <= 32 and all(ch in b"abcdefghijklmnopqrstuvwxyz0123456789_" for ch in code):
        assert c.evse.fault == code.decode()
    else:
        assert c.evse.fault == faults.LOCKOUT_UNREADABLE
    assert c.safety.lockout and (c.limit_a, c.limit_by) == (0, "fault") and not board.relay


@FUZZ
@given(data=file_bytes | st.lists(st.lists(json_values, max_size=4), max_size=20).map(
    lambda v: json.dumps(v).encode()))
def test_any_fault_log_loads_to_well_formed_entries_only(data):
    log = faults.FaultLog("faults.json", CutFs({"faults.json": data}))
    entries = log.recent()
    assert len(entries) <= faults.LOG_SIZE
    for e in entries:
        assert type(e) is list and len(e) == 3 and type(e[0]) is int and type(e[1]) is str


slots = st.sampled_from(["a", "b", "factory", "c", "../x", "/", "", None, 1])


@FUZZ
@given(data=file_bytes | st.fixed_dictionaries({}, optional={
    "active": slots, "previous": slots, "pending": json_values, "boots": json_values,
    "version": json_values, "rolled_back": json_values}).map(lambda d: json.dumps(d).encode()),
    complete=st.sets(st.sampled_from(["a", "b"])))
def test_any_ota_slot_record_boots_a_complete_slot_and_never_a_path(data, complete):
    fs = CutFs({"ota.json": data})
    for slot in complete:
        fs.files["ota/%s/complete" % slot] = "9.9.9"
    state = otaboot.read_state("", fs)
    assert state["active"] in ("a", "b", "factory") and state["previous"] in ("a", "b", "factory")
    assert type(state["pending"]) is bool and type(state["boots"]) is int
    slot, path = otaboot.select("", fs)
    assert slot == "factory" or slot in complete
    assert path in (None, "ota/a", "ota/b")
