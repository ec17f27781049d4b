"""Property-based fuzzing (hypothesis) of what the load-group server reads
from chargers: ``evse/<id>/state`` payloads and the topics they come on
(S1, S6; issue 6). Each message goes through :meth:`Service.handle`, as the
main loop hands it over.

- nothing raises out of ``handle``;
- a refused state message is counted and leaves the allocator's knowledge of
  that member (and of every other) exactly as it was;
- an accepted one holds only sane values: a J1772 state, currents finite in
  0..1000 A, counters non-negative integers;
- a message on any other topic changes nothing.

The corpus (tests/corpus/server_state.jsonl) is replayed here too.
"""
import base64
import copy
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from evse_tools.server.db import GroupStore
from evse_tools.server.service import Service

FUZZ = hsettings(max_examples=int(os.environ.get("EVSE_FUZZ_EXAMPLES", "400")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "server_state.jsonl"
_DIR = tempfile.mkdtemp(prefix="evse-fuzz-server-")
_DB = os.path.join(_DIR, "s.db")
with GroupStore(_DB) as _s:
    _s.create_group("g", 50, t_wd_s=30)
    _s.add_member("g", "bay-1", 40)
    _s.add_member("g", "bay-2", 32)

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(10 ** 30), 10 ** 30)
           | st.floats() | st.text(max_size=10))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
FIELDS = {"v": st.sampled_from([1, 1, 1, 2, "1", None, True, 1.0]),
          "state": st.sampled_from(list("ABCDEF")) | st.sampled_from(["G", "c", "", None, 3]),
          "pilot_a": st.floats() | st.integers(-5, 2000), "measured_a": st.floats() | st.integers(-5, 2000),
          "ack_seq": scalars, "ack_epoch": scalars, "offline_a": scalars, "start_a": scalars,
          "session_wh": scalars, "t_wd_s": scalars, "fault": scalars, "relay": scalars,
          "lockout": scalars, "limit_by": scalars, "temp_c": scalars,
          "id": st.sampled_from(["bay-1", "bay-2", "", None, 5])}


def _dump(d):
    return json.dumps(d, allow_nan=True).encode()


state_objects = st.builds(lambda base, over: {**base, **over},
                          st.fixed_dictionaries({"v": st.just(1), "state": st.sampled_from(list("ABCDEF")),
                                                 "pilot_a": st.integers(0, 80),
                                                 "measured_a": st.floats(0, 80)}),
                          st.fixed_dictionaries({}, optional=FIELDS))
payloads = (state_objects.map(_dump) | st.binary(max_size=300)
            | json_values.map(_dump)
            | st.sampled_from([b"", b"null", b"{}", b"\xef\xbb", b"[" * 300 + b"]" * 300, b"A" * 3000,
                               b"[" * 1000 + b"]" * 1000]))


def _service():
    store = GroupStore(_DB)
    svc = Service(store, out=lambda s: None, clock=lambda: 0.0)
    svc.reload(0.0)
    return store, svc


def _knowledge(svc):
    alloc = svc.allocators["g"]
    return copy.deepcopy(alloc.members), dict(svc._config_due)


def _sane(r):
    assert r.state in ("A", "B", "C", "D", "E", "F")
    for x in (r.measured_a, r.pilot_a):
        assert type(x) is float and math.isfinite(x) and 0 <= x <= 1000
    for x in (r.offline_a, r.start_a):
        assert x is None or x == 0 or (type(x) is float and 6 <= x <= 80)   # what a charger stores
    for x in (r.ack_seq, r.ack_epoch, r.t_wd_s):
        assert x is None or (type(x) is int and 0 <= x <= 1 << 62)
    assert type(r.session_wh) is int and r.session_wh >= 0
    assert r.fault is None or type(r.fault) is str
    assert r.relay in (None, True, False) and r.lockout in (True, False)


@FUZZ
@given(first=st.none() | state_objects.map(_dump), payload=payloads, member=st.sampled_from(["bay-1", "bay-2"]))
def test_state_message_never_crashes_the_server_and_a_refused_one_changes_nothing(first, payload, member):
    store, svc = _service()
    try:
        if first is not None:
            svc.handle("evse/%s/state" % member, first, 1.0)
        before = _knowledge(svc)
        rejected = svc.rejected
        svc.handle("evse/%s/state" % member, payload, 2.0)
        after = _knowledge(svc)
        if not payload:
            assert after == before and svc.rejected == rejected     # a retained-message clear
        elif svc.rejected == rejected + 1:
            assert after == before
        else:
            assert svc.rejected == rejected
            sent = json.loads(payload)
            assert sent.get("id", member) == member             # never on another charger's word
            m = svc.allocators["g"].members[member]
            assert m.reported_at == 2.0
            _sane(m.report)
            w = svc.allocators["g"].worst_a(m, 2.0)
            assert math.isfinite(w) and w >= 0
            other = "bay-2" if member == "bay-1" else "bay-1"
            assert after[0][other] == before[0][other]
    finally:
        store.close()


@FUZZ
@given(topic=st.sampled_from(["evse/bay-3/state", "evse/bay-1/set", "evse/bay-1/cmd", "evse/bay-1",
                              "evse/bay-1/state/x", "ev/bay-1/state", "evse//state", "evse/+/state",
                              "evse/#", "", "/", "evse/bay-1/State", "evse/BAY-1/state",
                              "loadgroup/g/state"]) | st.text(max_size=30),
       payload=state_objects.map(_dump))
def test_a_message_on_any_other_topic_changes_nothing(topic, payload):
    if topic in ("evse/bay-1/state", "evse/bay-2/state", "evse/bay-1/online", "evse/bay-2/online"):
        return
    store, svc = _service()
    try:
        before = _knowledge(svc)
        svc.handle(topic, payload, 1.0)
        assert _knowledge(svc) == before
    finally:
        store.close()


def test_server_state_corpus_gets_its_verdict():
    cases = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    assert len(cases) > 50
    for case in cases:
        data = base64.b64decode(case["b64"]) if "b64" in case else case["text"].encode()
        store, svc = _service()
        try:
            before = _knowledge(svc)
            svc.handle("evse/bay-1/state", data, 1.0)
            if case["accept"]:
                assert svc.rejected == 0, case["why"]
                _sane(svc.allocators["g"].members["bay-1"].report)
            else:
                assert _knowledge(svc) == before, case["why"]
                assert data == b"" or svc.rejected == 1, case["why"]
        finally:
            store.close()


@pytest.mark.parametrize("payload", [b"garbage", b"true", b"2", b"", b"1 ", b"0\n"])
def test_online_flag_other_than_0_or_1_is_no_news(payload):
    """Found by fuzzing: any payload but "1" marked a member offline."""
    store, svc = _service()
    try:
        svc.handle("evse/bay-1/online", b"1", 1.0)
        before = _knowledge(svc)
        svc.handle("evse/bay-1/online", payload, 2.0)
        assert _knowledge(svc) == before
    finally:
        store.close()
