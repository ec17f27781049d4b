"""Capacity used (issue 7, item 6): how much of the circuit's capacity each
allocator turns into charging, and how much it overloads the circuit.

Method
------
Each scenario file (``tools/scenarios/garage.toml``, ``busy-day.toml``) is
played in virtual time (step ``DT_S``) by
:class:`~evse_tools.sim.virtual.VirtualGroup`: every charger is the firmware's
own limit arbiter, messages cross a bus with 0.1-0.3 s of delay, chargers
report every second, and each EV follows every pilot change only after its
response delay (``delay_ms`` of the scenario). Scenario events become:

- ``plug``: a :class:`~evse_tools.sim.virtual.VirtualEv` with the car's
  ``max_a`` and ``delay_s = delay_ms / 1000``, tapered at once if it arrives
  above 80 % state of charge;
- ``soc``: the two-stage battery model of Caltech's ACN-Sim: the car may draw
  ``max_a`` up to 80 % state of charge and ``max_a * (1 - soc) / (1 - 0.8)``
  above it (``taper_a``). The state of charge does not advance by itself
  (a few minutes of charging move it by a few per cent);
- ``unplug``; ``server_kill``/``server_stop``: the server is gone (nothing
  delivered to or sent by it); ``server_start``: a new server run (epoch).

Each scenario runs with four allocators, behind the same interface
(``on_report(member_id, report, now)`` and ``step(now) -> [Command]``):

- ``project``: :class:`evse_tools.server.allocator.Allocator`;
- ``release``: the allocator of the release before issue 11
  (:data:`RELEASE_REV`, read with ``git show``), for a before/after side by
  side in the same run; left out, with the reason, where git or that
  revision is not there;
- ``equal-split``: floor(limit / connected cars) for each connected car,
  capped at its unit rating; no taper reuse (a car drawing less keeps its
  share) and no decrease-before-increase (all changes are sent at once);
- ``fcfs``: first come, first served: cars in order of arrival get their unit
  rating, later ones what is left, 0 when that is under 6 A; no taper reuse,
  no decrease-before-increase.

Both baselines send idle members their start current (8 A, C2), give every
member the seed's 8 A offline current (lower when 8 A x members exceeds the
limit), and repeat each setpoint every T_wd / 3. Neither is cautious after a
restart (S6): a new run allocates from the reports it has so far.

Figures (per scenario and allocator; means over ``seeds`` runs, which differ
in the bus delays; overloads are the maximum over the runs):

- ``delivered_wh``: energy into the cars at 240 V, Wh;
- ``available_wh``: what the circuit could have delivered: the integral over
  time of min(group limit, sum of what the plugged cars could draw at that
  moment), where a car could draw min(its onboard maximum, its taper cap, the
  charger's rating); Wh;
- ``share``: delivered / available (the whole run, including a server outage
  when the scenario has one, when every allocator is on the offline current);
- ``share_shortage``: the same, only over the time when demand exceeded the
  limit (delivered / limit x that time);
- ``t_fair_s``: per arrival, the time until the arriving car draws at least
  its max-min fair share of the limit minus 1 A and no car draws more than its
  fair share plus 1 A, where the fair shares are the water-filling of the limit
  over what the plugged cars could draw (None: not reached before the next
  event). It does not ask every car to draw its full share: the unused 2 A
  taper margin (S5) shows in ``share`` instead;
- ``t_5050_s``: the same for the second arrival (the garage's 50/50);
- ``t_alone_s`` / ``alone_a``: per arrival of a car with no other car
  plugged in, the time until it draws 90 % of the most it draws before the
  next event, and that most (A);
- ``t_reuse_s`` / ``t_unplug_reuse_s``: per taper (``soc``) / departure,
  the time until the cars draw at least 90 % of min(limit, what they could
  draw) (None: not reached before the next event);
- ``over_breaker_as`` / ``over_limit_as``: the integral of
  max(0, total drawn - breaker) and max(0, total drawn - limit), A*s;
- ``exposure_over_breaker_as``: the same for the sum over chargers of
  max(offered, drawn), what could be drawn at that moment, A*s;
- ``peak_a``: highest total drawn, A.

The limit counts the cars' steady draw; a car plugging in starts at the start
current before any server can answer (C2), and the project's allocator counts
that reserve against the breaker only (S1), so ``over_limit_as`` is not 0 for
any allocator. ``over_breaker_as`` must be 0 for the project's.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("firmware") is None:
    # VirtualGroup runs the firmware's own limit arbiter (``firmware/`` at
    # the top of the repository), which is not part of the tools package.
    sys.path.insert(0, str(REPO))

from evse_tools.bench import machine_info
from evse_tools.server.allocator import (CONNECTED, DEFAULT_OFFLINE_A, DEFAULT_START_A, MIN_A,
                                         Command, GroupConfig, Report, water_fill)
from evse_tools.sim.scenario import Scenario, load
from evse_tools.sim.virtual import VirtualEv, VirtualGroup

SCENARIOS = REPO / "tools" / "scenarios"
"""The scenario files (``tools/scenarios``)."""
DT_S = 0.1
"""Virtual time step, s."""
VOLTS = 240.0
"""Supply voltage for energy, V (the virtual EV's)."""
TAPER_SOC = 0.8
"""Two-stage battery model: constant current up to this state of charge (ACN-Sim)."""
FAIR_TOL_A = 1.0
"""A car is at its fair share when its draw is within this of it, A."""
REUSE_SHARE = 0.9
"""Share of the available current the cars must draw after a taper, 0..1."""
ALLOCATORS = ("project", "release", "equal-split", "fcfs")
SCENARIO_NAMES = ("garage", "busy-day", "trio")
RELEASE_REV = "099394e"
"""The last commit before issue 11 (its allocator confirmed a decrease by a
measured drop, raised all or nothing, and could not be set to 0)."""
ALONE_SHARE = 0.9
"""A lone car has arrived when it draws this share of its most, 0..1."""


def taper_cap(max_a: float, soc: float) -> float | None:
    """Two-stage model: the most a car with onboard maximum ``max_a`` (A) can
    draw at state of charge ``soc`` (0..1): None (no cap) up to 80 %, then
    ``max_a * (1 - soc) / (1 - 0.8)`` A."""
    if soc <= TAPER_SOC:
        return None
    return max(0.0, max_a * (1.0 - soc) / (1.0 - TAPER_SOC))


# -- baselines -------------------------------------------------------------------

class _Seen:
    """What a baseline knows about one member."""

    def __init__(self, rating_a: float):
        self.rating_a = rating_a
        self.report: Report | None = None
        self.arrived: tuple | None = None   # FCFS order key while connected
        self.current_a = -1.0                # last setpoint sent, A (-1: none)
        self.offline_a = -1.0
        self.start_a = -1.0
        self.sent_at = -1e9                  # s


class Baseline:
    """An allocator-like baseline for :class:`VirtualGroup`: the same
    ``on_report(member_id, report, now)`` and ``step(now) -> list[Command]``
    as :class:`~evse_tools.server.allocator.Allocator`. ``ratings``: member
    id -> unit rating (A); ``epoch``: this server run; ``now``: its start, s.

    Every change goes out at once (no decrease-before-increase), and a member
    drawing less than its setpoint keeps it (no taper reuse). Subclasses say
    how the limit is shared among the connected members (:meth:`shares`)."""

    name = "baseline"

    def __init__(self, group: GroupConfig, ratings: dict[str, float], epoch: int, now: float):
        self.group = group
        self.epoch = epoch
        self.started_at = now
        self.seen = {i: _Seen(r) for i, r in ratings.items()}
        self._seq = 0
        self._order = 0

    def on_report(self, member_id: str, report: Report, now: float) -> None:
        m = self.seen.get(member_id)
        if m is None:
            return
        connected = report.state in CONNECTED and not report.fault
        if connected and m.arrived is None:
            # Arrival order; members already connected at this run's first
            # report of them tie on the start time and are ordered by the
            # energy of their session (longer sessions arrived earlier).
            first = m.report is None
            self._order += 1
            m.arrived = ((self.started_at if first else now), -report.session_wh, self._order)
        elif not connected:
            m.arrived = None
        m.report = report

    def shares(self, connected: list[str]) -> dict[str, float]:
        """Setpoint (A) of each connected member (ids in arrival order)."""
        raise NotImplementedError

    def _offline(self) -> float:
        n = len(self.seen)
        each = min(DEFAULT_OFFLINE_A, self.group.limit_a // n) if n else 0.0
        return float(each) if each >= MIN_A else 0.0

    def step(self, now: float) -> list[Command]:
        """One round: a setpoint for every member that reported, sent when it
        changed or T_wd / 3 after the last one (the lease renewal)."""
        connected = sorted((i for i, m in self.seen.items() if m.arrived is not None),
                           key=lambda i: self.seen[i].arrived)
        share = self.shares(connected)
        offline = self._offline()
        cmds = []
        for i, m in self.seen.items():
            if m.report is None:
                continue          # never heard of it in this run: nothing to renew
            if m.report.fault:
                current, start = 0.0, 0.0
            elif i in share:
                current, start = share[i], min(DEFAULT_START_A, m.rating_a)
            else:
                current = start = min(DEFAULT_START_A, m.rating_a)   # idle: its start current (C2)
            off = min(offline, m.rating_a)
            same = (current, off, start) == (m.current_a, m.offline_a, m.start_a)
            if same and now - m.sent_at < self.group.t_wd_s / 3:
                continue
            self._seq += 1
            m.current_a, m.offline_a, m.start_a, m.sent_at = current, off, start, now
            cmds.append(Command(i, self._seq, self.epoch, current, off, start))
        return cmds


class EqualSplit(Baseline):
    """floor(limit / n) for each of the n connected members, capped at its
    unit rating. When that is under 6 A, as many members as fit get 6 A (in
    arrival order) and the rest 0."""

    name = "equal-split"

    def shares(self, connected: list[str]) -> dict[str, float]:
        n = len(connected)
        if not n:
            return {}
        each = self.group.limit_a // n
        if each >= MIN_A:
            return {i: float(min(each, math.floor(self.seen[i].rating_a))) for i in connected}
        k = int(self.group.limit_a // MIN_A)
        return {i: (float(MIN_A) if j < k else 0.0) for j, i in enumerate(connected)}


class FirstComeFirstServed(Baseline):
    """In order of arrival, each connected member gets its unit rating or what
    is left of the limit, 0 when that is under 6 A."""

    name = "fcfs"

    def shares(self, connected: list[str]) -> dict[str, float]:
        left = float(self.group.limit_a)
        out = {}
        for i in connected:
            a = float(min(math.floor(self.seen[i].rating_a), left))
            a = a if a >= MIN_A else 0.0
            out[i] = a
            left -= a
        return out


_RELEASE: list = []


def release_module():
    """The allocator module of :data:`RELEASE_REV`, loaded from git (cached).
    Raises RuntimeError saying why when git or the revision is missing."""
    if _RELEASE:
        return _RELEASE[0]
    try:
        text = subprocess.run(["git", "show", f"{RELEASE_REV}:tools/evse_tools/server/allocator.py"],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"git show failed: {exc}") from None
    if text.returncode != 0:
        raise RuntimeError(f"revision {RELEASE_REV} not found ({text.stderr.strip()[:120]})")
    name = "evse_bench_release_allocator"
    mod = types.ModuleType(name)
    mod.__file__ = f"{RELEASE_REV}:allocator.py"
    sys.modules[name] = mod          # dataclasses look their module up there
    exec(compile(text.stdout, mod.__file__, "exec"), mod.__dict__)
    _RELEASE.append(mod)
    return mod


class ReleaseAllocator:
    """The previous release's allocator (:func:`release_module`) behind the
    baselines' interface, so that before and after run side by side."""

    name = "release"

    def __init__(self, group: GroupConfig, ratings: dict[str, float], epoch: int, now: float):
        mod = release_module()
        cfg = mod.GroupConfig(group.name, group.breaker_a, group.limit_a, group.t_wd_s,
                              group.fair_offline, group.rotate_s)
        self._a = mod.Allocator(cfg, [mod.Member(i, r) for i, r in ratings.items()], epoch, now,
                                restarted=now > 0)

    def on_report(self, member_id: str, report: Report, now: float) -> None:
        self._a.on_report(member_id, report, now)

    def step(self, now: float) -> list[Command]:
        return [Command(c.member, c.seq, c.epoch, c.current_a, c.offline_a, c.start_a)
                for c in self._a.step(now)]


BASELINES = {"equal-split": EqualSplit, "fcfs": FirstComeFirstServed, "release": ReleaseAllocator}


class BenchGroup(VirtualGroup):
    """A :class:`VirtualGroup` that runs ``baseline`` (a :class:`Baseline`
    class) instead of the project's allocator when it is given."""

    def __init__(self, group: GroupConfig, members: dict[str, float], baseline=None,
                 seed: int = 0):
        self._baseline = baseline
        super().__init__(group, members, seed=seed)

    def _new_allocator(self, restarted: bool):
        if self._baseline is None:
            return super()._new_allocator(restarted)
        ratings = {i: c.store["unit_rating_a"] for i, c in self.chargers.items()}
        return self._baseline(self.group, ratings, self.epoch, self.t)

    def restart_server(self) -> None:
        if self._baseline is None:
            super().restart_server()
        else:
            self.epoch += 1
            self.allocator = self._new_allocator(restarted=True)


# -- one run ---------------------------------------------------------------------

def _could(g: VirtualGroup) -> dict[str, float]:
    """What each plugged car could draw now if offered all of it, A."""
    out = {}
    for i, c in g.chargers.items():
        ev = c.ev
        if ev is None or c.fault_until is not None:
            continue
        cap = min(ev.max_a, c.store["unit_rating_a"])
        if ev.taper_a is not None:
            cap = min(cap, ev.taper_a)
        out[i] = cap
    return out


def run_scenario(sc: Scenario, allocator: str = "project", seed: int = 0) -> dict:
    """Play scenario ``sc`` with ``allocator`` (one of :data:`ALLOCATORS`) in
    virtual time; return the figures of the module docstring for that run."""
    cfg = GroupConfig(sc.group, float(sc.breaker_a), float(sc.limit_a), float(sc.t_wd_s),
                      rotate_s=sc.rotate_s)
    g = BenchGroup(cfg, dict(sc.chargers), BASELINES.get(allocator), seed=seed)
    events = list(sc.events)
    marks = []            # (kind, at_s, charger, next_event_at_s, result)
    skipped = []
    delivered = available = short_del = short_avail = short_s = 0.0
    over_breaker = over_limit = exposure = peak = 0.0
    steps = int(round(sc.duration_s / DT_S))
    ei = 0
    for k in range(steps + 1):
        now = k * DT_S
        while ei < len(events) and events[ei].at_s <= now + 1e-9:
            e = events[ei]
            ei += 1
            nxt = events[ei].at_s if ei < len(events) else sc.duration_s
            c = g.chargers.get(e.charger) if e.charger else None
            if e.action == "plug":
                alone = all(o.ev is None for o in g.chargers.values())
                spec = e.ev
                ev = VirtualEv(max_a=float(spec["max_a"]), delay_s=spec.get("delay_ms", 2000) / 1000,
                               taper_a=taper_cap(float(spec["max_a"]), spec.get("soc", 0.3)))
                c.plug(ev)
                marks.append({"kind": "plug", "at_s": e.at_s, "charger": e.charger,
                              "until_s": nxt, "t_s": None, "alone": alone, "trace": []})
            elif e.action == "unplug":
                c.unplug()
                marks.append({"kind": "unplug", "at_s": e.at_s, "charger": e.charger,
                              "until_s": nxt, "t_s": None})
            elif e.action == "soc":
                if c.ev is not None:
                    c.ev.taper_a = taper_cap(c.ev.max_a, e.soc)
                marks.append({"kind": "soc", "at_s": e.at_s, "charger": e.charger,
                              "until_s": nxt, "t_s": None})
            elif e.action in ("server_kill", "server_stop"):
                g.server_up = False
            elif e.action == "server_start":
                if not g.server_up:
                    g.server_up = True
                    g.restart_server()
            else:
                skipped.append(f"{e.action} at {e.at_s:g} s")
        if k == steps:
            break
        g.step(DT_S)
        t = g.t
        drawn = {i: c.ev.drawn_a for i, c in g.chargers.items() if c.ev is not None}
        total = sum(drawn.values())
        could = _could(g)
        demand = sum(could.values())
        avail = min(cfg.limit_a, demand)
        delivered += total * DT_S
        available += avail * DT_S
        if demand > cfg.limit_a + 1e-9:
            short_s += DT_S
            short_del += total * DT_S
            short_avail += cfg.limit_a * DT_S
        over_breaker += max(0.0, total - cfg.breaker_a) * DT_S
        over_limit += max(0.0, total - cfg.limit_a) * DT_S
        may = sum(max(c.limit(), c.ev.drawn_a if c.ev else 0.0) for c in g.chargers.values())
        exposure += max(0.0, may - cfg.breaker_a) * DT_S
        peak = max(peak, total)
        for m in marks:
            if m.get("alone") and m["at_s"] < t <= m["until_s"]:
                m["trace"].append((t, drawn.get(m["charger"], 0.0)))
        if any(m["t_s"] is None and m["at_s"] < t <= m["until_s"] for m in marks):
            fair = water_fill(cfg.limit_a, could) if could else {}
            none_above = all(drawn.get(i, 0.0) <= fair[i] + FAIR_TOL_A for i in fair)
            reused = total >= REUSE_SHARE * avail - 1e-9
            for m in marks:
                if m["t_s"] is None and m["at_s"] < t <= m["until_s"]:
                    if m["kind"] == "plug":
                        i = m["charger"]
                        ok = (none_above and i in fair
                              and drawn.get(i, 0.0) >= fair[i] - FAIR_TOL_A)
                    else:
                        ok = reused
                    if ok:
                        m["t_s"] = round(t - m["at_s"], 2)
    wh = VOLTS / 3600.0
    arrivals = [m for m in marks if m["kind"] == "plug"]
    out = {
        "allocator": allocator, "seed": seed,
        "delivered_wh": round(delivered * wh, 1), "available_wh": round(available * wh, 1),
        "share": round(delivered / available, 4) if available else None,
        "shortage_s": round(short_s, 1),
        "share_shortage": round(short_del / short_avail, 4) if short_avail else None,
        "t_fair_s": [{"charger": m["charger"], "at_s": m["at_s"], "t_s": m["t_s"]} for m in arrivals],
        "t_reuse_s": [{"charger": m["charger"], "at_s": m["at_s"], "t_s": m["t_s"]}
                      for m in marks if m["kind"] == "soc"],
        "t_unplug_reuse_s": [{"charger": m["charger"], "at_s": m["at_s"], "t_s": m["t_s"]}
                             for m in marks if m["kind"] == "unplug"],
        "over_breaker_as": round(over_breaker, 2), "over_limit_as": round(over_limit, 2),
        "exposure_over_breaker_as": round(exposure, 2), "peak_a": round(peak, 2),
        "skipped_events": skipped,
    }
    if len(arrivals) >= 2:
        out["t_5050_s"] = arrivals[1]["t_s"]
    alone = []
    for m in arrivals:
        if m["alone"] and m["trace"]:
            most = max(a for _t, a in m["trace"])
            t = next(t for t, a in m["trace"] if a >= ALONE_SHARE * most)
            alone.append({"charger": m["charger"], "at_s": m["at_s"], "t_s": round(t - m["at_s"], 2),
                          "alone_a": round(most, 1)})
    out["t_alone_s"] = alone
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 3) if xs else None


def _summary(runs: list[dict]) -> dict:
    """Means over seeds (times: over the runs where reached, with the count),
    maxima for overloads."""
    s = {
        "runs": len(runs),
        "delivered_wh": _mean(r["delivered_wh"] for r in runs),
        "available_wh": _mean(r["available_wh"] for r in runs),
        "share": _mean(r["share"] for r in runs),
        "share_min": min((r["share"] for r in runs if r["share"] is not None), default=None),
        "share_shortage": _mean(r["share_shortage"] for r in runs),
        "shortage_s": _mean(r["shortage_s"] for r in runs),
        "over_breaker_as": max(r["over_breaker_as"] for r in runs),
        "over_limit_as": max(r["over_limit_as"] for r in runs),
        "exposure_over_breaker_as": max(r["exposure_over_breaker_as"] for r in runs),
        "peak_a": max(r["peak_a"] for r in runs),
    }
    for key in ("t_fair_s", "t_reuse_s", "t_unplug_reuse_s"):
        per = []
        for j, ev in enumerate(runs[0][key]):
            ts = [r[key][j]["t_s"] for r in runs]
            per.append({"charger": ev["charger"], "at_s": ev["at_s"], "mean_s": _mean(ts),
                        "max_s": max((t for t in ts if t is not None), default=None),
                        "reached": sum(t is not None for t in ts)})
        s[key] = per
    if runs[0]["t_alone_s"]:
        s["t_alone_s"] = _mean(x["t_s"] for r in runs for x in r["t_alone_s"])
        s["alone_a"] = _mean(x["alone_a"] for r in runs for x in r["t_alone_s"])
    if "t_5050_s" in runs[0]:
        ts = [r["t_5050_s"] for r in runs]
        s["t_5050_s"] = _mean(ts)
        s["t_5050_max_s"] = max((t for t in ts if t is not None), default=None)
        s["t_5050_reached"] = sum(t is not None for t in ts)
    return s




def run(quick: bool, seeds: int | None = None,
        scenarios: tuple[str, ...] = SCENARIO_NAMES) -> dict:
    """Run every scenario with every allocator; ``seeds`` runs each (default
    3 when ``quick``, else 20), differing in the virtual bus's delays.

    Returns ``{"machine", "method", "dt_s", "seeds", "wall_s", "scenarios":
    {name: {"breaker_a", "limit_a", "duration_s", "allocators": {name:
    summary}, "runs": {name: [per-seed figures]}}}}`` with the figures of the
    module docstring (Wh, A*s, s, A)."""
    n = seeds if seeds is not None else (3 if quick else 20)
    t0 = time.monotonic()
    out = {"machine": machine_info(), "quick": quick, "seeds": n, "dt_s": DT_S,
           "method": "virtual time, VirtualGroup (firmware LimitArbiter per charger, EVs that lag "
                     "pilot changes, 0.1-0.3 s bus delay, reports every 1 s); two-stage taper "
                     "(ACN-Sim); means over seeds, overloads max over seeds",
           "scenarios": {}}
    allocators = list(ALLOCATORS)
    try:
        release_module()
    except RuntimeError as exc:
        allocators.remove("release")
        out["release_missing"] = str(exc)
    out["release_rev"] = RELEASE_REV
    for name in scenarios:
        sc = load(SCENARIOS / f"{name}.toml")
        runs = {a: [run_scenario(sc, a, seed) for seed in range(n)] for a in allocators}
        out["scenarios"][name] = {
            "breaker_a": sc.breaker_a, "limit_a": sc.limit_a, "duration_s": sc.duration_s,
            "chargers": len(sc.chargers),
            "allocators": {a: _summary(r) for a, r in runs.items()},
            "runs": runs,
        }
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def _f(x, fmt="{:.1f}", none="never"):
    return none if x is None else fmt.format(x)


def table(results: dict) -> str:
    """The figures of :func:`run` as a plain-text table."""
    m = results["machine"]
    lines = [
        "Capacity used (issue 7, item 6)",
        f"machine: {m['cpu']}, {m['cpus']} logical CPUs, {m['os']}, Python {m['python']}",
        f"method: {results['method']}; {results['seeds']} seed(s), dt {results['dt_s']} s",
        "share = delivered / integral of min(limit, what the plugged cars could draw); "
        "shortage = only while demand > limit",
        "times: mean over seeds (reached/runs), 'never' = not before the next event; "
        "A*s: max over seeds",
    ]
    for name, sc in results["scenarios"].items():
        lines.append("")
        lines.append(f"{name}: {sc['chargers']} chargers, breaker {sc['breaker_a']} A, "
                     f"limit {sc['limit_a']} A, {sc['duration_s']:g} s")
        head = (f"  {'allocator':<12} {'Wh':>7} {'share':>6} {'short.':>6} {'50/50 s':>12} "
                f"{'alone s (A)':>12} {'fair s':>8} {'reuse s':>12} {'>brk A*s':>9} "
                f"{'>lim A*s':>9} {'expo A*s':>9} {'peak A':>7}")
        lines.append(head)
        for a, s in sc["allocators"].items():
            runs = s["runs"]
            t5050 = (f"{_f(s['t_5050_s'])} ({s['t_5050_reached']}/{runs})"
                     if "t_5050_s" in s else "-")
            fair = [x["mean_s"] for x in s["t_fair_s"]]
            fair_txt = ("never" if any(x["reached"] == 0 for x in s["t_fair_s"])
                        else _f(_mean(fair))) if fair else "-"
            reuse = s["t_reuse_s"]
            reuse_txt = (f"{_f(reuse[0]['mean_s'])} ({reuse[0]['reached']}/{runs})"
                         if reuse else "-")
            alone = (f"{_f(s['t_alone_s'])} ({s['alone_a']:.0f})" if "t_alone_s" in s else "-")
            lines.append(
                f"  {a:<12} {s['delivered_wh']:>7.1f} {s['share']:>6.3f} "
                f"{_f(s['share_shortage'], '{:.3f}', '-'):>6} {t5050:>12} {alone:>12} {fair_txt:>8} "
                f"{reuse_txt:>12} {s['over_breaker_as']:>9.1f} {s['over_limit_as']:>9.1f} "
                f"{s['exposure_over_breaker_as']:>9.1f} {s['peak_a']:>7.1f}")
        first = next(iter(sc["allocators"].values()))
        lines.append(f"  available: {first['available_wh']:.1f} Wh; demand above the limit "
                     f"for {first['shortage_s']:.1f} s")
        for a, s in sc["allocators"].items():
            per = ", ".join(f"{x['charger']}@{x['at_s']:g}s {_f(x['mean_s'])}"
                            for x in s["t_fair_s"])
            gone = ", ".join(f"{x['charger']}@{x['at_s']:g}s {_f(x['mean_s'])}"
                             for x in s["t_unplug_reuse_s"])
            lines.append(f"  {a}: fair share after each arrival (s): {per}"
                         + (f"; 90 % reused after each departure (s): {gone}" if gone else ""))
    lines.append("")
    lines.append("fair s: mean over arrivals of the time until the new car draws its max-min "
                 "fair share -1 A and no car more than its share +1 A ('never' if one arrival "
                 "never gets there before the next event); 50/50 s: the same for the 2nd arrival")
    lines.append("alone s (A): for a car arriving with no other car plugged in, time until it "
                 "draws 90 % of the most it draws before the next event, and that most")
    lines.append("reuse s: after a taper, time until the cars draw 90 % of min(limit, what "
                 "they could draw)")
    if "release_missing" in results:
        lines.append(f"release ({results['release_rev']}) left out: {results['release_missing']}")
    else:
        lines.append(f"release: the allocator of {results['release_rev']}, the last commit "
                     "before issue 11, in the same run")
    lines.append(">brk/>lim: amp-seconds of total draw above the breaker / the limit; expo: "
                 "sum of max(offered, drawn) above the breaker. Baselines: no decrease-before-"
                 "increase, no taper reuse, no restart caution (S6).")
    lines.append("Above the limit (not the breaker) is allowed in transients: an arriving car "
                 "starts at 8 A before any server answers (C2), and S1 budgets the limit in "
                 "steady state and the breaker at every instant.")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(table(run("--full" not in sys.argv)))
