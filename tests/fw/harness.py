"""Builders shared by the firmware tests in both runtimes (no pytest needed)."""
from fakes import CutFs, FakeClock

from firmware.core import charger as app
from firmware.core import settings
from simboard.ev import SimEv
from simboard.board import SimBoard

T_WD_S = 30


def raises(exc_type, fn, *args):
    """Call ``fn(*args)``; return the exception if it is an ``exc_type``,
    fail the test if nothing was raised."""
    try:
        fn(*args)
    except exc_type as exc:
        return exc
    raise AssertionError("%s not raised" % exc_type.__name__)


def make_store(values=None, fs=None):
    """A settings Store on an in-memory filesystem, preloaded with ``values``."""
    fs = fs or CutFs()
    if values:
        import json
        fs.files["settings.json"] = json.dumps(values)
    return settings.Settings("settings.json", settings.SCHEMA, fs)


def make_charger(values=None, start=None):
    """A Charger on a SimBoard with an injected clock. ``values`` preset settings
    (default: a 40 A unit with a 40 A installer max). Returns (charger, board, clock)."""
    preset = {"unit_rating_a": 40, "installer_max_a": 40}
    if values:
        preset.update(values)
    clock = FakeClock() if start is None else FakeClock(start)
    board = SimBoard(clock)
    charger = app.Charger(board, clock, make_store(preset))
    return charger, board, clock


def run_ms(charger, clock, ms, tick_ms=app.TICK_MS):
    """Run the control loop for ``ms`` ms of virtual time: each tick, then the
    write-behind's step, as :func:`firmware.loop.run` does."""
    for _ in range(ms // tick_ms):
        charger.tick()
        charger.writer.step()
        clock.advance(tick_ms)


def ev(**kw):
    """A simulated EV with a 1 s response delay unless told otherwise."""
    kw.setdefault("delay_ms", 1000)
    return SimEv(**kw)


def setpoint(seq, amps, epoch=1, **extra):
    """A valid ``set`` payload (bytes)."""
    import json
    msg = {"v": 1, "epoch": epoch, "seq": seq, "current_a": amps}
    msg.update(extra)
    return json.dumps(msg).encode()
