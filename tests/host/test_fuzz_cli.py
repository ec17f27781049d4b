"""Property-based fuzzing (hypothesis) of the command lines: evse-server,
evse-ota, evse-deploy, evse-charger, evse-bench and evse-sim (issue 6).

Each example takes a valid command of a tool and puts one hostile value
(empty, NaN, inf, 1e309, huge, negative, 5.999, non-ASCII digits, paths
that climb out, a byte that is not UTF-8 as Linux hands it over, ...) in
one place. The part of the tool that would do the work (run a charger, a
benchmark, a load group, serve, make keys) is replaced by a stub that
records what it was asked, so an accepted command costs nothing. Then:

- a refusal exits with the tool's documented code (2 for malformed
  arguments, 1 for a refused value), one ``error:`` line, no traceback, and
  nothing written in the current folder;
- an accepted command handed the work only values inside the documented
  ranges.
"""
import contextlib
import io
import math
import os
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from evse_tools import broker as brokers
from evse_tools import charger_sim, deploy
from evse_tools import ota as ota_tool
from evse_tools.bench import run as bench
from evse_tools.server import cli as server_cli
from evse_tools.sim import run as sim
from firmware.core import settings as fw_settings

FUZZ = hsettings(max_examples=int(os.environ.get("EVSE_FUZZ_EXAMPLES", "150")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

HOSTILE = ["", " ", "-", "--", "nan", "NaN", "inf", "-inf", "1e309", "-1", "0", "-0", "5.999", "6.0001",
           "1e3", "9" * 400, "\u0663\u0660", "../x", "/etc/passwd", "a" * 300, "\udcff", "mqtt://[::1",
           "mqtt://h:99999", "http://h/", "-5", "65536", "10.5", "true", "null", "--unknown", "=", "a=b=c"]
values = st.sampled_from(HOSTILE) | st.text(st.characters(blacklist_categories=("Cs",),
                                                          blacklist_characters="\x00"), max_size=8)


class Ran(Exception):
    """The stubbed work was reached: the tool accepted its arguments."""

    def __init__(self, *args, **kw):
        super().__init__(args)
        self.args_seen = args
        self.kw = kw


def _ran(*args, **kw):
    raise Ran(*args, **kw)


def call(main, argv):
    """Run ``main(argv)`` in a fresh empty folder. Returns (code or Ran,
    stdout, stderr, what the folder holds afterwards)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "img.bin").write_bytes(b"\xe9" + bytes(63))     # an ESP32 image header
        before = sorted(os.listdir(d))
        os.chdir(d)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
                except Ran as ran:
                    code = ran
        finally:
            os.chdir(old)
        written = sorted(set(os.listdir(d)) - set(before))
    return code, out.getvalue(), err.getvalue(), written


def assert_refused_cleanly(code, out, err, written, codes=(1, 2)):
    assert code in codes, (code, err)
    assert "Traceback" not in out + err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert written == [], written


# -- evse-charger ------------------------------------------------------------------

@FUZZ
@given(template=st.sampled_from([["--t-wd", None], ["--offline", None], ["--plug-at", None],
                                 ["--unplug-at", None], ["--plug-at", "5", "--unplug-at", None],
                                 [None]]), value=values)
def test_evse_charger_refuses_a_bad_value_cleanly_and_never_runs_with_one(template, value):
    argv = [value if a is None else a for a in template]
    with mock.patch.object(charger_sim, "run", _ran):
        code, out, err, written = call(charger_sim.main, argv)
    if isinstance(code, Ran):
        t_wd, offline, plug_at, unplug_at = code.args_seen[:4]
        assert type(t_wd) is int and 10 <= t_wd <= 600
        assert offline == 0 or 6 <= offline <= 80
        assert math.isfinite(plug_at) and plug_at >= 0 and math.isfinite(unplug_at) and unplug_at > plug_at
    elif value in ("-h", "--help"):
        assert code == 0
    else:
        assert_refused_cleanly(code, out, err, written, (2,))


# -- evse-ota ------------------------------------------------------------------------

OTA = [["keygen", "--out", None],
       ["build", "--key", "k.pem", "--version", None, "--out", "o"],
       ["build", "--key", "k.pem", "--version", "1.2.3", "--out", "o", "--file", None],
       ["build", "--key", None, "--version", "1.2.3", "--out", "o"],
       ["build", "--key", "k.pem", "--version", "1.2.3", "--out", None],
       ["verify", "--bundle", None, "--pubkey", "p.json"],
       ["verify", "--bundle", "b", "--pubkey", None],
       ["serve", "--root", ".", "--port", None],
       [None]]


@FUZZ
@given(template=st.sampled_from(OTA), value=values)
def test_evse_ota_refuses_a_bad_value_cleanly_and_writes_nothing(template, value):
    argv = [value if a is None else a for a in template]
    with mock.patch.object(ota_tool, "keygen", _ran), mock.patch.object(ota_tool, "serve", _ran):
        code, out, err, written = call(ota_tool.main, argv)
    if isinstance(code, Ran):
        if argv[0] == "keygen":
            assert argv[2].strip()       # an empty --out is not taken for the current folder
        else:
            assert 0 <= code.args_seen[2] <= 65535
    elif code == 0:
        assert value in ("-h", "--help") and written == []
    else:
        assert_refused_cleanly(code, out, err, written)


# -- evse-deploy ------------------------------------------------------------------------

DEPLOY = [["provision", "--dry-run", "--id", None]] + [
    ["provision", "--dry-run", "--id", "bay-1", opt, None]
    for opt in ("--unit-rating", "--installer-max", "--offline", "--start", "--t-wd", "--broker",
                "--wifi-ssid", "--mqtt-user", "--ca", "--wifi-password-env", "--port")] + [
    ["flash", "--dry-run", "--image", None], ["flash", "--dry-run", "--image", "img.bin", "--baud", None],
    ["flash", "--dry-run", "--image", "img.bin", "--chip", None], ["repl", "--dry-run", "--port", None],
    ["deploy", "--dry-run", "--ota-key", None], [None]]


@FUZZ
@given(template=st.sampled_from(DEPLOY), value=values)
def test_evse_deploy_refuses_a_bad_value_cleanly_and_writes_nothing(template, value):
    argv = [value if a is None else a for a in template]
    with mock.patch.object(deploy, "await_reboot", lambda *a, **k: None):
        code, out, err, written = call(deploy.main, argv)
    if code == 0:
        assert written == [] and "Traceback" not in out + err
        if argv[0] == "provision" and value not in ("-h", "--help"):
            # What would go on the charger loads there cleanly.
            line = next(s for s in out.splitlines() if s.startswith("# settings.json: "))
            text = line[len("# settings.json: "):]
            fs = _OneFile(text)
            store = fw_settings.Settings("settings.json", fw_settings.SCHEMA, fs)
            assert store.problems == []
        if argv[0] == "flash" and "--baud" in argv:
            assert 9600 <= int(value) <= 5000000
    else:
        assert_refused_cleanly(code, out, err, written)


class _OneFile:
    def __init__(self, text):
        self.text = text

    def open(self, path, mode):
        return io.StringIO(self.text)


# -- evse-bench, evse-sim, evse-server ---------------------------------------------------

@FUZZ
@given(template=st.sampled_from([["--only", None], ["--quick", "--only", None], [None]]), value=values)
def test_evse_bench_refuses_an_unknown_part_cleanly_and_runs_nothing(template, value):
    argv = [value if a is None else a for a in template]
    with mock.patch.object(bench, "machine", _ran):
        code, out, err, written = call(bench.main, argv)
    if isinstance(code, Ran):
        assert all(p in bench.PARTS for p in argv[argv.index("--only") + 1].split(",") if p) \
            if "--only" in argv else True
    elif code == 0:
        assert value in ("-h", "--help")
    else:
        assert_refused_cleanly(code, out, err, written, (2,))


@FUZZ
@given(template=st.sampled_from([[None], ["garage", "--broker", None], ["--broker", None, "shortage"]]),
       value=values)
def test_evse_sim_refuses_a_bad_scenario_or_broker_cleanly_and_starts_nothing(template, value):
    argv = [value if a is None else a for a in template]
    with mock.patch.object(sim, "LoadGroupSim", _ran), mock.patch.object(brokers, "start_mosquitto", _ran), \
            mock.patch.object(brokers, "start_embedded", _ran):
        code, out, err, written = call(sim.main, argv)
    if isinstance(code, Ran):
        return          # a scenario that loaded and a broker URL that parsed (or none: the default)
    if code == 0:
        assert value in ("-h", "--help")
    else:
        assert_refused_cleanly(code, out, err, written)


SERVER = [["group", "create", "g", "--breaker", None], ["group", "create", "g", "--breaker", "50", "--limit", None],
          ["group", "create", "g", "--breaker", "50", "--t-wd", None], ["group", "create", None, "--breaker", "50"],
          ["member", "add", "garage", None, "--rating", "32"], ["member", "add", "garage", "bay-2", "--rating", None],
          ["group", "set-limit", "garage", None], ["group", "set-breaker", "garage", None],
          ["group", "set-fair-offline", "garage", None], ["run", "--broker", None]]


@FUZZ
@given(template=st.sampled_from(SERVER), value=values)
def test_evse_server_refuses_a_bad_value_cleanly_and_changes_nothing(template, value):
    argv = [value if a is None else a for a in template]
    with tempfile.TemporaryDirectory() as d:
        db = str(Path(d, "s.db"))
        assert server_cli.main(["--db", db, "group", "create", "garage", "--breaker", "50"]) == 0
        with server_cli.GroupStore(db) as s:
            shown = repr(s.list_groups())
        with mock.patch("evse_tools.server.service.run", _ran):
            code, out, err, written = call(server_cli.main, ["--db", db] + argv)
        if isinstance(code, Ran):
            host, port = code.args_seen[1].broker
            assert host and 1 <= port <= 65535
        elif code != 0:
            assert_refused_cleanly(code, out, err, written)
            with server_cli.GroupStore(db) as s:
                assert repr(s.list_groups()) == shown         # nothing changed in the database


# -- hazards found by the fuzzing above ----------------------------------------------------

def test_evse_charger_unplug_at_nan_is_refused_instead_of_running_for_ever():
    # nan compares false with every time: the run's end never came.
    for argv in (["--unplug-at", "nan"], ["--unplug-at", "inf"], ["--plug-at", "nan"]):
        with mock.patch.object(charger_sim, "run", _ran):
            code, out, err, written = call(charger_sim.main, argv)
        assert_refused_cleanly(code, out, err, written, (2,))
        assert "--unplug-at" in err or "--plug-at" in err


def test_evse_ota_empty_out_never_writes_keys_into_the_current_folder():
    code, out, err, written = call(ota_tool.main, ["keygen", "--out", ""])
    assert_refused_cleanly(code, out, err, written, (2,))
    assert "empty folder name" in err


def test_evse_deploy_broken_broker_url_is_one_error_line_not_a_traceback():
    code, out, err, written = call(deploy.main, ["provision", "--dry-run", "--id", "bay-1",
                                                 "--broker", "mqtt://[::1"])
    assert_refused_cleanly(code, out, err, written, (1,))
    assert err.startswith("error: --broker mqtt://[::1:")


def test_evse_deploy_keep_folder_that_cannot_be_made_is_one_error_line_not_a_traceback():
    with tempfile.TemporaryDirectory() as d:
        blocker = Path(d, "file")
        blocker.write_text("x")
        for keep in (str(blocker), str(blocker / "sub")):
            code, out, err, written = call(deploy.main, ["provision", "--dry-run", "--id", "bay-1",
                                                         "--keep", keep])
            assert_refused_cleanly(code, out, err, written, (1,))
            assert err.startswith("error: --keep ")
        assert os.listdir(d) == ["file"]


def test_evse_deploy_baud_rate_outside_9600_to_5000000_is_refused():
    for baud in ("-1", "0", "9599", "5000001", "nan"):
        code, out, err, written = call(deploy.main, ["flash", "--dry-run", "--image", "img.bin",
                                                     "--baud", baud])
        assert_refused_cleanly(code, out, err, written, (2,))
    code, out, err, _ = call(deploy.main, ["flash", "--dry-run", "--image", "img.bin", "--baud", "115200"])
    assert code == 0 and "--baud 115200" in out
