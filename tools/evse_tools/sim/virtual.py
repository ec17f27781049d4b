"""A load group in virtual time, in one CPython process.

Each charger is the firmware's own limit arbiter (:class:`firmware.core.limit.LimitArbiter`)
with its settings store, fed through a message bus that can delay, drop or
withhold messages; each EV answers the offer after its response delay and
tapers. The allocator is the server's (:mod:`evse_tools.server.allocator`).
Used by the allocator's property tests and by benchmarks; the real thing, with
processes and a broker, is :mod:`evse_tools.sim.run`.

Units: A, s (virtual); the firmware's clock runs in ms.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace

from firmware.core import settings as fw_settings
from firmware.core.limit import LimitArbiter
from evse_tools.server.allocator import Allocator, GroupConfig, Member, Report
from evse_tools.server.ledger import offline_possible, start_possible

_PERIOD = 1 << 30


class TickClock:
    """ESP32-like ms clock (period 2^30) driven by virtual seconds."""

    def __init__(self, start_ms: int = _PERIOD - 5000):
        self.now = start_ms

    def ticks_ms(self) -> int:
        return self.now

    def ticks_diff(self, a: int, b: int) -> int:
        return ((a - b + _PERIOD // 2) % _PERIOD) - _PERIOD // 2

    def ticks_add(self, t: int, d: int) -> int:
        return (t + d) % _PERIOD

    def set_seconds(self, base: int, seconds: float) -> None:
        self.now = (base + int(seconds * 1000)) % _PERIOD


class _MemFs:
    def __init__(self):
        self.files: dict[str, str] = {}

    def open(self, path, mode):
        fs = self

        class F:
            def __init__(self):
                if "w" in mode:
                    fs.files[path] = ""
                elif path not in fs.files:
                    raise OSError(2, "ENOENT")

            def write(self, text):
                fs.files[path] += text

            def read(self, n=-1):
                return fs.files[path] if n < 0 else fs.files[path][:n]

            def close(self):
                pass
        return F()

    def rename(self, a, b):
        self.files[b] = self.files.pop(a)

    def remove(self, p):
        del self.files[p]

    def sync(self):
        pass


EV_RESPONSE_S = 5.0
"""IEC 61851-1 Table A.6: an EV follows a lower duty within 5 s."""


@dataclass
class VirtualEv:
    """An EV: onboard maximum ``max_a``, response delay ``delay_s``, and a
    draw cap ``taper_a`` (None = none) that scenarios lower to model taper.

    ``worst_case`` True makes it the adversary that IEC 61851-1 allows: it
    follows a raise at once and a decrease only after the full 5 s, so it
    draws the highest pilot offered in the last 5 s (``delay_s`` is then
    unused)."""

    max_a: float = 32.0
    delay_s: float = 2.0
    taper_a: float | None = None
    worst_case: bool = False
    drawn_a: float = 0.0
    _seen: list = field(default_factory=list)
    energy_wh: float = 0.0


class VirtualCharger:
    """One charger: the firmware's arbiter, a session flag and an EV."""

    def __init__(self, cid: str, unit_rating_a: float, clock: TickClock, t_wd_s: int):
        self.id = cid
        self.clock = clock
        self.fs = _MemFs()
        self.store = fw_settings.Settings("settings.json", fw_settings.SCHEMA, self.fs)
        self.store.update({"unit_rating_a": unit_rating_a, "installer_max_a": unit_rating_a,
                           "t_wd_s": t_wd_s})
        self.arbiter = LimitArbiter(clock, self.store, clock.ticks_ms())
        self.ev: VirtualEv | None = None
        self._offers: list[tuple[float, float]] = []   # (s, A) pilots offered to this EV, last 5 s
        self.session_wh = 0.0
        self.fault_until: float | None = None    # a fault (contactor open) until then, s
        self._off_since: float | None = None
        self._closed = False

    def trip(self, now: float, seconds: float) -> None:
        """A fault (a GFCI trip, say): nothing offered until ``now + seconds``,
        then a retry that starts a new session at the start current (C2)."""
        self.fault_until = now + seconds
        self.arbiter.faults.trip("gfci", self.clock.ticks_ms())
        self._offers = []          # the contactor opens: the session's offers are over

    def limit(self) -> float:
        """The current the pilot offers now, A."""
        if self.ev is None:
            return 0.0
        return float(self.arbiter.limit(self.clock.ticks_ms())[0])

    def plug(self, ev: VirtualEv) -> None:
        self.ev = ev
        self.session_wh = 0.0
        self.arbiter.start_session()
        self._offers = []

    def may_draw(self, now: float) -> float:
        """The most its EV may draw now under IEC 61851-1, A: the highest pilot
        offered in the last 5 s (an EV follows a decrease within 5 s), within
        the EV's own maximum and taper; 0 without a car or with the contactor
        open on a fault."""
        ev = self.ev
        if ev is None or self.fault_until is not None or not self._offers:
            return 0.0
        cap = min(ev.max_a, ev.taper_a if ev.taper_a is not None else ev.max_a)
        return min(cap, max(a for _t, a in self._offers))

    def unplug(self) -> None:
        self.ev = None
        self._closed = False

    def deliver(self, payload: bytes) -> None:
        try:
            self.arbiter.offer(payload, self.clock.ticks_ms())
        except ValueError:
            pass

    def advance(self, now: float, dt: float) -> None:
        if self.fault_until is not None and now >= self.fault_until:
            self.fault_until = None
            self.arbiter.faults.reset(self.clock.ticks_ms())
            self.arbiter.start_session()
        ev = self.ev
        if ev is None:
            return
        offer = self.limit()
        self._offers.append((now, offer))
        while len(self._offers) > 1 and self._offers[1][0] <= now - EV_RESPONSE_S:
            self._offers.pop(0)
        if ev.worst_case:
            # Every pilot offered in the last 5 s may still be followed.
            ev._seen.append((now, offer))
            while ev._seen and ev._seen[0][0] < now - EV_RESPONSE_S:
                ev._seen.pop(0)
            target = max(o for _t, o in ev._seen)
        else:
            ev._seen.append((now + ev.delay_s, offer))
            target = ev.drawn_a
            while ev._seen and ev._seen[0][0] <= now:
                target = ev._seen.pop(0)[1]
        cap = min(ev.max_a, ev.taper_a if ev.taper_a is not None else ev.max_a)
        # The EV follows every pilot change, up or down, only after its delay
        # (IEC 61851-1 allows 5 s for a decrease), so it may draw more than
        # the present offer for a while. Without an offer the contactor stays
        # closed up to 6 s (Table A.6), and a fault opens it at once.
        if self.fault_until is not None:
            self._closed = False          # a fault opens the contactor at once
        elif offer > 0:
            self._closed = True
            self._off_since = None
        elif self._closed:
            if self._off_since is None:
                self._off_since = now
            elif now - self._off_since >= 6.0:
                self._closed = False
        ev.drawn_a = min(target, cap) if self._closed else 0.0
        wh = ev.drawn_a * 240 * dt / 3600
        ev.energy_wh += wh
        self.session_wh += wh

    def report(self) -> Report:
        a = self.arbiter
        amps, why = a.limit(self.clock.ticks_ms())
        return Report(state="F" if self.fault_until is not None else "C" if self.ev else "A",
                      fault="gfci" if self.fault_until is not None else None,
                      relay=self.fault_until is None and self.ev is not None,
                      measured_a=round(self.ev.drawn_a, 1) if self.ev else 0.0,
                      pilot_a=amps if self.ev else 0.0, ack_seq=a.ack_seq, ack_epoch=a.epoch,
                      offline_a=self.store["offline_a"], start_a=self.store["start_a"],
                      session_wh=int(self.session_wh), limit_by=why)


class Bus:
    """Messages with a delay; ``drop`` is the share lost (0..1); a member in
    ``deaf`` receives nothing; ``server_up`` False loses everything."""

    def __init__(self, rng: random.Random, delay_s: float = 0.2, drop: float = 0.0):
        self.rng = rng
        self.delay_s = delay_s
        self.drop = drop
        self.deaf: set[str] = set()
        self.mute: set[str] = set()
        self.lag: dict[str, float] = {}     # extra delay of a member's reports (late acks), s
        self._last_due: dict[tuple[str, str], float] = {}
        self.queue: list[tuple[float, str, str, object]] = []

    def send(self, now: float, kind: str, member: str, body: object) -> None:
        if self.drop and self.rng.random() < self.drop:
            return
        if kind == "set" and member in self.deaf:
            return
        if kind == "state" and member in self.mute:
            return
        extra = self.lag.get(member, 0.0) if kind == "state" else 0.0
        due = now + extra + self.delay_s * (0.5 + self.rng.random())
        # One TCP connection per client: a member's messages stay in order.
        due = max(due, self._last_due.get((kind, member), 0.0))
        self._last_due[(kind, member)] = due
        self.queue.append((due, kind, member, body))

    def due(self, now: float):
        ready = [m for m in self.queue if m[0] <= now]
        self.queue = [m for m in self.queue if m[0] > now]
        return sorted(ready, key=lambda m: m[0])


class VirtualGroup:
    """A load group in virtual time. ``members``: dict id -> unit rating (A)."""

    def __init__(self, group: GroupConfig, members: dict[str, float], seed: int = 0,
                 delay_s: float = 0.2, drop: float = 0.0, report_s: float = 1.0,
                 on_change: bool = False):
        self.group = group
        self.rng = random.Random(seed)
        self.clock = TickClock()
        self.base = self.clock.now
        self.t = 0.0
        self.chargers = {i: VirtualCharger(i, r, self.clock, int(group.t_wd_s)) for i, r in members.items()}
        self.bus = Bus(self.rng, delay_s, drop)
        self.report_s = report_s
        self.epoch = 1
        self.server_up = True
        self.allocator = self._new_allocator(restarted=False)
        self._last_report = {i: -1e9 for i in members}
        # The firmware reports on change too (DESIGN.md §4); ``on_change``
        # plays that: a report as soon as state, offer or acknowledgement moves.
        self.on_change = on_change
        self._last_said: dict[str, tuple] = {}
        self.violations: list[str] = []
        self.peak_a = 0.0
        self.ledger_peak_a = 0.0
        self.steps = 0
        self.min_margin_a = float("inf")
        """Smallest breaker - (what the chargers may draw) seen at a step, A."""
        self.min_ledger_margin_a = float("inf")
        """Smallest breaker - (the server's ledger) seen where it is checked, A."""
        self.check_ledger = False
        """Also hold the server's own ledger to the breaker (set it once the
        chargers have been provisioned: out of the box each stores 8 A)."""
        self.over_limit_s = 0.0
        self.over_breaker_s = 0.0

    def set_limit(self, limit_a: float) -> None:
        """The installer (or an automation) changes the group limit, A."""
        self.group = replace(self.group, limit_a=limit_a)
        self.allocator.group = self.group

    def _new_allocator(self, restarted: bool) -> Allocator:
        ms = [Member(i, c.store["unit_rating_a"]) for i, c in self.chargers.items()]
        return Allocator(self.group, ms, self.epoch, self.t, restarted=restarted)

    def restart_server(self) -> None:
        """S6: a new epoch; the new allocator knows only the ratings, and
        assumes each member at its offline current until it reports."""
        self.epoch += 1
        old = self.allocator
        ms = []
        for i, c in self.chargers.items():
            o = old.members[i]
            last = o.last_sent()
            # What the service keeps in its database (S6): the last setpoint
            # and the ledger's worst case then.
            ms.append(Member(i, c.store["unit_rating_a"], offline_a=offline_possible(o),
                             start_a=start_possible(o),
                             assumed_a=max(o.offline_a, last.current_a if last else 0.0,
                                           old.worst_a(o, self.t))))
        self.allocator = Allocator(self.group, ms, self.epoch, self.t, restarted=True)

    def step(self, dt: float = 0.1) -> None:
        self.t += dt
        self.clock.set_seconds(self.base, self.t)
        for _at, kind, member, body in self.bus.due(self.t):
            if kind == "set":
                self.chargers[member].deliver(body)
            elif self.server_up:
                self.allocator.on_report(member, body, self.t)
        for c in self.chargers.values():
            c.advance(self.t, dt)
        for i, c in self.chargers.items():
            r = c.report()
            said = (r.state, r.pilot_a, r.ack_seq, r.offline_a, r.start_a)
            if (self.t - self._last_report[i] >= self.report_s
                    or (self.on_change and said != self._last_said.get(i))):
                self._last_report[i] = self.t
                self._last_said[i] = said
                self.bus.send(self.t, "state", i, r)
        if self.server_up:
            for cmd in self.allocator.step(self.t):
                self.bus.send(self.t, "set", cmd.member, json.dumps(cmd.payload()).encode())
        self._check(dt)

    def _check(self, dt: float) -> None:
        offered = sum(c.limit() for c in self.chargers.values())
        drawn = sum(c.ev.drawn_a for c in self.chargers.values() if c.ev)
        worst = sum(max(c.limit(), c.may_draw(self.t), c.ev.drawn_a if c.ev else 0.0)
                    for c in self.chargers.values())
        self.peak_a = max(self.peak_a, drawn)
        self.steps += 1
        self.min_margin_a = min(self.min_margin_a, self.group.breaker_a - worst)
        if drawn > self.group.limit_a + 1e-9:
            self.over_limit_s += dt
        if drawn > self.group.breaker_a + 1e-9:
            self.over_breaker_s += dt
        if worst > self.group.breaker_a + 1e-9:
            self.violations.append("t=%.1f may draw %.1f A (offered %.1f, drawn %.1f) > breaker %.0f A"
                                   % (self.t, worst, offered, drawn, self.group.breaker_a))
        if self.server_up and hasattr(self.allocator, "ledger_a"):   # the bench's baselines have none
            ledger = self.allocator.ledger_a(self.t)
            self.ledger_peak_a = max(self.ledger_peak_a, ledger)
            # A restarted server that has not yet heard from a member assumes
            # the worst of it (S6: its last setpoint, even when its lease
            # had run out), which may add up past the breaker; it raises
            # nobody then. The ledger is held to the breaker once every
            # member it cannot count as silent has reported.
            a = self.allocator
            unknown = any(m.report is None and not a.silent(m, self.t) for m in a.members.values())
            if self.check_ledger and not unknown:
                self.min_ledger_margin_a = min(self.min_ledger_margin_a, self.group.breaker_a - ledger)
            if self.check_ledger and not unknown and ledger > self.group.breaker_a + 1e-9:
                self.violations.append("t=%.1f the server's ledger says %.1f A > breaker %.0f A"
                                       % (self.t, ledger, self.group.breaker_a))

    def run(self, seconds: float, dt: float = 0.1) -> None:
        for _ in range(int(round(seconds / dt))):
            self.step(dt)
