"""Settings persistence (C5): safe defaults, atomic writes, secrets apart."""
import json

from fakes import CutFs, PowerCut
from harness import raises

from firmware.core import settings

CORRUPT = ("", "{", "null", "[]", "\x00\x00\x00", '{"offline_a": 8', "garbage",
           '"settings"', "1e309", "[" * 20000, '{"a": ' * 5000, "{" + " " * 9000 + "}",
           '{"offline_a" 40 "start_a" 40}', '{"offline_a": 8,}', '{"offline_a": 08}')


def test_missing_settings_file_gives_8a_start_and_8a_offline_never_unit_max():
    cfg = settings.Settings("settings.json", settings.SCHEMA, CutFs())
    assert cfg["start_a"] == 8
    assert cfg["offline_a"] == 8
    assert cfg["installer_max_a"] == 16
    assert cfg["installer_max_a"] < cfg["unit_rating_a"]
    assert cfg["t_wd_s"] == 30
    assert cfg.problems


def test_settings_file_larger_than_the_whole_heap_gives_8a_start_and_8a_offline():
    # 100 KB of "[" on a real filesystem: more than the charger's 48 KB heap
    # could hold, so it must never be read whole (found by review: MemoryError).
    import random

    from firmware.core import atomicfile as store
    path = "/tmp/evse-fw-test-huge-settings-%d.json" % random.getrandbits(30)
    with open(path, "w") as f:
        for _ in range(100):
            f.write("[" * 1000)
    try:
        cfg = settings.Settings(path, settings.SCHEMA, store.FS)
        assert (cfg["start_a"], cfg["offline_a"], cfg["installer_max_a"]) == (8, 8, 16)
        assert cfg.problems
    finally:
        import os
        os.remove(path)


def test_corrupt_settings_file_gives_8a_start_and_8a_offline():
    # Deep nesting and huge files included: loading must never raise, or the
    # charger would never start (found by review: RecursionError, MemoryError).
    for text in CORRUPT:
        cfg = settings.Settings("settings.json", settings.SCHEMA, CutFs({"settings.json": text}))
        assert (cfg["start_a"], cfg["offline_a"], cfg["installer_max_a"]) == (8, 8, 16), text[:40]
        assert cfg.problems, text[:40]


def test_bad_field_falls_back_to_its_own_default_only():
    text = json.dumps({"offline_a": "lots", "start_a": 3, "t_wd_s": 5, "installer_max_a": 24,
                       "unit_rating_a": True})
    cfg = settings.Settings("settings.json", settings.SCHEMA, CutFs({"settings.json": text}))
    assert (cfg["offline_a"], cfg["start_a"], cfg["t_wd_s"]) == (8, 8, 30)
    assert cfg["installer_max_a"] == 24
    assert cfg["unit_rating_a"] == 32
    assert len(cfg.problems) == 4


def test_power_cut_at_every_step_of_a_write_leaves_old_or_new_never_none():
    old = {"offline_a": 10, "start_a": 8}
    base = CutFs({"settings.json": json.dumps(old)})
    probe = settings.Settings("settings.json", settings.SCHEMA, CutFs(base.files))
    probe.update({"offline_a": 12})
    total = len(probe.fs.steps)
    assert total >= 4      # open, write (2 halves), close, sync, rename
    outcomes = []
    for cut in range(total + 1):
        fs = CutFs(base.files, cut_at=cut)
        cfg = settings.Settings("settings.json", settings.SCHEMA, fs)
        try:
            cfg.update({"offline_a": 12})
        except PowerCut:
            pass
        after = settings.Settings("settings.json", settings.SCHEMA, CutFs(fs.files))
        assert not after.problems, (cut, after.problems)
        assert after["offline_a"] in (10, 12), cut
        outcomes.append(after["offline_a"])
    assert outcomes[0] == 10 and outcomes[-1] == 12


def test_settings_are_written_only_when_a_value_changes():
    fs = CutFs()
    cfg = settings.Settings("settings.json", settings.SCHEMA, fs)
    assert cfg.update({"offline_a": 8, "start_a": 8}) is False
    assert fs.steps == []
    assert cfg.update({"offline_a": 6}) is True
    n = len(fs.steps)
    assert cfg.set("offline_a", 6) is False
    assert len(fs.steps) == n


def test_bad_update_changes_nothing_all_or_nothing():
    fs = CutFs()
    cfg = settings.Settings("settings.json", settings.SCHEMA, fs)
    for bad in ({"offline_a": 10, "start_a": "abc"}, {"offline_a": 5}, {"nope": 1},
                {"t_wd_s": 9}, {"t_wd_s": 601}, {"t_wd_s": 30.5}, {"charger_id": "Bad Id"},
                {"offline_a": float("nan")}, {"installer_max_a": 81}):
        exc = raises(ValueError, cfg.update, bad)
        assert str(exc)
        assert cfg["offline_a"] == 8 and cfg["t_wd_s"] == 30
    assert fs.steps == []
    assert "settings.json" not in fs.files


def test_error_messages_say_what_is_wrong():
    cfg = settings.Settings("settings.json", settings.SCHEMA, CutFs())
    assert "offline_a must be a number" in str(raises(ValueError, cfg.set, "offline_a", "abc"))
    assert "0 or 6..80" in str(raises(ValueError, cfg.set, "offline_a", 3))
    assert "unknown setting" in str(raises(ValueError, cfg.set, "offlne_a", 8))


def test_secrets_live_in_their_own_file_apart_from_settings():
    fs = CutFs()
    cfg, secrets = settings.load("", fs)
    secrets.update({"mqtt_password": "hunter2", "wifi_ssid": "garage"})
    cfg.update({"offline_a": 10})
    assert "hunter2" in fs.files["secrets.json"]
    assert "hunter2" not in fs.files["settings.json"]
    assert "mqtt_password" not in cfg.values
    raises(ValueError, cfg.set, "mqtt_password", "x")


def test_settings_survive_a_reload():
    fs = CutFs()
    cfg = settings.Settings("settings.json", settings.SCHEMA, fs)
    cfg.update({"offline_a": 10, "start_a": 6, "t_wd_s": 60, "charger_id": "garage-2"})
    again = settings.Settings("settings.json", settings.SCHEMA, CutFs(fs.files))
    assert (again["offline_a"], again["start_a"], again["t_wd_s"], again["charger_id"]) == \
        (10, 6, 60, "garage-2")
    assert again.problems == []
