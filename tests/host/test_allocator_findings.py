"""Issue 11's findings, each as a test named after its hazard: the server
against EVs and people as they really behave (IEC 61851-1 lets an EV take
5 s to follow a lower pilot, and people plug in and out a second apart).

Every charger is the firmware's own limit arbiter (VirtualGroup); the
allocator is the server's. Units: A, s.
"""
import json

from evse_tools.server.allocator import Allocator, GroupConfig, Member, Report
from evse_tools.server.ledger import FOLLOW_S
from evse_tools.sim.virtual import VirtualEv, VirtualGroup

GARAGE = GroupConfig("garage", 50, 40, t_wd_s=10)


def _sets(g, member):
    """Record every setpoint the server sends to ``member``: [(t, A)]."""
    seen = []
    send = g.bus.send

    def tap(now, kind, m, body):
        if kind == "set" and m == member:
            seen.append((round(now, 1), json.loads(body)["current_a"]))
        send(now, kind, m, body)
    g.bus.send = tap
    return seen


def test_a_pilot_flipped_by_plug_and_unplug_never_lets_a_lagging_ev_overload_the_breaker():
    """Finding 1 (60 A on a 50 A breaker for 0.7 s): car 2 plugged in and out
    a second apart while car 1 charged; car 1's EV follows each pilot 3 s
    late, so its drop to 20 A answered an earlier decrease, yet the server
    took it as confirming the latest one and raised car 2."""
    for delay in (2.0, 3.0, 4.0):
        g = VirtualGroup(GARAGE, {"c1": 40.0, "c2": 40.0}, seed=1, on_change=True)
        g.run(5.0)
        g.check_ledger = True
        g.chargers["c1"].plug(VirtualEv(max_a=48, delay_s=delay))
        g.run(15.0)
        sets = _sets(g, "c1")
        for i in range(16):
            if i % 2 == 0:
                g.chargers["c2"].plug(VirtualEv(max_a=48, delay_s=delay))
            else:
                g.chargers["c2"].unplug()
            g.run(1.0)
        g.chargers["c2"].plug(VirtualEv(max_a=48, delay_s=delay))
        g.run(30.0)
        assert not g.violations, (delay, g.violations[:3])
        assert g.ledger_peak_a <= 50 and g.over_breaker_s == 0
        # Damping: car 1 is never raised within the EV's window of a decrease.
        downs = [t1 for (t0, a0), (t1, a1) in zip(sets, sets[1:]) if a1 < a0]
        ups = [t1 for (t0, a0), (t1, a1) in zip(sets, sets[1:]) if a1 > a0]
        for u in ups:
            assert all(not (0 <= u - d < FOLLOW_S - 1e-9) for d in downs), (u, downs)
        # And the pair still ends at 50/50.
        assert {c.limit() for c in g.chargers.values()} == {20.0}


def test_a_lone_car_in_a_group_of_three_is_raised_at_once_to_what_the_breaker_allows():
    """Finding 2: the lone car was held at 8 A for 14 s because its full
    40 A did not fit beside the two idle members' 8 A reserves; the 34 A that
    fitted was never given."""
    g = VirtualGroup(GARAGE, {"a": 40.0, "b": 40.0, "c": 40.0}, seed=3, on_change=True)
    g.run(5.0)
    g.check_ledger = True
    g.chargers["a"].plug(VirtualEv(max_a=48, delay_s=2.0))
    g.run(1.5)
    # The idle members keep 8 A start and offline currents (S3), so a
    # worst case of 8 + 8 leaves 50 - 16 = 34 A.
    assert g.chargers["a"].limit() == 34.0
    assert g.allocator.members["a"].binding == "breaker_transient"
    g.run(30.0)
    assert g.chargers["a"].limit() == 34.0
    assert not g.violations and g.ledger_peak_a <= 50


def test_a_lone_car_gets_its_full_share_once_the_idle_reserves_fit():
    """Partial raise, then the rest as soon as room appears: on a 60 A
    breaker (limit 48) the car gets 44 A at once beside two 8 A reserves."""
    g = VirtualGroup(GroupConfig("g", 60, 48, t_wd_s=10), {"a": 48.0, "b": 40.0, "c": 40.0},
                     seed=4, on_change=True)
    g.run(5.0)
    g.check_ledger = True
    g.chargers["a"].plug(VirtualEv(max_a=48, delay_s=2.0))
    g.run(1.5)
    assert g.chargers["a"].limit() == 44.0
    g.chargers["b"].plug(VirtualEv(max_a=48, delay_s=2.0))
    g.run(20.0)
    assert g.chargers["a"].limit() + g.chargers["b"].limit() == 48.0
    g.chargers["b"].unplug()
    g.run(20.0)
    assert g.chargers["a"].limit() == 44.0     # the idle reserves are back at 8 A each
    assert all(c.store["start_a"] == 8 for i, c in g.chargers.items() if i != "a")
    assert not g.violations


def test_group_limit_zero_pauses_every_car_and_every_fallback():
    """Finding 3: a limit of 0 was refused, so nobody could pause a group.
    0 now pauses everyone (decreases first), and the offline and start
    currents go to 0 too, so that nothing charges when the server is gone."""
    g = VirtualGroup(GARAGE, {"a": 40.0, "b": 40.0, "c": 40.0}, seed=5, on_change=True)
    g.run(5.0)
    g.check_ledger = True
    g.chargers["a"].plug(VirtualEv(max_a=48, delay_s=2.0))
    g.chargers["b"].plug(VirtualEv(max_a=48, delay_s=2.0))
    g.run(20.0)
    assert g.chargers["a"].limit() + g.chargers["b"].limit() == 40.0
    g.set_limit(0.0)
    g.run(1.0)
    assert [c.limit() for c in g.chargers.values()] == [0.0, 0.0, 0.0]
    g.run(10.0)
    assert [c.store["offline_a"] for c in g.chargers.values()] == [0.0, 0.0, 0.0]
    assert [c.store["start_a"] for c in g.chargers.values()] == [0.0, 0.0, 0.0]
    g.chargers["c"].plug(VirtualEv(max_a=48, delay_s=2.0))      # a car arriving stays paused
    g.run(5.0)
    assert g.chargers["c"].limit() == 0.0
    state = g.allocator.group_state(g.t)
    assert state["paused"] is True and state["limit_a"] == 0
    assert {m["binding"] for m in state["members"].values()} == {"group_limit"}
    g.server_up = False                         # the server gone: nobody starts on its own
    g.run(30.0)
    assert [c.limit() for c in g.chargers.values()] == [0.0, 0.0, 0.0]
    assert not g.violations


def _three_cars_on_a_16a_limit(rotate_s, on_change):
    """A shortage (S4): three 16 A chargers on a 20 A breaker, a car plugged
    into each half a second apart; only two can have 6 A at once."""
    g = VirtualGroup(GroupConfig("s", 20, 16, t_wd_s=10, rotate_s=rotate_s),
                     {"a": 16.0, "b": 16.0, "c": 16.0}, seed=6, on_change=on_change)
    g.run(5.0)
    g.check_ledger = True
    for cid in "abc":
        g.chargers[cid].plug(VirtualEv(max_a=32, delay_s=2.0))
        g.run(0.5)
    return g


def test_rotation_never_pauses_and_resumes_a_car_within_a_rotation_period():
    """Finding 4: with three cars on a 16 A limit, each rotation paused a
    member and resumed it one round later while pausing another instead, so
    a car stopped and restarted at once (S4: no member is paused or resumed
    more than once per rotation period)."""
    rotate = 20.0
    g = _three_cars_on_a_16a_limit(rotate, on_change=True)
    changes = {cid: [] for cid in "abc"}       # (t, charging?) as the charger offers it
    drawn = []
    for _ in range(1200):                      # 120 s: six rotation periods
        g.step(0.1)
        drawn.append(sum(c.ev.drawn_a for c in g.chargers.values()))
        for cid, c in g.chargers.items():
            on = c.limit() > 0
            if not changes[cid] or changes[cid][-1][1] != on:
                changes[cid].append((g.t, on))
    for cid, ch in changes.items():
        flips = [t for t, _on in ch[1:]]
        for t0, t1 in zip(flips, flips[1:]):
            assert t1 - t0 >= rotate - 1, (cid, ch)
    swaps = [t for t, _m, on, cause in g.allocator.planner.turns if cause == "rotation" and on]
    assert len(swaps) >= 4                      # it does rotate
    assert all(b - a >= rotate for a, b in zip(swaps, swaps[1:]))
    assert not g.violations
    # Capacity: the hand-over costs the outgoing EV's response window at
    # most (a 20 A breaker leaves no room to start the next car earlier).
    share = sum(drawn[300:]) / (16.0 * len(drawn[300:]))
    assert share > 0.8, share


def test_a_decrease_is_not_confirmed_by_a_drop_that_answers_an_earlier_one():
    """The ledger's rule directly: 40 -> 20 -> 40 -> 20 sent a second apart;
    a report showing 20 A drawn after the last decrease leaves the member at
    40 A until a report after the window of the last 40 A offer."""
    a = Allocator(GARAGE, [Member("x", 40), Member("y", 40)], 1, 0.0, restarted=False)
    x = a.members["x"]
    a.on_report("x", Report("C", 0.0, 8.0, offline_a=8, start_a=8), 0.0)
    a.on_report("y", Report("A", offline_a=8, start_a=8), 0.0)
    seq = 0
    for t, amps in ((0.1, 40.0), (1.0, 20.0), (2.0, 40.0), (3.0, 20.0)):
        seq += 1
        a._send(x, amps, 8.0, 8.0, "test", t, [])
        a.on_report("x", Report("C", 20.0, amps, ack_seq=x.last_sent().seq, ack_epoch=1,
                                offline_a=8, start_a=8), t + 0.2)
    assert a.worst_a(x, 3.3) == 40          # measured 20 A, but 40 A was offered at 2.0-3.2
    assert a.worst_a(x, 3.2 + FOLLOW_S + 0.1) == 40   # no report after the window yet
    a.on_report("x", Report("C", 20.0, 20.0, ack_seq=x.last_sent().seq, ack_epoch=1,
                            offline_a=8, start_a=8), 3.2 + FOLLOW_S + 0.2)
    assert a.worst_a(x, 3.2 + FOLLOW_S + 0.3) == 20


# -- found by an adversarial review of the new ledger (issue 11 session) -------

def test_a_charger_back_from_a_network_outage_is_not_raised_back_for_free():
    """Its link was down for 40 s: it ran on its 8 A offline current while
    the other car was raised. When it came back, its old 20 A setpoint was
    counted again and re-sent as if nothing rose: 52 A on a 50 A breaker."""
    g = VirtualGroup(GARAGE, {"a": 40.0, "b": 40.0}, seed=1, on_change=True)
    g.run(5.0)
    g.check_ledger = True
    g.chargers["a"].plug(VirtualEv(max_a=48, delay_s=1.0))
    g.chargers["b"].plug(VirtualEv(max_a=48, delay_s=5.0))
    g.run(20.0)
    g.bus.mute.add("a")
    g.bus.deaf.add("a")
    g.run(40.0)
    assert g.chargers["a"].limit() == 8.0 and g.chargers["b"].limit() == 32.0
    g.bus.mute.discard("a")
    g.bus.deaf.discard("a")
    g.run(30.0)
    assert not g.violations and g.over_breaker_s == 0
    assert g.chargers["a"].limit() + g.chargers["b"].limit() == 40.0


def test_a_replug_between_two_reports_is_counted_at_its_old_start_current():
    """A paused car unplugged and plugged in again between two reports starts
    on its stored 8 A start current, which the server was just lowering to
    0; the acknowledged 0 made that 8 A vanish from the ledger at once and the
    next car was raised into it: 24 A on a 20 A breaker."""
    g = _three_cars_on_a_16a_limit(20.0, on_change=False)
    g.run(33.3 - g.t)
    g.chargers["a"].unplug()
    g.step(0.1)
    g.chargers["a"].plug(VirtualEv(max_a=32, delay_s=5.0))
    g.run(15.0)
    assert not g.violations and g.over_breaker_s == 0


def test_a_removed_charger_that_never_heard_of_it_stays_in_the_ledger():
    """The installer removed a charger whose link was down: it still ran on
    its offline current, but the server forgot it after T_wd and gave its
    share away: 32 A on a 30 A breaker."""
    g = VirtualGroup(GroupConfig("g", 30, 24, t_wd_s=10), {"a": 24.0, "b": 24.0, "c": 24.0},
                     seed=3, on_change=True)
    g.run(5.0)
    g.check_ledger = True
    for cid in "abc":
        g.chargers[cid].plug(VirtualEv(max_a=32, delay_s=2.0))
    g.run(20.0)
    g.bus.deaf.add("a")
    g.bus.mute.add("a")
    g.allocator.remove("a", g.t)
    for _ in range(600):
        g.step(0.1)
        g.allocator.expire_removed(g.t)
    assert "a" in g.allocator.members
    assert not g.violations and g.over_breaker_s == 0
