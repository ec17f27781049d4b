"""``evse-server``: the installer's command line. Refusals are clear one-line
errors with exit status 1, malformed arguments exit 2, and nothing ever ends in
a traceback."""
import contextlib
import io
import string
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from evse_tools.server import cli
from evse_tools.server.db import GroupStore


def run(db, *args):
    """(exit status, stdout, stderr) of ``evse-server --db DB ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--db", str(db), *args])
    return code, out.getvalue(), err.getvalue()


def test_cli_round_trip_create_add_show_delete(tmp_path):
    db = tmp_path / "s.db"
    assert run(db, "group", "create", "garage", "--breaker", "50") == (
        0, "created group garage: breaker 50 A, limit 40 A\n", "")
    assert run(db, "member", "add", "garage", "bay-1", "--rating", "40")[0] == 0
    assert run(db, "member", "add", "garage", "bay-2", "--rating", "32")[0] == 0
    code, out, err = run(db, "group", "show", "garage")
    assert (code, err) == (0, "")
    assert "breaker   50 A" in out and "limit     40 A" in out and "watchdog  30 s" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[6:]}
    assert rows["bay-1"][:5] == ["bay-1", "40", "8", "8", "-"]
    assert rows["bay-2"][:5] == ["bay-2", "32", "8", "8", "-"]

    code, out, _ = run(db, "group", "list")
    header, line = out.splitlines()
    assert header.split() == ["NAME", "BREAKER", "LIMIT", "MEMBERS", "OFFLINE", "T_WD"]
    assert line.split() == ["garage", "50", "A", "40", "A", "2", "8", "A", "30", "s"]

    assert run(db, "member", "remove", "bay-2")[0] == 0
    assert run(db, "group", "delete", "garage") == (0, "deleted group garage and its 1 member(s)\n", "")
    assert run(db, "group", "list") == (0, "no groups\n", "")
    with GroupStore(db) as s:
        assert s.group_of("bay-1") is None


def test_cli_show_reports_the_last_setpoint_sent(tmp_path):
    db = tmp_path / "s.db"
    run(db, "group", "create", "garage", "--breaker", "50")
    run(db, "member", "add", "garage", "bay-1", "--rating", "40")
    with GroupStore(db) as s:
        s.record_setpoint("bay-1", 20, 12, 3, 1_700_000_000.0)
        s.record_member_currents("bay-1", offline_a=6, start_a=0)
    out = run(db, "group", "show", "garage")[1]
    row = [line for line in out.splitlines() if line.startswith("bay-1")][0]
    assert row.split() == ["bay-1", "40", "6", "0", "20", "12", "3"]


def test_cli_create_with_options_and_changes(tmp_path):
    db = tmp_path / "s.db"
    assert run(db, "group", "create", "shop", "--breaker", "100", "--limit", "80",
               "--fair-offline", "--t-wd", "60")[0] == 0
    assert run(db, "group", "set-breaker", "shop", "40") == (0, "group shop: breaker 40 A, limit 32 A\n", "")
    assert run(db, "group", "set-breaker", "shop", "60", "--limit", "30")[0] == 0
    assert run(db, "group", "set-limit", "shop", "48") == (0, "group shop: limit 48 A\n", "")
    assert run(db, "group", "set-fair-offline", "shop", "off")[0] == 0
    with GroupStore(db) as s:
        g = s.get_group("shop")
        assert (g.breaker_a, g.limit_a, g.fair_offline, g.t_wd_s) == (60, 48, False, 60)


def test_cli_limit_above_80_percent_exits_1_with_the_rule_and_writes_nothing(tmp_path):
    db = tmp_path / "s.db"
    code, out, err = run(db, "group", "create", "garage", "--breaker", "50", "--limit", "41")
    assert (code, out) == (1, "")
    assert err == "error: limit 41 A exceeds 80 % of the 50 A breaker (40 A max, NEC 625.41)\n"
    assert run(db, "group", "list")[1] == "no groups\n"
    run(db, "group", "create", "garage", "--breaker", "50")
    code, _, err = run(db, "group", "set-limit", "garage", "45")
    assert code == 1 and err.startswith("error: limit 45 A exceeds 80 %")
    assert "limit     40 A" in run(db, "group", "show", "garage")[1]


def test_cli_refusals_exit_1_with_one_clear_line_and_no_traceback(tmp_path):
    db = tmp_path / "s.db"
    run(db, "group", "create", "garage", "--breaker", "50")
    run(db, "member", "add", "garage", "bay-1", "--rating", "40")
    cases = [
        (("group", "show", "nope"), "error: unknown group 'nope'"),
        (("group", "delete", "nope"), "error: unknown group 'nope'"),
        (("group", "create", "garage", "--breaker", "30"), "error: group 'garage' already exists"),
        (("group", "create", "Garage", "--breaker", "30"), "error: group name 'Garage' is not valid"),
        (("group", "create", "x", "--breaker", "500"), "error: breaker 500 A is out of range"),
        (("group", "create", "x", "--breaker", "50", "--t-wd", "5"), "error: watchdog timeout 5 s"),
        (("member", "add", "nope", "bay-2", "--rating", "32"), "error: unknown group 'nope'"),
        (("member", "add", "garage", "bay-1", "--rating", "32"), "error: charger 'bay-1' is already"),
        (("member", "add", "garage", "bay_2", "--rating", "32"), "error: charger id 'bay_2' is not valid"),
        (("member", "add", "garage", "bay-2", "--rating", "90"), "error: unit rating 90 A is out of range"),
        (("member", "add", "garage", "bay-2", "--rating", "nan"), "error: unit rating must be a finite"),
        (("member", "remove", "ghost"), "error: unknown charger 'ghost'"),
    ]
    for args, start in cases:
        code, out, err = run(db, *args)
        assert code == 1, args
        assert err.startswith(start), (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    with GroupStore(db) as s:
        assert [m.id for m in s.get_group("garage").members] == ["bay-1"]


def test_cli_malformed_arguments_exit_2_without_traceback(tmp_path):
    db = tmp_path / "s.db"
    for args in (("group", "create", "x", "--breaker", "abc"),
                 ("group", "create", "x"),
                 ("group", "set-limit", "x", "4O"),
                 ("member", "add", "g", "c", "--rating", "fast"),
                 ("group", "frobnicate"),
                 ("run", "--broker", "host:notaport"),
                 ()):
        code, out, err = run(db, *args)
        assert code == 2, args
        assert "error:" in err and "Traceback" not in err


def test_cli_unreadable_database_is_a_clear_error(tmp_path):
    not_db = tmp_path / "notes.txt"
    not_db.write_text("this is not a database, " * 100)
    code, _, err = run(not_db, "group", "list")
    assert code == 1 and err.startswith("error: cannot open the database")
    code, _, err = run(tmp_path / "missing-dir" / "s.db", "group", "list")
    assert code == 1 and err.startswith("error: cannot open the database")


def test_cli_db_defaults_to_env_then_current_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EVSE_SERVER_DB", str(tmp_path / "env.db"))
    assert cli.main(["group", "create", "garage", "--breaker", "40"]) == 0
    with GroupStore(tmp_path / "env.db") as s:
        assert s.get_group("garage").limit_a == 32
    monkeypatch.delenv("EVSE_SERVER_DB")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["group", "create", "shop", "--breaker", "30"]) == 0
    with GroupStore(tmp_path / "evse-server.db") as s:
        assert s.get_group("shop").limit_a == 24


def test_group_limit_is_remembered_while_the_server_is_down(tmp_path):
    db = tmp_path / "s.db"
    run(db, "group", "create", "garage", "--breaker", "50", "--limit", "36")
    run(db, "member", "add", "garage", "bay-1", "--rating", "40")
    # Every CLI call opened and closed the database: a fresh process reads it back.
    with GroupStore(db) as s:
        g = s.get_group("garage")
        assert (g.limit_a, [m.id for m in g.members]) == (36, ["bay-1"])


def test_cli_run_hands_the_store_and_parsed_options_to_the_service(tmp_path, monkeypatch):
    import sys
    import types
    seen = {}
    fake = types.ModuleType("evse_tools.server.service")
    setattr(fake, "run", lambda store, args: seen.update(store=store, args=args) or 0)
    monkeypatch.setitem(sys.modules, "evse_tools.server.service", fake)
    import evse_tools.server as pkg
    monkeypatch.setattr(pkg, "service", fake, raising=False)
    assert run(tmp_path / "s.db", "run", "--broker", "broker.local:8883", "--prefix", "ev")[0] == 0
    assert seen["args"].broker == ("broker.local", 8883) and seen["args"].prefix == "ev"
    assert isinstance(seen["store"], GroupStore)


TOKENS = ["group", "member", "create", "list", "show", "delete", "set-breaker", "set-limit",
          "set-fair-offline", "add", "remove", "--breaker", "--limit", "--rating",
          "--fair-offline", "--t-wd", "on", "off", "garage", "bay-1", "Bad_Name", "50", "40",
          "41", "100", "7", "0", "-1", "6", "80", "81", "abc", "nan", "inf", "1e400", "", "-",
          "--", "-h", "a" * 33]


def _safe(token):
    # "run" would start the MQTT service; "--db" would point at another file.
    return token != "run" and not token.startswith("--d")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS) | st.text(string.printable, max_size=8).filter(_safe),
                max_size=7))
def test_random_cli_arguments_never_produce_a_traceback(argv):
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "s.db"
        run(db, "group", "create", "garage", "--breaker", "50")
        run(db, "member", "add", "garage", "bay-1", "--rating", "32")
        code, out, err = run(db, *argv)
    assert code in (0, 1, 2)
    assert "Traceback" not in out + err
    if code == 1:
        assert err.startswith("error: ")


def test_group_limit_zero_pauses_the_group_through_every_way_a_limit_is_set(tmp_path):
    """Issue 11, finding 3: an installer or automation could not pause a
    group; ``set-limit G 0`` answered "below the 6 A minimum". 0 now means
    "everyone paused"; 0.1 to 5.9 A stay refused with that message, and a
    refusal changes nothing."""
    db = tmp_path / "s.db"
    assert run(db, "group", "create", "garage", "--breaker", "50")[0] == 0
    assert run(db, "group", "set-limit", "garage", "0") == (
        0, "group garage: limit 0 A: every member paused\n", "")
    code, out, _ = run(db, "group", "show", "garage")
    assert code == 0 and "limit     0 A: PAUSED" in out
    assert "0 A (paused)" in run(db, "group", "list")[1]
    assert run(db, "group", "set-breaker", "garage", "50", "--limit", "0")[0] == 0
    assert run(db, "group", "create", "shed", "--breaker", "30", "--limit", "0")[0] == 0
    assert GroupStore(str(db)).get_group("shed").limit_a == 0
    assert run(db, "group", "set-limit", "garage", "40")[0] == 0
    for bad in ("0.1", "1", "5", "5.9"):
        code, out, err = run(db, "group", "set-limit", "garage", bad)
        assert (code, out) == (1, "")
        assert err == ("error: limit %s A is below the 6 A minimum charging current (J1772); "
                       "0 pauses the group\n" % bad)
        assert run(db, "group", "set-breaker", "garage", "50", "--limit", bad)[0] == 1
        assert run(db, "group", "create", "x" + bad.replace(".", ""), "--breaker", "50",
                   "--limit", bad)[0] == 1
    assert GroupStore(str(db)).get_group("garage").limit_a == 40
    assert [g.name for g in GroupStore(str(db)).list_groups()] == ["garage", "shed"]
    assert run(db, "group", "set-limit", "garage", "-1")[0] in (1, 2)


def test_a_schema_1_database_is_migrated_with_its_members_kept(tmp_path):
    """Schema 1 refused a limit of 0 in SQL and kept no worst case; opening
    it migrates both tables and keeps every member (foreign keys must not
    cascade them away)."""
    import sqlite3
    db = tmp_path / "old.db"
    con = sqlite3.connect(str(db))
    con.executescript("""
        CREATE TABLE groups (name TEXT PRIMARY KEY, breaker_a INTEGER NOT NULL,
            limit_a INTEGER NOT NULL CHECK (limit_a >= 6 AND limit_a * 5 <= breaker_a * 4),
            fair_offline INTEGER NOT NULL DEFAULT 0 CHECK (fair_offline IN (0, 1)),
            t_wd_s INTEGER NOT NULL DEFAULT 30, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE members (id TEXT PRIMARY KEY,
            group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
            unit_rating_a REAL NOT NULL, offline_a REAL NOT NULL DEFAULT 8,
            start_a REAL NOT NULL DEFAULT 8, last_setpoint_a REAL, last_seq INTEGER,
            last_epoch INTEGER, last_sent_at REAL);
        CREATE INDEX members_by_group ON members(group_name);
        INSERT INTO groups VALUES ('garage', 50, 40, 0, 30, 1.0, 1.0);
        INSERT INTO members VALUES ('bay-1', 'garage', 40, 8, 8, 20, 7, 3, 1.0);
        PRAGMA user_version = 1;""")
    con.close()
    with GroupStore(str(db)) as s:
        [m] = s.get_group("garage").members
        assert (m.id, m.last_setpoint_a, m.worst_a) == ("bay-1", 20, None)
        assert s.set_limit("garage", 0).limit_a == 0
        s.record_sent([("bay-1", 0.0, 8, 3, 2.0, 0.0, 0.0, 20.0)])
        assert s.get_group("garage").members[0].worst_a == 20.0
    assert sqlite3.connect(str(db)).execute("PRAGMA user_version").fetchone()[0] == 2
