"""A GFCI trip in a two-charger group, end to end (issue 4): the fault reaches
the group state, the freed current goes to the other charger only after the
tripped one has confirmed its contactor open, and the group stays within its
limit throughout. tools/scenarios/gfci.toml: 50 A breaker, 40 A limit."""

LIMIT = 40


def trip_time(rec):
    return next(t for t, e in rec.events if "inject gfci on True" in e)


def test_gfci_trip_appears_in_the_load_group_state(gfci_run):
    t = trip_time(gfci_run)
    faulted = [gs for at, gs in gfci_run.group_states
               if at >= t and gs["members"]["garage-1"]["fault"] == "gfci"]
    assert faulted
    assert faulted[-1]["members"]["garage-1"]["binding"] == "fault"
    assert faulted[-1]["members"]["garage-1"]["relay"] is False


def test_freed_current_goes_to_the_other_charger_only_after_the_open_contactor_is_confirmed(gfci_run):
    t = trip_time(gfci_run)
    confirmed = next(at for at, cid, b in gfci_run.states
                     if cid == "garage-1" and at >= t and b["fault"] == "gfci" and b["relay"] is False)
    raised = next(at for at, cid, b in gfci_run.sets if cid == "garage-2" and at >= t and b["current_a"] > 20)
    assert confirmed <= raised
    final = [b["current_a"] for at, cid, b in gfci_run.sets if cid == "garage-2"][-1]
    assert final == 40


def test_group_stays_within_the_limit_during_the_fault(gfci_run):
    t = trip_time(gfci_run)
    during = [s for s in gfci_run.samples if s.t >= t]
    assert during
    assert max(s.group_measured() for s in during) <= LIMIT
    assert all(s.chargers["garage-1"]["measured_a"] == 0 for s in during if s.t >= t + 0.2)
