"""The limit arbiter: start current, setpoints, watchdog (C1-C4, C6)."""
from fakes import PERIOD, FakeClock
from harness import make_store, raises, setpoint

from firmware.core.limit import LimitArbiter

# Every payload that C3 and issue 2 name as malformed.
BAD_PAYLOADS = (
    b"", b"NaN", b"inf", b"1e309", b"-5", b'"32"', b'{"current_a": null}', b"{}",
    b"\x8f" * 4096, b"x" * 4096, b"\xff\xfe\xfd",
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": NaN}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 1e309}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": -1e309}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": -5}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": "32"}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": true}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": [32]}',
    b'{"v": 1, "epoch": 1, "seq": "9", "current_a": 32}',
    b'{"v": 1, "epoch": 1, "seq": 9.5, "current_a": 32}',
    b'{"v": 1, "epoch": 1, "current_a": 32}',
    b'{"v": 2, "epoch": 1, "seq": 9, "current_a": 32}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "offline_a": 3}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "start_a": 100}',
    b'[1, 2]',
    # MicroPython's json.loads takes these; the strict checker must refuse them
    # on both runtimes (found by review: they fed the watchdog on the device).
    b'{"v", 1, "epoch", 1, "seq", 9, "current_a", 32}',
    b'{"v": 1 "epoch": 1 "seq": 9 "current_a": 32}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32,}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 032}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32 99}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32}\x00',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "x": "\\q"}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "x": "\xc0\xaf"}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "x": "\xed\xa0\x80"}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32}{}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 5.99999999}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32e0}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 3.2E1}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": .5}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32.}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": +32}',
    b'{"v": 1, "epoch": 1, "seq": 9, "current_a": 32, "n": [[[[[1]]]]]}',
)


def arbiter(values=None, clock=None):
    clock = clock or FakeClock()
    preset = {"unit_rating_a": 40, "installer_max_a": 40}
    if values:
        preset.update(values)
    return LimitArbiter(clock, make_store(preset), clock.ticks_ms()), clock


def test_session_starts_at_start_current_before_any_setpoint():
    a, clock = arbiter()
    a.start_session()
    assert a.limit(clock.ticks_ms()) == (8, "start")


def test_malformed_setpoints_are_rejected_change_nothing_and_do_not_feed_watchdog():
    a, clock = arbiter()
    a.offer(setpoint(5, 20), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (20, "setpoint")
    clock.advance(29000)
    for bad in BAD_PAYLOADS + (setpoint(5, 32), setpoint(4, 32)):   # the last two: old seq
        exc = raises(ValueError, a.offer, bad, clock.ticks_ms())
        assert str(exc), bad
        assert a.limit(clock.ticks_ms()) == (20, "setpoint"), bad
        assert a.ack_seq == 5
    assert a.rejected == len(BAD_PAYLOADS) + 2
    assert a.settings["offline_a"] == 8 and a.settings["start_a"] == 8
    # None of them renewed the lease: 30 s after the last valid one, offline.
    clock.advance(1000)
    assert a.limit(clock.ticks_ms()) == (8, "offline")


def test_setpoint_replaces_previous_not_min_of_old_and_new():
    a, clock = arbiter()
    a.start_session()
    for seq, amps in ((1, 40), (2, 20), (3, 32)):
        a.offer(setpoint(seq, amps), clock.ticks_ms())
        assert a.limit(clock.ticks_ms()) == (amps, "setpoint")


def test_setpoint_above_unit_rating_is_clamped_to_the_unit():
    a, clock = arbiter({"unit_rating_a": 32, "installer_max_a": 40})
    a.offer(setpoint(1, 48), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (32, "unit")
    b, clock = arbiter({"unit_rating_a": 40, "installer_max_a": 24})
    b.offer(setpoint(1, 1000000), clock.ticks_ms())
    assert b.limit(clock.ticks_ms()) == (24, "unit")


def test_setpoints_0_3_and_5_9_pause():
    a, clock = arbiter()
    for seq, amps in ((1, 0), (2, 3), (3, 5.9)):
        a.offer(setpoint(seq, amps), clock.ticks_ms())
        assert a.limit(clock.ticks_ms()) == (0, "pause"), amps
    a.offer(setpoint(4, 6), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (6, "setpoint")


def test_watchdog_lease_does_not_come_back_after_2_29_ms_of_silence():
    # ticks_diff turns negative after 2^29 ms: expiry must be latched (C6).
    a, clock = arbiter({"offline_a": 0})
    a.start_session()
    a.offer(setpoint(1, 40), clock.ticks_ms())
    for _ in range(40):                       # the control loop asks every tick;
        clock.advance(1 << 25)                # here every 2^25 ms, past 2^30 in all
        assert a.limit(clock.ticks_ms()) == (0, "pause")
        assert not a.online(clock.ticks_ms())
    a.offer(setpoint(2, 16), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (16, "setpoint")


def test_message_from_an_older_epoch_is_rejected():
    a, clock = arbiter()
    a.offer(setpoint(1, 10, epoch=6), clock.ticks_ms())
    raises(ValueError, a.offer, setpoint(900, 40, epoch=5), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (10, "setpoint")
    assert (a.epoch, a.ack_seq) == (6, 1)


def test_lower_offline_current_is_in_force_even_when_flash_write_fails():
    a, clock = arbiter({"offline_a": 16, "t_wd_s": 10})
    fs = a.settings.fs
    fs.cut_at = len(fs.steps)              # the next write fails at its first step

    try:
        a.offer(setpoint(1, 20, offline_a=6), clock.ticks_ms())
    except Exception:
        pass
    assert a.settings["offline_a"] == 6 and a.settings.unsaved
    clock.advance(10000)
    assert a.limit(clock.ticks_ms()) == (6, "offline")
    fs.cut_at = None
    a.offer(setpoint(2, 20), clock.ticks_ms())
    a.settings.update({})                  # retried with the next update
    assert not a.settings.unsaved and '"offline_a": 6' in fs.files["settings.json"]


def test_old_seq_in_same_epoch_is_rejected_new_epoch_accepted():
    a, clock = arbiter()
    a.offer(setpoint(10, 20, epoch=3), clock.ticks_ms())
    raises(ValueError, a.offer, setpoint(10, 40, epoch=3), clock.ticks_ms())
    raises(ValueError, a.offer, setpoint(9, 40, epoch=3), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (20, "setpoint")
    a.offer(setpoint(1, 16, epoch=4), clock.ticks_ms())   # the server restarted
    assert a.limit(clock.ticks_ms()) == (16, "setpoint")
    assert (a.epoch, a.ack_seq) == (4, 1)


def test_watchdog_falls_back_exactly_at_t_wd_across_the_tick_wrap():
    clock = FakeClock(PERIOD - 5000)         # 5 s before the 2^30 ms wrap
    a, clock = arbiter({"offline_a": 6}, clock)
    a.offer(setpoint(1, 32), clock.ticks_ms())
    t0 = clock.ticks_ms()
    clock.advance(30000 - 1)                 # wraps on the way
    assert clock.ticks_ms() < t0
    assert a.limit(clock.ticks_ms()) == (32, "setpoint")   # not earlier
    clock.advance(1)
    assert a.limit(clock.ticks_ms()) == (6, "offline")     # not a tick later
    assert a.lease_age_ms(clock.ticks_ms()) == 30000


def test_watchdog_counts_from_boot_when_no_server_ever_answers():
    a, clock = arbiter({"offline_a": 6, "t_wd_s": 10})
    a.start_session()
    clock.advance(9999)
    assert a.limit(clock.ticks_ms()) == (8, "start")
    clock.advance(1)
    assert a.limit(clock.ticks_ms()) == (6, "offline")


def test_session_started_offline_never_exceeds_start_current():
    # Fair fallback gives 20 A offline, but a session the server never saw
    # stays at the start current (C2).
    a, clock = arbiter({"offline_a": 20, "t_wd_s": 10})
    clock.advance(10000)
    a.start_session()
    assert a.limit(clock.ticks_ms()) == (8, "start")
    a.offer(setpoint(1, 16), clock.ticks_ms())
    clock.advance(10000)
    assert a.limit(clock.ticks_ms()) == (20, "offline")


def test_new_session_drops_previous_sessions_setpoint_to_start_current():
    a, clock = arbiter()
    a.offer(setpoint(1, 40), clock.ticks_ms())
    a.start_session()
    assert a.limit(clock.ticks_ms()) == (8, "start")
    a.offer(setpoint(2, 8), clock.ticks_ms())   # routine refresh for an idle member
    assert a.limit(clock.ticks_ms()) == (8, "setpoint")


def test_valid_setpoint_after_fallback_restores_server_control():
    a, clock = arbiter({"offline_a": 6, "t_wd_s": 10})
    a.offer(setpoint(1, 32), clock.ticks_ms())
    clock.advance(15000)
    assert a.limit(clock.ticks_ms()) == (6, "offline")
    a.offer(setpoint(2, 24), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (24, "setpoint")


def test_offline_and_start_current_from_server_are_stored_only_on_change():
    # The arbiter puts them in force in RAM; the write-behind saves them
    # (Settings.save) between ticks, and only when they changed (C5).
    a, clock = arbiter()
    fs = a.settings.fs
    a.offer(setpoint(1, 20, offline_a=10, start_a=6), clock.ticks_ms())
    assert (a.settings["offline_a"], a.settings["start_a"]) == (10, 6)
    assert fs.steps.count("rename") == 0          # no flash write on the tick
    a.settings.save()
    assert fs.steps.count("rename") == 1
    a.offer(setpoint(2, 20, offline_a=10, start_a=6), clock.ticks_ms())
    a.settings.save()
    assert fs.steps.count("rename") == 1
    a.offer(setpoint(3, 20, offline_a=0), clock.ticks_ms())
    a.settings.save()
    assert fs.steps.count("rename") == 2
    assert '"offline_a": 0' in fs.files["settings.json"]


def test_fault_forces_zero_whatever_the_setpoint():
    a, clock = arbiter()
    a.offer(setpoint(1, 32), clock.ticks_ms())
    a.faults.trip("gfci", clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (0, "fault")


def test_thermal_derating_halves_then_quarters_but_never_below_6a():
    a, clock = arbiter()
    a.offer(setpoint(1, 40), clock.ticks_ms())
    a.derate.level = 1
    assert a.limit(clock.ticks_ms()) == (20, "thermal")
    a.derate.level = 2
    assert a.limit(clock.ticks_ms()) == (10, "thermal")
    a.offer(setpoint(2, 16), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (6, "thermal")      # 16 / 4 = 4 -> 6 A
    a.offer(setpoint(3, 6), clock.ticks_ms())
    assert a.limit(clock.ticks_ms()) == (6, "setpoint")
