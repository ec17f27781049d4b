"""The load-group server's SQLite store: the seed's limit chart, the 80 % rule
(NEC 625.41), names and ids of the wire contract, and nothing half-written."""
import sqlite3

import pytest

from evse_tools.server.db import GroupStore, StoreError, default_limit


@pytest.fixture
def store(tmp_path):
    with GroupStore(tmp_path / "groups.db") as s:
        yield s


def _rows(path):
    """Every row of both tables, read through a separate connection."""
    db = sqlite3.connect(path)
    try:
        return (db.execute("SELECT name, breaker_a, limit_a, fair_offline, t_wd_s FROM groups"
                           " ORDER BY name").fetchall(),
                db.execute("SELECT * FROM members ORDER BY id").fetchall())
    finally:
        db.close()


@pytest.mark.parametrize("breaker, limit", [(20, 16), (30, 24), (40, 32), (50, 40), (100, 75),
                                            (60, 48), (45, 36), (15, 12), (35, 28), (125, 100)])
def test_default_limit_follows_the_seed_chart_else_80_percent(breaker, limit):
    assert default_limit(breaker) == limit


def test_new_group_gets_the_chart_limit_not_the_breaker(store):
    g = store.create_group("garage", 50)
    assert (g.breaker_a, g.limit_a, g.fair_offline, g.t_wd_s, g.members) == (50, 40, False, 30, [])
    assert store.create_group("shop", 100).limit_a == 75
    assert store.create_group("barn", 45).limit_a == 36


def test_limit_above_80_percent_of_breaker_is_refused_and_nothing_written(store, tmp_path):
    with pytest.raises(StoreError, match=r"limit 41 A exceeds 80 % of the 50 A breaker "
                                         r"\(40 A max, NEC 625\.41\)"):
        store.create_group("garage", 50, limit_a=41)
    assert _rows(tmp_path / "groups.db") == ([], [])
    store.create_group("garage", 50, limit_a=30)
    before = _rows(tmp_path / "groups.db")
    with pytest.raises(StoreError, match="exceeds 80 %"):
        store.set_limit("garage", 41)
    with pytest.raises(StoreError, match=r"limit 33 A exceeds 80 % of the 40 A breaker"):
        store.set_breaker("garage", 40, limit_a=33)
    assert _rows(tmp_path / "groups.db") == before
    assert store.get_group("garage").limit_a == 30


def test_exactly_80_percent_is_allowed_even_above_the_chart(store):
    # The chart's 75 A for 100 A is a default; the rule's ceiling is 80 A.
    assert store.create_group("shop", 100, limit_a=80).limit_a == 80
    assert store.set_limit("shop", 75).limit_a == 75


def test_limit_below_6a_minimum_or_breaker_too_small_is_refused(store):
    with pytest.raises(StoreError, match="below the 6 A minimum"):
        store.create_group("garage", 50, limit_a=5)
    with pytest.raises(StoreError, match="a 7 A breaker allows at most 5 A"):
        store.create_group("tiny", 7)
    assert store.create_group("small", 8).limit_a == 6
    assert store.list_groups()[0].name == "small"


@pytest.mark.parametrize("kwargs, message", [
    (dict(breaker_a=5), r"breaker 5 A is out of range \(6..400 A\)"),
    (dict(breaker_a=401), "breaker 401 A is out of range"),
    (dict(breaker_a=50.0), "breaker must be a whole number"),
    (dict(breaker_a=True), "breaker must be a whole number"),
    (dict(breaker_a=50, limit_a=39.5), "limit must be a whole number"),
    (dict(breaker_a=50, t_wd_s=5), r"watchdog timeout 5 s is out of range \(10..600 s\)"),
    (dict(breaker_a=50, t_wd_s=601), "watchdog timeout 601 s"),
])
def test_bad_breaker_limit_or_watchdog_is_refused_and_nothing_written(store, tmp_path, kwargs, message):
    with pytest.raises(StoreError, match=message):
        store.create_group("garage", **kwargs)
    assert _rows(tmp_path / "groups.db") == ([], [])


def test_set_breaker_recomputes_the_default_limit_instead_of_keeping_the_old_one(store):
    store.create_group("garage", 100)          # 75 A
    g = store.set_breaker("garage", 40)        # the old 75 A would overload a 40 A breaker
    assert (g.breaker_a, g.limit_a) == (40, 32)
    g = store.set_breaker("garage", 60)
    assert (g.breaker_a, g.limit_a) == (60, 48)
    g = store.set_breaker("garage", 30, limit_a=20)
    assert (g.breaker_a, g.limit_a) == (30, 20)


def test_duplicate_group_is_refused_without_touching_the_first(store):
    store.create_group("garage", 50)
    with pytest.raises(StoreError, match="group 'garage' already exists"):
        store.create_group("garage", 100)
    assert store.get_group("garage").breaker_a == 50


def test_unknown_group_is_named_in_every_refusal(store):
    for call in (lambda: store.get_group("nope"), lambda: store.delete_group("nope"),
                 lambda: store.set_limit("nope", 16), lambda: store.set_breaker("nope", 20),
                 lambda: store.set_fair_offline("nope", True),
                 lambda: store.add_member("nope", "c1", 32)):
        with pytest.raises(StoreError, match="unknown group 'nope'"):
            call()
    assert store.list_groups() == []


def test_charger_belongs_to_exactly_one_group(store):
    store.create_group("garage", 50)
    store.create_group("shop", 100)
    store.add_member("garage", "bay-1", 40)
    with pytest.raises(StoreError, match="already a member of group 'garage'"):
        store.add_member("garage", "bay-1", 32)
    with pytest.raises(StoreError, match="'bay-1' already belongs to group 'garage'"):
        store.add_member("shop", "bay-1", 32)
    assert [m.id for m in store.get_group("shop").members] == []
    assert store.get_group("garage").members[0].unit_rating_a == 40
    assert store.group_of("bay-1").name == "garage"


def test_unknown_member_is_refused(store):
    store.create_group("garage", 50)
    for call in (lambda: store.remove_member("ghost"),
                 lambda: store.record_setpoint("ghost", 16, 1, 1, 1.0),
                 lambda: store.record_member_currents("ghost", offline_a=8)):
        with pytest.raises(StoreError, match="unknown charger 'ghost'"):
            call()
    assert store.group_of("ghost") is None


@pytest.mark.parametrize("bad", ["", "A", "bay_1", "bay 1", "b/1", "a" * 33, "bay-1\n", "é", 7, None])
def test_invalid_ids_that_would_break_mqtt_topics_are_refused(store, tmp_path, bad):
    with pytest.raises(StoreError, match="is not valid"):
        store.create_group(bad, 50)
    store.create_group("garage", 50)
    with pytest.raises(StoreError, match="is not valid"):
        store.add_member("garage", bad, 32)
    assert _rows(tmp_path / "groups.db")[1] == []


def test_longest_valid_ids_are_accepted(store):
    name = "a-0" * 10 + "z9"
    assert len(name) == 32
    store.create_group(name, 50)
    store.add_member(name, name, 32)
    assert store.group_of(name).name == name


@pytest.mark.parametrize("rating", [5.9, 80.5, 0, -16, float("nan"), float("inf"), "32", True])
def test_unit_rating_outside_6_to_80a_is_refused(store, rating):
    store.create_group("garage", 50)
    with pytest.raises(StoreError, match="unit rating"):
        store.add_member("garage", "bay-1", rating)
    assert store.get_group("garage").members == []


def test_new_member_starts_at_the_seed_8a_offline_and_start_current(store):
    store.create_group("garage", 50)
    m = store.add_member("garage", "bay-1", 40)
    assert (m.unit_rating_a, m.offline_a, m.start_a, m.last_setpoint_a) == (40, 8, 8, None)
    # A 6 A unit never gets a stored current above its rating.
    m = store.add_member("garage", "small", 6)
    assert (m.offline_a, m.start_a) == (6, 6)


def test_group_delete_cascades_to_its_members(store, tmp_path):
    store.create_group("garage", 50)
    store.create_group("shop", 100)
    store.add_member("garage", "bay-1", 40)
    store.add_member("garage", "bay-2", 32)
    store.add_member("shop", "s-1", 48)
    store.delete_group("garage")
    assert store.group_of("bay-1") is None and store.group_of("bay-2") is None
    assert [r[0] for r in _rows(tmp_path / "groups.db")[1]] == ["s-1"]
    # The freed ids may join another group.
    store.add_member("shop", "bay-1", 40)
    assert [m.id for m in store.get_group("shop").members] == ["bay-1", "s-1"]


def test_remove_member_leaves_the_rest_of_the_group(store):
    store.create_group("garage", 50)
    store.add_member("garage", "bay-1", 40)
    store.add_member("garage", "bay-2", 32)
    store.remove_member("bay-1")
    assert [m.id for m in store.get_group("garage").members] == ["bay-2"]


def test_offline_and_start_currents_never_between_0_and_6a_or_above_the_rating(store):
    store.create_group("garage", 50)
    store.add_member("garage", "bay-1", 32)
    m = store.record_member_currents("bay-1", offline_a=6, start_a=0)
    assert (m.offline_a, m.start_a) == (6, 0)
    for kwargs in (dict(offline_a=5), dict(start_a=0.5), dict(offline_a=33), dict(start_a=-1),
                   dict(offline_a=float("nan")), dict(offline_a=10, start_a=3)):
        with pytest.raises(StoreError, match="current"):
            store.record_member_currents("bay-1", **kwargs)
    m = store.get_group("garage").members[0]
    assert (m.offline_a, m.start_a) == (6, 0)      # the half-valid pair wrote nothing
    assert store.record_member_currents("bay-1", offline_a=12).start_a == 0


def test_record_setpoint_refuses_nonsense_and_keeps_the_last_good_one(store):
    store.create_group("garage", 50)
    store.add_member("garage", "bay-1", 40)
    store.record_setpoint("bay-1", 20, 7, 3, 1_700_000_000.5)
    for args in ((-1, 8, 3, 1.0), (float("nan"), 8, 3, 1.0), (81, 8, 3, 1.0), (16, -1, 3, 1.0),
                 (16, 8, 3.5, 1.0), (16, 8, 3, float("inf")), ("16", 8, 3, 1.0)):
        with pytest.raises(StoreError):
            store.record_setpoint("bay-1", *args)
    m = store.get_group("garage").members[0]
    assert (m.last_setpoint_a, m.last_seq, m.last_epoch, m.last_sent_at) == (20, 7, 3, 1_700_000_000.5)


def test_group_limit_and_last_setpoints_survive_a_server_restart(tmp_path):
    path = tmp_path / "groups.db"
    with GroupStore(path) as s:
        s.create_group("garage", 50, limit_a=36, fair_offline=True, t_wd_s=45)
        s.add_member("garage", "bay-1", 40)
        s.add_member("garage", "bay-2", 32)
        s.record_setpoint("bay-1", 20, 41, 2, 1_700_000_100.0)
        s.record_member_currents("bay-2", offline_a=6, start_a=0)
    with GroupStore(path) as s:
        g = s.get_group("garage")
        assert (g.breaker_a, g.limit_a, g.fair_offline, g.t_wd_s) == (50, 36, True, 45)
        b1, b2 = g.members
        assert (b1.id, b1.unit_rating_a, b1.last_setpoint_a, b1.last_seq, b1.last_epoch,
                b1.last_sent_at) == ("bay-1", 40, 20, 41, 2, 1_700_000_100.0)
        assert (b2.id, b2.offline_a, b2.start_a, b2.last_setpoint_a) == ("bay-2", 6, 0, None)


def test_fair_offline_flag_round_trips(store):
    store.create_group("garage", 50)
    assert store.set_fair_offline("garage", True).fair_offline is True
    assert store.set_fair_offline("garage", False).fair_offline is False
    with pytest.raises(StoreError):
        store.set_fair_offline("garage", 1)


def test_two_connections_see_each_others_changes(tmp_path):
    # The installer's CLI and the running service open the same file.
    path = tmp_path / "groups.db"
    with GroupStore(path) as service, GroupStore(path) as cli:
        cli.create_group("garage", 50)
        assert service.get_group("garage").limit_a == 40
        cli.set_limit("garage", 30)
        assert service.get_group("garage").limit_a == 30
