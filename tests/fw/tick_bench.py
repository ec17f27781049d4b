"""The control tick's duration while durable state is being persisted with
the modelled flash latency (issue 13): run on the device runtime by
``evse_tools.bench.firmware.tick_duration``. Not a test module.

A charger charges from a server that sends a setpoint with a new offline
current every 100 ms; every 3 s a GFCI trip within 10 s of the close locks it
out (a lockout record and a fault-log entry to write), and a remote reset
ends the lockout 1 s later (the record to clear). Every file write waits
``flash_ms`` before its rename commits it (:class:`simboard.board.SlowFs`).

Two modes, same run: ``behind`` is the firmware (the write-behind runs after
the tick, between ticks), ``inside`` is the baseline of writing on the tick
(the same write-behind step timed as part of the tick, as the firmware did
before issue 13). Prints one JSON line per mode: tick durations (us), the
write-behind steps' durations (us) and the writes made.
"""
import json
import time

from simboard.board import SimBoard, SlowFs
from simboard.ev import SimEv

from firmware.core import charger as app
from firmware.core import commands, settings


def _pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, (p * (len(values) - 1) + 50) // 100)]


def run(directory, mode, ticks, flash_ms):
    fs = SlowFs(flash_ms)
    cfg = settings.Settings(directory + "/settings.json", settings.SCHEMA, fs)
    cfg.update({"unit_rating_a": 40, "installer_max_a": 40})
    board = SimBoard(time)
    c = app.Charger(board, time, cfg)
    board.plug(SimEv(max_a=32, delay_ms=1000))
    writer = c.writer
    tick_us = []
    step_us = []
    seq = 0
    due = time.ticks_ms()
    trip_at = time.ticks_add(due, 3000)
    reset_at = None
    for n in range(ticks):
        if n % 10 == 0:
            seq += 1
            payload = '{"v":1,"epoch":1,"seq":%d,"current_a":20,"offline_a":%d}' % (
                seq, 8 if seq % 2 else 10)
            c.commands.put(commands.SETPOINT, payload.encode())
        now = time.ticks_ms()
        if time.ticks_diff(now, trip_at) >= 0:
            board.gfci = True
            trip_at = time.ticks_add(now, 3000)
            reset_at = time.ticks_add(now, 1000)
        elif board.gfci:
            board.gfci = False
        if reset_at is not None and time.ticks_diff(now, reset_at) >= 0:
            c.commands.put(commands.RESET_FAULT)
            reset_at = None
        t0 = time.ticks_us()
        c.tick()
        if mode == "inside":
            writer.step()
        t1 = time.ticks_us()
        if mode == "behind":
            writer.step()
        t2 = time.ticks_us()
        tick_us.append(time.ticks_diff(t1, t0))
        step_us.append(time.ticks_diff(t2, t1) if mode == "behind" else 0)
        due = time.ticks_add(due, 10)
        wait = time.ticks_diff(due, time.ticks_ms())
        if wait > 0:
            time.sleep_ms(wait)
        else:
            due = time.ticks_ms()
    print(json.dumps({
        "mode": mode, "ticks": ticks, "flash_ms": flash_ms, "writes": fs.writes,
        "lockouts": sum(1 for _, text in c.events if "lockout" in text),
        "tick_us": {"p50": _pct(tick_us, 50), "p99": _pct(tick_us, 99), "max": max(tick_us)},
        "gap_us": {"p50": _pct(step_us, 50), "p99": _pct(step_us, 99), "max": max(step_us)},
    }))
