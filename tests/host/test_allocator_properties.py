"""Allocator properties (hypothesis): random groups and event sequences, with
the firmware's own limit arbiter as each charger and EVs that lag the pilot
by up to the 5 s IEC 61851-1 allows (S1-S4).

Events: cars arriving and leaving, people plugging in and out a tenth of a
second to seconds apart on several chargers at once, taper, reports lost
(mute) or late (lag), setpoints lost (deaf), faults, the server stopped and
restarted, and the group limit changed down to 0, all in the middle of each
other.

At every 0.1 s step of virtual time:
- S1, the chargers: the sum over chargers of what each EV may draw (the
  highest pilot offered to it in the last 5 s, or what it draws) stays
  within the breaker;
- S1, the server: its own ledger (the worst case it budgets) stays within
  the breaker, once a restarted server has heard from every member that is
  not silent (until then S6 makes it assume each one's last setpoint, which
  may add up past the breaker while it raises nobody);
- S4: no setpoint lies strictly between 0 and 6 A, and no member is paused
  or resumed by rotation within a rotation period of its previous pause or
  resume, nor are two hand-overs closer than that;
- S3: the offline currents the chargers have stored sum to at most the
  limit (to at most the breaker after a limit change: a charger the server
  cannot reach keeps what it stored).

``EVSE_ALLOC_EXAMPLES`` sets how many examples to run (default 300; the
deep run of issue 11 used 20,000). ``EVSE_ALLOC_STATS=file`` appends one JSON
line per example (steps, the smallest breaker margins seen) for a report.
"""
import json
import os

from hypothesis import HealthCheck, example, given, settings, strategies as st

from evse_tools.server.allocator import GroupConfig
from evse_tools.server.db import default_limit
from evse_tools.sim.virtual import VirtualEv, VirtualGroup

BREAKERS = (20, 30, 40, 50, 60, 100)
EXAMPLES = int(os.environ.get("EVSE_ALLOC_EXAMPLES", "300"))
STATS = os.environ.get("EVSE_ALLOC_STATS")
ROTATE_S = 20.0

event = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 5), st.sampled_from((16, 27, 32, 40, 48)),
              st.floats(1.0, 5.0)),
    st.tuples(st.just("leave"), st.integers(0, 5)),
    # Plugged in and out `count` times, `gap` tenths of a second apart, on
    # the chargers in `mask` (bit i: charger i) at once.
    st.tuples(st.just("flip"), st.integers(1, 31), st.integers(1, 6), st.integers(1, 30),
              st.floats(1.0, 5.0)),
    st.tuples(st.just("taper"), st.integers(0, 5), st.integers(0, 20)),
    st.tuples(st.just("mute"), st.integers(0, 5)),          # its reports (and acks) are lost
    st.tuples(st.just("lag"), st.integers(0, 5), st.floats(0.5, 8.0)),   # its acks come late
    st.tuples(st.just("deaf"), st.integers(0, 5)),          # its setpoints are lost
    st.tuples(st.just("heal"), st.integers(0, 5)),
    st.tuples(st.just("fault"), st.integers(0, 5), st.integers(1, 30)),   # clears after N s
    st.tuples(st.just("limit"), st.sampled_from((0.0, 0.25, 0.5, 1.0))),  # share of the chart limit
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
# Issue 11, finding 1: car 2 plugged in and out a second apart while car 1
# charged; car 1's measured drop (its answer to an earlier decrease) was
# taken as confirming the latest one, and car 2 was raised: 60 A on 50 A.
PLUG_FLIPS_WHILE_ANOTHER_CHARGES = [("arrive", 0, 48, 3.0), ("wait", 15), ("flip", 2, 6, 10, 3.0),
                                    ("wait", 30)]
# Found by the deep run (issue 11): the server restarted 0.4 s after lowering
# a car from 16 to 8 A; the new run assumed 8 A (its last setpoint) while the
# EV could still follow 16 A, and raised another car: 24 A on a 20 A breaker.
# The database now keeps the ledger's worst case with the last setpoint.
RESTART_RIGHT_AFTER_A_DECREASE = [("arrive", 2, 16, 1.0), ("leave", 2), ("arrive", 0, 16, 1.0),
                                  ("arrive", 1, 16, 1.0), ("server_restart",)]
# Found by the deep run too: a restarted server took a state-A report as
# voiding what the previous run had left in flight (a 6 A start current),
# and raised two idle members: 34 A on a 30 A breaker. What a previous run
# may have left now counts until the charger acknowledges this run's epoch.
RESTART_WITH_THE_LAST_RUNS_MESSAGES_IN_FLIGHT = [("leave", 0), ("leave", 0), ("arrive", 0, 16, 1.0),
                                                 ("limit", 0.5), ("flip", 30, 2, 1, 1.0),
                                                 ("server_restart",)]
# A member silent (its reports lost) for longer than its lease when the
# server restarts: the new run assumes its last setpoint (S6) and its ledger
# goes past the breaker while it raises nobody; what the EVs may draw stays
# within it.
RESTART_WHILE_A_MEMBER_IS_SILENT = [("leave", 0), ("leave", 0), ("mute", 0), ("arrive", 0, 16, 1.0),
                                    ("arrive", 0, 16, 1.0), ("wait", 27), ("server_restart",)]
# Found by the deep run: a member paused at 6 A whose car left was held
# (its raise did not fit) by sending its last 6 A again as a lease renewal;
# the ledger had rightly stopped counting that 6 A, so the renewal was a
# raise without room: 54 A on a 50 A breaker.
HELD_RENEWAL_AFTER_THE_CAR_LEFT = [("fault", 1, 3), ("arrive", 0, 16, 1.0), ("flip", 18, 4, 14, 1.0)]
# Found by the deep run after the review's fixes: a member whose reports
# were lost came back after its lease had run out (on its 6 A offline
# current) and was counted at the 8 A start current its session had begun
# on long before, and at its stored 8 A start current although only a message
# (carrying its own start current) can renew its lease; the same after a
# restart. The ledger said 32 A on a 30 A breaker.
BACK_FROM_SILENCE_ON_THE_OFFLINE_CURRENT = [("mute", 0), ("arrive", 0, 16, 1.0),
                                            ("arrive", 0, 16, 1.0), ("wait", 28), ("heal", 0)]
SILENT_THROUGH_A_RESTART = [("mute", 0), ("server_restart",), ("wait", 19), ("heal", 0)]
# The group limit set to 0 while cars charge and one plugs in and out.
LIMIT_ZERO_DURING_FLIPS = [("arrive", 0, 48, 2.0), ("arrive", 1, 40, 4.0), ("wait", 10),
                           ("flip", 4, 3, 5, 5.0), ("limit", 0.0), ("wait", 10), ("limit", 1.0),
                           ("wait", 20)]


def _check_rotation(planner, rotate_s):
    """S4 anti-flap: every hand-over respects the rotation period."""
    last_change: dict[str, float] = {}
    last_swap = None
    for t, mid, _on, cause in planner.turns:
        if cause == "rotation":
            assert mid not in last_change or t - last_change[mid] >= rotate_s - 1e-9, \
                ("paused and resumed within a rotation period", mid, last_change[mid], t)
            if last_swap is not None and t != last_swap:
                assert t - last_swap >= rotate_s - 1e-9, ("two hand-overs", last_swap, t)
            last_swap = t
        last_change[mid] = t


def _sets_are_whole(g):
    for _at, kind, _m, body in g.bus.queue:
        if kind == "set":
            a = json.loads(body)["current_a"]
            assert a == 0 or a >= 6, a


# Every counterexample ever found, run first in every run: (breaker A,
# chargers, unit ratings A, seed, events).
KEPT = [(20, 2, [16] * 5, 0, FAULT_CLEARS_WITH_OFFLINE_STORED),
        (20, 2, [16] * 5, 0, SILENT_MEMBER_WITH_UNACKED_OFFLINE),
        (50, 2, [40] * 5, 1, PLUG_FLIPS_WHILE_ANOTHER_CHARGES),
        (50, 3, [40] * 5, 2, LIMIT_ZERO_DURING_FLIPS),
        (20, 3, [16] * 5, 0, RESTART_RIGHT_AFTER_A_DECREASE),
        (30, 5, [16] * 5, 642, RESTART_WITH_THE_LAST_RUNS_MESSAGES_IN_FLIGHT),
        (30, 4, [16] * 5, 0, RESTART_WHILE_A_MEMBER_IS_SILENT),
        (50, 5, [24, 16, 16, 16, 24], 0, HELD_RENEWAL_AFTER_THE_CAR_LEFT),
        (30, 4, [16] * 5, 0, BACK_FROM_SILENCE_ON_THE_OFFLINE_CURRENT),
        (30, 4, [16] * 5, 0, SILENT_THROUGH_A_RESTART)]


def _with_kept_cases(test):
    for breaker, n, ratings, seed, events in reversed(KEPT):
        test = example(breaker=breaker, n=n, fair=False, ratings=ratings, drop=0.0,
                       seed=seed, events=events)(test)
    return test


@_with_kept_cases
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(breaker=st.sampled_from(BREAKERS), n=st.integers(2, 5), fair=st.booleans(),
       ratings=st.lists(st.sampled_from((16, 24, 32, 40, 48)), min_size=5, max_size=5),
       drop=st.sampled_from((0.0, 0.1, 0.3)), seed=st.integers(0, 1000),
       events=st.lists(event, min_size=1, max_size=14))
def test_never_over_the_breaker_against_lagging_evs_and_people_plugging_in_and_out(
        breaker, n, fair, ratings, drop, seed, events):
    limit = default_limit(breaker)
    members = {f"m{i}": float(min(ratings[i], limit)) for i in range(n)}
    g = VirtualGroup(GroupConfig("g", breaker, limit, t_wd_s=10, fair_offline=fair,
                                 rotate_s=ROTATE_S),
                     members, seed=seed, drop=0.0, on_change=seed % 2 == 0)
    ids = list(members)
    # Out of the box every charger stores the seed's 8 A offline current; the
    # contract holds once the server has provisioned them (installers do it
    # at commissioning, before the first car), so warm up first.
    g.run(5.0)
    assert sum(c.store["offline_a"] for c in g.chargers.values()) <= limit
    g.check_ledger = True
    g.bus.drop = drop
    limit_changed = False
    flips: list[tuple[float, str, VirtualEv | None]] = []   # (at s, charger, EV or None)

    def steps(count):
        for _ in range(count):
            while flips and flips[0][0] <= g.t + 1e-9:
                _at, cid, ev = flips.pop(0)
                c = g.chargers[cid]
                if ev is None:
                    c.unplug()
                elif c.ev is None:
                    c.plug(ev)
            g.step(0.1)
            stored = sum(c.store["offline_a"] for c in g.chargers.values())
            bound = breaker if limit_changed else limit
            assert stored <= bound + 1e-9, ("offline contract", g.t, stored, bound)
            assert not g.violations, g.violations[:3]

    for ev in events:
        kind = ev[0]
        if kind == "arrive":
            c = g.chargers[ids[ev[1] % n]]
            if c.ev is None:
                c.plug(VirtualEv(max_a=ev[2], delay_s=ev[3]))
        elif kind == "leave":
            g.chargers[ids[ev[1] % n]].unplug()
        elif kind == "flip":
            _k, mask, count, gap, delay = ev
            for i in range(n):
                if mask >> i & 1:
                    cid = ids[i]
                    for j in range(2 * count):
                        at = g.t + j * gap / 10
                        flips.append((at, cid, VirtualEv(max_a=40, delay_s=delay) if j % 2 == 0 else None))
            flips.sort(key=lambda f: f[0])
        elif kind == "taper":
            c = g.chargers[ids[ev[1] % n]]
            if c.ev is not None:
                c.ev.taper_a = float(ev[2])
        elif kind == "mute":
            g.bus.mute.add(ids[ev[1] % n])
        elif kind == "lag":
            g.bus.lag[ids[ev[1] % n]] = ev[2]
        elif kind == "deaf":
            g.bus.deaf.add(ids[ev[1] % n])
        elif kind == "heal":
            g.bus.mute.discard(ids[ev[1] % n])
            g.bus.deaf.discard(ids[ev[1] % n])
            g.bus.lag.pop(ids[ev[1] % n], None)
        elif kind == "fault":
            g.chargers[ids[ev[1] % n]].trip(g.t, ev[2])
        elif kind == "limit":
            new = float(int(limit * ev[1]))
            g.set_limit(0.0 if new < 6 else new)
            limit_changed = True
        elif kind == "server_down":
            g.server_up = False
        elif kind == "server_restart":
            g.server_up = True
            g.restart_server()
        # Events come close together too: two cars plugging in within a second.
        steps(ev[1] * 10 if kind == "wait" else 3 + (seed + len(kind)) % 28)
        _sets_are_whole(g)
        _check_rotation(g.allocator.planner, ROTATE_S)
    steps(int(max((f[0] for f in flips), default=g.t) - g.t) * 10 + 10)
    _sets_are_whole(g)
    _check_rotation(g.allocator.planner, ROTATE_S)
    if STATS:
        with open(STATS, "a") as f:
            f.write(json.dumps({"steps": g.steps, "breaker": breaker, "margin_a": g.min_margin_a,
                                "ledger_margin_a": g.min_ledger_margin_a}) + "\n")
