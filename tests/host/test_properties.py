"""Property-based tests (hypothesis) of the parsers and the limit arbiter (C1, C3, C5).

CPython only: hypothesis does not run on MicroPython; the same modules run
there through tests/fw.
"""
import json
import math

from fakes import CutFs, FakeClock
from harness import make_store
from hypothesis import given, settings as hsettings, strategies as st

from firmware.core import pilot
from firmware.core import setpoint
from firmware.core import settings
from firmware.core.limit import LimitArbiter

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = ("v", "epoch", "seq", "current_a", "offline_a", "start_a")
near_setpoints = st.fixed_dictionaries({}, optional={k: json_scalars for k in FIELDS})


@given(st.binary(max_size=700))
def test_setpoint_parser_never_crashes_on_arbitrary_bytes(data):
    try:
        sp = setpoint.parse(data)
    except ValueError:
        return
    assert math.isfinite(sp.current_a) and sp.current_a >= 0


@given(json_values | near_setpoints)
def test_setpoint_parser_accepts_only_finite_nonnegative_numbers(obj):
    try:
        text = json.dumps(obj)
    except ValueError:
        return
    try:
        sp = setpoint.parse(text.encode())
    except ValueError:
        return
    assert type(sp.current_a) in (int, float) and math.isfinite(sp.current_a) and sp.current_a >= 0
    assert type(sp.seq) is int and type(sp.epoch) is int
    for extra in (sp.offline_a, sp.start_a):
        assert extra is None or extra == 0 or 6 <= extra <= 80


@given(st.floats(allow_nan=False) | st.integers(-10**6, 10**6))
def test_duty_is_off_or_within_6_to_80a_and_never_above_ideal(amps):
    d = pilot.duty_u16(amps)
    assert d == 0 or 6553 <= d <= 62913
    if d:
        assert pilot.ev_reads_a(d) <= min(amps, 80) + 1e-9


@given(st.text(max_size=300) | st.builds(lambda d: json.dumps(d), near_setpoints))
def test_any_settings_file_loads_to_values_inside_the_schema(text):
    store = settings.Settings("settings.json", settings.SCHEMA, CutFs({"settings.json": text}))
    for name, (_default, check) in settings.SCHEMA.items():
        assert check(store[name], name) == store[name]
    assert store["start_a"] == 0 or store["start_a"] >= 6


valid = st.builds(lambda seq, amps, epoch: ("ok", seq, amps, epoch),
                  st.integers(0, 50), st.integers(0, 10000).map(lambda c: c / 100),
                  st.integers(0, 2))
invalid = st.builds(lambda raw: ("bad", raw), st.binary(max_size=40))
advance = st.builds(lambda ms: ("wait", ms), st.integers(0, 20000))
session = st.just(("session",))


@hsettings(max_examples=300)
@given(st.lists(valid | invalid | advance | session, max_size=40), st.integers(0, 1 << 30))
def test_limit_in_force_never_exceeds_unit_cap_and_is_never_below_6a_when_offered(events, start):
    clock = FakeClock(start)
    store = make_store({"unit_rating_a": 32, "installer_max_a": 24, "offline_a": 6, "t_wd_s": 10})
    a = LimitArbiter(clock, store, clock.ticks_ms())
    last_fed = clock.ticks_ms()
    for ev in events:
        if ev[0] == "ok":
            payload = json.dumps({"v": 1, "epoch": ev[3], "seq": ev[1], "current_a": ev[2]}).encode()
            try:
                a.offer(payload, clock.ticks_ms())
                last_fed = clock.ticks_ms()
            except ValueError:
                pass
        elif ev[0] == "bad":
            before = (a.epoch, a.ack_seq, a.lease_age_ms(clock.ticks_ms()))
            try:
                a.offer(ev[1], clock.ticks_ms())
                last_fed = clock.ticks_ms()
            except ValueError:
                assert (a.epoch, a.ack_seq, a.lease_age_ms(clock.ticks_ms())) == before
        elif ev[0] == "wait":
            clock.advance(ev[1])
        else:
            a.start_session()
        amps, why = a.limit(clock.ticks_ms())
        assert amps == 0 or 6 <= amps <= 24, (amps, why)
        assert (amps == 0) == (why == "pause")
        if clock.ticks_diff(clock.ticks_ms(), last_fed) >= 10000:
            assert (amps, why) == (6, "offline")   # the stored offline current, exactly
