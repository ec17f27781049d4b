"""The seed's garage end to end (issue 3 acceptance): two 40 A chargers on a
50 A breaker, firmware on the device runtime at 48 KB, umqtt.simple, mosquitto,
and the load-group server as its own process. Values from the seed and
tools/scenarios/garage.toml; times are the scenario's event times."""

LIMIT, BREAKER, T_WD = 40, 50, 10
C1, C2 = "garage-1", "garage-2"


def at(rec, text):
    return next(t for t, e in rec.events if text in e)


def between(rec, t0, t1):
    return [s for s in rec.samples if t0 <= s.t < t1]


def test_car_1_alone_gets_the_full_40a(garage):
    alone = between(garage, at(garage, "model3-lr plugs in"), at(garage, "bolt-ev plugs in"))
    assert max(s.chargers[C1]["pilot_a"] for s in alone) == 40
    assert max(s.chargers[C1]["measured_a"] for s in alone) == 40


def test_second_car_starts_at_8a_not_more(garage):
    t2 = at(garage, "bolt-ev plugs in")
    first = next(s for s in garage.samples if s.t >= t2 and s.chargers[C2]["pilot_a"] > 0)
    assert first.chargers[C2]["pilot_a"] == 8
    assert first.chargers[C2]["limit_by"] == "start"


def test_group_never_exceeds_the_50a_breaker(garage):
    assert max(s.group_measured() for s in garage.samples) <= BREAKER


def test_car_1_is_lowered_and_confirmed_before_car_2_is_raised_past_what_fits(garage):
    """S2 with partial raises (issue 11): until car 1's decrease to 20 A is
    confirmed (acknowledged, and a report after the EV's 5 s + 1 s window
    shows it at 20 A), car 2 gets at most what fits beside car 1's 40 A under
    the 50 A breaker, i.e. 10 A; its raise to 20 A comes after."""
    t2 = at(garage, "bolt-ev plugs in")
    lowered = [(t, b["seq"]) for t, cid, b in garage.sets if cid == C1 and t >= t2 and b["current_a"] <= 20]
    t_low = lowered[0][0]
    confirm = next(t for t, cid, b in garage.states
                   if cid == C1 and t >= t_low + 6 and b["ack_seq"] in [q for _t, q in lowered]
                   and b["measured_a"] <= 21)
    early = [b["current_a"] for t, cid, b in garage.sets if cid == C2 and t2 <= t < confirm]
    assert max(early, default=8) <= BREAKER - LIMIT
    raise2 = next((t, b) for t, cid, b in garage.sets if cid == C2 and t >= t2 and b["current_a"] == 20)
    assert confirm <= raise2[0]


def test_both_cars_sit_at_20a_within_15s_of_the_arrival(garage):
    t2 = at(garage, "bolt-ev plugs in")
    both = next(s for s in garage.samples if s.t >= t2 and all(
        s.chargers[c]["pilot_a"] == 20 and abs(s.chargers[c]["measured_a"] - 20) < 0.5 for c in (C1, C2)))
    assert both.t - t2 <= 15


def test_tapering_car_1_frees_its_current_for_car_2_within_30s(garage):
    t = at(garage, "battery at 96%")
    window = between(garage, t, t + 30)
    # Car 1 draws 10 A: its setpoint follows at 10 + 2 A, car 2 gets 40 - 12 = 28 A
    # (its onboard charger could take 32 A).
    got = next(s for s in window if s.chargers[C2]["pilot_a"] == 28 and s.chargers[C2]["measured_a"] == 28)
    assert got.chargers[C1]["pilot_a"] == 12
    assert got.group_measured() <= LIMIT


def test_server_killed_both_chargers_fall_back_within_t_wd_plus_1s(garage):
    tk = at(garage, "server killed")
    for cid in (C1, C2):
        fell = next(s for s in garage.samples if s.t >= tk and not s.chargers[cid]["online"])
        assert fell.t - tk <= T_WD + 1, cid
        assert fell.chargers[cid]["pilot_a"] == 8 and fell.chargers[cid]["limit_by"] == "offline"


def test_with_the_server_gone_the_group_stays_within_the_offline_currents(garage):
    tk, tr = at(garage, "server killed"), at(garage, "server restarted")
    window = between(garage, tk + T_WD + 6, tr)
    assert window
    assert max(s.group_measured() for s in window) <= 8 + 8


def test_after_a_restart_no_allocation_rises_before_every_member_reported(garage):
    tr = at(garage, "server restarted")
    first_report = {cid: next(t for t, c, _b in garage.states if c == cid and t >= tr) for cid in (C1, C2)}
    raises = [t for t, cid, b in garage.sets if t >= tr and b["current_a"] > 8]
    assert raises
    assert min(raises) >= max(first_report.values())


def test_steady_state_stays_within_the_40a_limit_outside_arrivals(garage):
    arrivals = [t for t, e in garage.events if "plugs in" in e]
    for s in garage.samples:
        if s.group_measured() > LIMIT:
            assert any(0 <= s.t - a <= 15 for a in arrivals), (s.t, s.group_measured())


def test_group_state_names_the_binding_constraint(garage):
    assert garage.group_states
    _t, last = garage.group_states[-1]
    assert last["limit_a"] == LIMIT and last["breaker_a"] == BREAKER
    assert set(last["members"]) == {C1, C2}
    bindings = {m["binding"] for _t, gs in garage.group_states for m in gs["members"].values()}
    assert {"group_limit", "ev_draw", "idle"} <= bindings
