"""Allocator properties (hypothesis): random groups and event sequences, with
the firmware's own limit arbiter as each charger (S1, S3, S4), faults included.

At every 0.1 s step of virtual time:
- S1: the sum over chargers of what each may draw (its limit in force, or
  what its EV still draws) stays within the breaker;
- S4: no setpoint lies strictly between 0 and 6 A;
- S3: the offline currents the chargers have stored sum to at most the limit.
"""
import json

from hypothesis import HealthCheck, example, given, settings, strategies as st

from evse_tools.server.allocator import GroupConfig
from evse_tools.server.db import default_limit
from evse_tools.sim.virtual import VirtualEv, VirtualGroup

BREAKERS = (20, 30, 40, 50, 60, 100)

event = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 5), st.sampled_from((16, 27, 32, 40, 48)),
              st.floats(1.0, 5.0)),
    st.tuples(st.just("leave"), st.integers(0, 5)),
    st.tuples(st.just("taper"), st.integers(0, 5), st.integers(0, 20)),
    st.tuples(st.just("mute"), st.integers(0, 5)),          # the charger stops reporting
    st.tuples(st.just("deaf"), st.integers(0, 5)),          # its acknowledgements never come
    st.tuples(st.just("heal"), st.integers(0, 5)),
    st.tuples(st.just("fault"), st.integers(0, 5), st.integers(1, 30)),   # clears after N s
    st.tuples(st.just("server_down"),),
    st.tuples(st.just("server_restart"),),
    st.tuples(st.just("wait"), st.integers(1, 40)),
)


# Found by this test (issue 6 session), kept as fixed cases:
# a fault cleared while its member still stored an 8 A offline current, and
# the server raised it in the same round as it lowered the other (24 A on 20 A);
FAULT_CLEARS_WITH_OFFLINE_STORED = [("arrive", 0, 16, 1.0), ("arrive", 1, 16, 1.0), ("fault", 0, 2),
                                    ("wait", 3)]
# a member whose reports stopped was counted at the 0 A offline current it
# last reported, while it had stored the 8 A sent after.
SILENT_MEMBER_WITH_UNACKED_OFFLINE = [("arrive", 0, 16, 1.0), ("arrive", 1, 16, 1.0), ("leave", 0),
                                      ("arrive", 0, 16, 1.0), ("arrive", 0, 16, 1.0), ("fault", 0, 3),
                                      ("wait", 5), ("mute", 0), ("wait", 27)]


@example(breaker=20, n=2, fair=False, ratings=[16] * 5, drop=0.0, seed=0,
         events=FAULT_CLEARS_WITH_OFFLINE_STORED)
@example(breaker=20, n=2, fair=False, ratings=[16] * 5, drop=0.0, seed=0,
         events=SILENT_MEMBER_WITH_UNACKED_OFFLINE)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(breaker=st.sampled_from(BREAKERS), n=st.integers(2, 5), fair=st.booleans(),
       ratings=st.lists(st.sampled_from((16, 24, 32, 40, 48)), min_size=5, max_size=5),
       drop=st.sampled_from((0.0, 0.1, 0.3)), seed=st.integers(0, 1000),
       events=st.lists(event, min_size=1, max_size=14))
def test_ledger_minimum_and_offline_contract_hold_at_every_step(breaker, n, fair, ratings, drop,
                                                                  seed, events):
    limit = default_limit(breaker)
    members = {f"m{i}": float(min(ratings[i], limit)) for i in range(n)}
    g = VirtualGroup(GroupConfig("g", breaker, limit, t_wd_s=10, fair_offline=fair, rotate_s=20),
                     members, seed=seed, drop=0.0)
    ids = list(members)
    # Out of the box every charger stores the seed's 8 A offline current; the
    # contract holds once the server has provisioned them (installers do it
    # at commissioning, before the first car), so warm up first.
    g.run(5.0)
    assert sum(c.store["offline_a"] for c in g.chargers.values()) <= limit
    g.bus.drop = drop
    for ev in events:
        kind = ev[0]
        if kind == "arrive":
            c = g.chargers[ids[ev[1] % n]]
            if c.ev is None:
                c.plug(VirtualEv(max_a=ev[2], delay_s=ev[3]))
        elif kind == "leave":
            g.chargers[ids[ev[1] % n]].unplug()
        elif kind == "taper":
            c = g.chargers[ids[ev[1] % n]]
            if c.ev is not None:
                c.ev.taper_a = float(ev[2])
        elif kind == "mute":
            g.bus.mute.add(ids[ev[1] % n])
        elif kind == "deaf":
            g.bus.deaf.add(ids[ev[1] % n])
        elif kind == "heal":
            g.bus.mute.discard(ids[ev[1] % n])
            g.bus.deaf.discard(ids[ev[1] % n])
        elif kind == "fault":
            g.chargers[ids[ev[1] % n]].trip(g.t, ev[2])
        elif kind == "server_down":
            g.server_up = False
        elif kind == "server_restart":
            g.server_up = True
            g.restart_server()
        # Events come close together too: two cars plugging in within a second.
        for _ in range(ev[1] * 10 if kind == "wait" else 3 + (seed + len(kind)) % 28):
            g.step(0.1)
            stored = sum(c.store["offline_a"] for c in g.chargers.values())
            assert stored <= limit + 1e-9, ("offline contract", g.t, stored, limit)
            assert not g.violations, g.violations[:3]
        for _at, kind2, _m, body in g.bus.queue:
            if kind2 == "set":
                a = json.loads(body)["current_a"]
                assert a == 0 or a >= 6, a
    for _at, kind2, _m, body in g.bus.queue:
        if kind2 == "set":
            a = json.loads(body)["current_a"]
            assert a == 0 or a >= 6, a
