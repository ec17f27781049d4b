"""A charger in steady state for allocation and tick-time measurements on the
device runtime (issue 13): used by tests/host/test_device_runtime.py (the
0-byte proof) and by the firmware benchmark. Not a test module itself.

The charger charges at 20 A from the server, with every edge of the real
wiring behind the control loop's boundaries: the server bridge (on a
:class:`fakes.FakeLink`), OTA and its health check, and the link watch. Once
steady, the EV model is held still (``board.step`` does nothing): what is
measured is the firmware, not the simulated EV's arithmetic.
"""
import gc

from fakes import FakeLink
from harness import ev, make_charger, run_ms, setpoint

from firmware import loop
from firmware.net.bridge import MAX_GAP_MS, OtaEdge, ServerBridge
from firmware.net.watch import LinkWatch
from firmware.ota.update import Health, Updater


def rig():
    """Returns ``(charger, board, clock, edges, link)`` in steady state."""
    c, board, clock = make_charger()
    board.plug(ev(max_a=48))
    link = FakeLink()
    bridge = ServerBridge(c, link, "bay-1", "test", Updater("", "1.0.0", c.settings.fs))
    ota = OtaEdge(c, bridge.updater, Health("", clock, 60, c.settings.fs), "test")
    watch = LinkWatch(bridge, FakeLink, clock, c.log)
    edges = [loop.Edge("server bridge", bridge.poll, clock, c.log),
             loop.Edge("ota", ota.poll, clock, c.log),
             loop.Edge("link watch", watch.poll, clock, c.log)]
    run_ms(c, clock, 1000)
    link.inbox.append(("set", setpoint(1, 20)))
    loop.run(c, clock, edges, ticks=400)
    board.step = _still                     # the EV holds its state and its current
    loop.run(c, clock, edges, ticks=600)
    assert board.relay and c.limit_a == 20 and c.limit_by == "setpoint", c.limit_by
    return c, board, clock, edges, link


def _still():
    pass


def allocated(fn):
    """Bytes ``fn()`` allocates (GC off while it runs; MicroPython only)."""
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        fn()
        return gc.mem_alloc() - before
    finally:
        gc.enable()


def measure():
    """``(tick_bytes, loop_bytes, report_bytes)``: bytes allocated by 1,000
    control ticks alone, by 400 iterations of the whole loop (tick,
    write-behind check, every edge) between two reports, and by one loop
    iteration that sends a report."""
    c, board, clock, edges, link = rig()

    def ticks():
        for _ in range(1000):
            c.tick()
            clock.advance(10)
    tick_bytes = allocated(ticks)
    # Line up just after a report: the next is due MAX_GAP_MS later.
    sent = len(link.sent)
    while len(link.sent) == sent:
        loop.run(c, clock, edges, ticks=1)
    quiet = MAX_GAP_MS // 10 - 100
    loop_bytes = allocated(lambda: loop.run(c, clock, edges, ticks=quiet))
    sent = len(link.sent)
    while True:
        got = allocated(lambda: loop.run(c, clock, edges, ticks=1))
        if len(link.sent) != sent:
            break
    return tick_bytes, loop_bytes, got
