"""Fault-injection end-to-end suite (issue 6): real mosquitto, the load-group
server as its own process, every charger the real firmware on the MicroPython
unix port, and faults injected from outside.

Each scenario is one function (``scenario_*``) that runs a load group through
one fault and returns a :class:`Result`. Faults go through small helpers:
:class:`evse_tools.netfault.Proxy` between each charger and the broker
(blackhole, one-way delay, TCP-style segment loss), :class:`Broker.kill`
(SIGKILL) and a wiped persistence file, SIGKILL of the server and of a
charger process (:meth:`SimCharger.power_cut`), a setpoint flood from a
stand-in server, and the firmware's ``--tick-offset`` (its clock starts just
before the ESP32's 2^30 ms tick wrap, :class:`simboard.board.WrapClock`).

The group (unless a scenario says otherwise): three 40 A chargers on a 50 A
breaker, so the limit is 40 A (DESIGN.md §1: NEC 625.41, the seed chart);
``T_wd`` 10 s (the contract's minimum, so outages fit a short run); the
fair fallback (S3), so every charger stores an offline current of
floor(40 / 3) = 13 A. That value differs from the 8 A default on purpose: a
settings file lost or reset to defaults shows at once.

Invariants, checked at every sample (0.1 s) of every scenario
(:func:`check`):

1. **Breaker.** The group's measured sum never exceeds the breaker (50 A).
2. **Limit outside transients.** It exceeds the limit (40 A) only within a
   transient window (:func:`transients`): ``TRANSIENT_S`` = ``T_wd`` + 1 s
   + 5 s after an arrival (C2: a new session starts at the start current
   before the server answers), and from a decrease the server published
   until the member confirms it (S1/S2 let the server raise the others
   within the breaker meanwhile), at most ``TRANSIENT_S``. The time above
   the limit is reported either way.
3. **Fallback.** From the outside: once ``T_wd`` + 1 s have passed since the
   last ``set`` message reached a charger's socket (the proxy's record,
   whatever the faults did upstream) or since it booted, the charger must
   offer at most its stored offline current and not by a setpoint.
   Every fallback's delay (last setpoint delivered -> offline) is measured
   and reported.
4. **Energy.** The session energy a charger reports (``session_wh`` in its
   ``state`` messages), the EV's own meter in the board telemetry, and the
   ``session_wh`` the server publishes per member (what it rotates by, S4;
   it accumulates nothing of its own) never go backwards within a session.
   A reboot of the charger starts a new session (its counter lives in RAM):
   reported apart as "session counters restarted", not as a loss.
5. **Settings.** Every telemetry sample shows the offline current and start
   current last pushed to that charger (the server may lower an idle
   member's start current to 0 while the breaker has no room, S3), else the
   provisioned ones, and the provisioned ``T_wd``; after the run each
   charger's ``settings.json`` parses (strict JSON, then the firmware's own
   loader with no problems) to exactly the provisioned and pushed values.

``evse-faults`` runs them all and prints the table (``--quick``: the bounded
CI size; the full size by default); JSON goes to ``out/faults.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from evse_tools import broker as brokers
from evse_tools.bench import machine_info
from evse_tools.charger_sim import REPO, SimCharger
from evse_tools.netfault import Proxy
from evse_tools.server.db import GroupStore
from evse_tools.sim.run import SAMPLE_S, LoadGroupSim
from evse_tools.sim.scenario import Scenario

BREAKER_A, LIMIT_A = 50, 40
T_WD_S = 10
RATING_A = 40
START_A = 8
OFFLINE_A = 13                 # S3 fair fallback: floor(40 A / 3 members)
EV_DECREASE_S = 5              # IEC 61851-1 Table A.6: the EV follows a lower duty within 5 s
TRANSIENT_S = T_WD_S + 1 + EV_DECREASE_S
FALLBACK_DEADLINE_S = T_WD_S + 1
REPORT_STEP_A = 0.5            # the charger reports every 0.5 A change of its measured current
CONFIRM_WAIT_S = 10            # S1: a decrease counts 5 s + 5 s margin after the acknowledgement
TICKS_PERIOD = 1 << 30         # the ESP32's ticks_ms period (C6)
IDS = ("fault-1", "fault-2", "fault-3")

# Reference EVs (DESIGN.md §5; published onboard-charger ratings at 240 V).
# Tesla Model 3 Long Range: 11.5 kW, 48 A; about 75 kWh (Tesla's specifications).
MODEL3 = {"name": "model3-lr", "max_a": 48, "battery_wh": 75000, "soc": 0.3, "delay_ms": 2000}
# Chevrolet Bolt EV (2020): 7.2 kW, 32 A; 66 kWh (Chevrolet's 2020 specifications).
BOLT = {"name": "bolt-ev", "max_a": 32, "battery_wh": 66000, "soc": 0.3, "delay_ms": 3000}
# Nissan Leaf (2018, 40 kWh): 6.6 kW onboard charger, 27.5 A (Nissan's specifications).
LEAF = {"name": "leaf", "max_a": 27.5, "battery_wh": 40000, "soc": 0.3, "delay_ms": 2500}
EVS = (MODEL3, BOLT, LEAF)


@dataclass
class Result:
    """One scenario's figures. Times in s, currents in A, energy in Wh."""

    name: str
    what: str
    faults: list[str] = field(default_factory=list)
    samples: int = 0
    charger_checks: int = 0
    breaker_overloads: int = 0
    limit_overloads: int = 0          # above the limit outside the transient window
    peak_a: float = 0.0
    longest_above_limit_s: float = 0.0
    seconds_above_limit: float = 0.0
    fallbacks: list[float] = field(default_factory=list)   # delays, s
    missed_fallbacks: int = 0
    settings_lost: int = 0
    energy_lost: int = 0
    session_restarts: int = 0
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)     # not safety failures; reported
    extra: dict = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def overloads(self) -> int:
        return self.breaker_overloads + self.limit_overloads

    @property
    def ok(self) -> bool:
        return (self.overloads == 0 and self.missed_fallbacks == 0 and self.settings_lost == 0
                and self.energy_lost == 0 and all(c[1] for c in self.checks)
                and all(d <= FALLBACK_DEADLINE_S for d in self.fallbacks))

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        """A scenario-specific expectation (e.g. "every charger back on a
        setpoint after the broker came back")."""
        self.checks.append((name, bool(passed), detail))
        if not passed:
            self.problems.append(f"{name}: {detail}")


# -- the harness ---------------------------------------------------------------

class FaultGroup(LoadGroupSim):
    """A :class:`LoadGroupSim` with every charger behind its own
    :class:`Proxy` (``self.proxies[cid]``), the fair fallback, per-charger
    settings and firmware options, an optional server, and the record the
    invariants need: arrivals, boots and power cuts."""

    def __init__(self, broker: brokers.Broker, workdir: Path, *, chargers=IDS, server=True,
                 settings: dict | None = None, argv: dict | None = None,
                 seed: int = int(os.environ.get("EVSE_FAULTS_SEED", "1")),
                 duration_s: float = 0, max_keepalive: int | None = None):
        sc = Scenario(name=workdir.name, description="fault injection", duration_s=duration_s,
                      t_wd_s=T_WD_S, rotate_s=300, group="faults", breaker_a=BREAKER_A,
                      limit_a=LIMIT_A, chargers={c: RATING_A for c in chargers})
        super().__init__(sc, broker, workdir, out=lambda line: None, live_every_s=1e9)
        self.want_server = server
        self.extra_settings = settings or {}
        self.extra_argv = argv or {}
        self.seed = seed
        self.max_keepalive = max_keepalive
        self.proxies: dict[str, Proxy] = {}
        self.boots: dict[str, list[float]] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.plugged: dict[str, dict] = {}
        self.faults: list[str] = []
        self._pushed: dict[tuple[str, str], tuple[int, list]] = {}
        self.server_starts: list[float] = []

    def provisioned(self, cid: str) -> dict:
        s = {"charger_id": cid, "unit_rating_a": RATING_A, "installer_max_a": RATING_A,
             "t_wd_s": T_WD_S, "start_a": START_A, "offline_a": OFFLINE_A,
             "mqtt_host": "127.0.0.1", "mqtt_port": self.proxies[cid].port, "keepalive_s": 10}
        s.update(self.extra_settings.get(cid, {}))
        return s

    def start(self) -> None:
        sc = self.sc
        self.workdir.mkdir(parents=True, exist_ok=True)
        with GroupStore(str(self.db)) as store:
            store.create_group(sc.group, sc.breaker_a, sc.limit_a, fair_offline=True,
                               t_wd_s=sc.t_wd_s)
            for cid, rating in sc.chargers.items():
                store.add_member(sc.group, cid, rating)
        self._observe()
        self.t0 = time.monotonic()
        for i, cid in enumerate(sc.chargers):
            self.proxies[cid] = Proxy((self.broker.host, self.broker.port), seed=self.seed * 10 + i)
            self.proxies[cid].max_keepalive = self.max_keepalive   # before the first CONNECT
            self.chargers[cid] = SimCharger(self.provisioned(cid), self.workdir / cid,
                                            extra_argv=self.extra_argv.get(cid))
            self.boots[cid] = [self.now()]
        for cid, ch in self.chargers.items():
            self.latest[cid] = ch.wait_ready()
        if self.want_server:
            self.start_server()

    def close(self) -> None:
        super().close()
        for p in self.proxies.values():
            p.close()

    # -- actions (each recorded) ---------------------------------------------------

    def start_server(self) -> None:
        super().start_server()
        self.server_starts.append(self.now())

    def plug(self, cid: str, ev: dict) -> None:
        self.chargers[cid].send({"cmd": "plug", "ev": ev})
        self.plugged[cid] = ev
        self.arrivals.append((self.now(), cid))
        self.rec.events.append((self.now(), f"{cid}: {ev['name']} plugs in"))

    def unplug(self, cid: str) -> None:
        self.chargers[cid].send({"cmd": "unplug"})
        self.plugged.pop(cid, None)
        self.rec.events.append((self.now(), f"{cid}: EV leaves"))

    def fault(self, text: str) -> None:
        self.faults.append(text)
        self.rec.events.append((self.now(), text))

    def power_cut(self, cid: str) -> None:
        self.fault(f"{cid}: firmware process killed (SIGKILL) and booted again")
        self.chargers[cid].power_cut()
        self.boots[cid].append(self.now())
        if cid in self.plugged:
            self.arrivals.append((self.now(), cid))   # boots with the car in C: start current (C10)

    def advance(self, until_s: float) -> None:
        """As :meth:`LoadGroupSim.advance`, noting boots by the harness's watchdog."""
        before = {cid: ch.resets for cid, ch in self.chargers.items()}
        super().advance(until_s)
        for cid, ch in self.chargers.items():
            if ch.resets != before[cid]:
                self.boots[cid].append(self.now())
                if cid in self.plugged:
                    self.arrivals.append((self.now(), cid))

    def settle(self, seconds: float) -> None:
        self.advance(self.now() + seconds)

    def delivered_sets(self, cid: str) -> list[float]:
        """Times (s since start) a ``set`` message reached the charger's socket."""
        topic = f"evse/{cid}/set"
        return [t - self.t0 for t, d, top, payload in list(self.proxies[cid].publishes)
                if d == "down" and top == topic and payload]

    def pushed(self, cid: str, key: str) -> list[tuple[float, object]]:
        """(time s, value) of every ``key`` (``offline_a``, ``start_a``) in a
        ``set`` message that reached the charger's socket, oldest first."""
        pubs = list(self.proxies[cid].publishes)
        memo = self._pushed.get((cid, key))
        if memo is not None and memo[0] == len(pubs):
            return memo[1]
        out = []
        topic = f"evse/{cid}/set"
        for t, d, top, payload in pubs:
            if d != "down" or top != topic or not payload:
                continue
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            if isinstance(body, dict) and key in body:
                out.append((t - self.t0, body[key]))
        self._pushed[(cid, key)] = (len(pubs), out)
        return out

    def expected(self, cid: str, key: str, t: float) -> object:
        """The value of setting ``key`` that charger ``cid`` must hold at
        ``t``: the last one pushed to it before ``t``, else the provisioned
        one (C5: stored when it changes, kept across resets)."""
        got = [v for ts, v in self.pushed(cid, key) if ts <= t]
        return got[-1] if got else self.provisioned(cid)[key]

    def on_setpoint(self, cid: str) -> bool:
        return self.latest[cid].get("limit_by") in ("setpoint", "unit")


# -- invariants ----------------------------------------------------------------

def check(g: FaultGroup, res: Result) -> Result:
    """Check the invariants of the module docstring at every sample of ``g``'s
    recording and after the run, into ``res``."""
    rec = g.rec
    res.faults = list(g.faults)
    res.samples += len(rec.samples)
    windows = transients(g)
    res.extra["transients"] = len(windows)
    delivered = {cid: g.delivered_sets(cid) for cid in g.chargers}
    run_start = None
    prev_off: dict[str, bool] = {}
    for s in rec.samples:
        total = s.group_measured()
        res.peak_a = max(res.peak_a, round(total, 1))
        if total > BREAKER_A + 1e-6:
            res.breaker_overloads += 1
            res.problems.append(f"{s.t:.1f} s: group {total:.1f} A above the {BREAKER_A} A breaker")
        if total > LIMIT_A + 1e-6:
            run_start = s.t if run_start is None else run_start
            res.longest_above_limit_s = max(res.longest_above_limit_s, round(s.t - run_start, 1))
            res.seconds_above_limit = round(res.seconds_above_limit + SAMPLE_S, 1)
            if not any(a <= s.t <= b for a, b in windows):
                res.limit_overloads += 1
                res.problems.append(f"{s.t:.1f} s: group {total:.1f} A above the {LIMIT_A} A limit "
                                    f"outside every transient window")
        else:
            run_start = None
        for cid, c in s.chargers.items():
            if "limit_by" not in c:
                continue
            res.charger_checks += 1
            for key in ("offline_a", "start_a", "t_wd_s"):
                # Pushed values take a moment to be applied: the value before
                # a push is accepted for 1 s after it.
                want = {g.expected(cid, key, s.t), g.expected(cid, key, s.t - 1.0)}
                if c.get(key) not in want:
                    res.settings_lost += 1
                    res.problems.append(f"{s.t:.1f} s: {cid} {key} {c.get(key)} (expected "
                                        f"{' or '.join(sorted(map(str, want)))})")
            boot = max((b for b in g.boots[cid] if b <= s.t), default=0.0)
            last = max((t for t in delivered[cid] if t <= s.t), default=None)
            ref = boot if last is None or last < boot else last
            if s.t - ref > FALLBACK_DEADLINE_S and (c["limit_by"] in ("setpoint", "unit")
                                                    or c.get("pilot_a", 0) > c.get("offline_a", 0)):
                res.missed_fallbacks += 1
                res.problems.append(f"{s.t:.1f} s: {cid} still {c.get('pilot_a')} A by "
                                    f"{c['limit_by']}, {s.t - ref:.1f} s after its last setpoint")
            if c["limit_by"] == "offline" and not prev_off.get(cid, False) and last is not None \
                    and last >= boot:
                res.fallbacks.append(round(s.t - last, 2))
            prev_off[cid] = c["limit_by"] == "offline"
    _check_energy(g, res)
    _check_settings_files(g, res)
    return res


def transients(g: FaultGroup) -> list[tuple[float, float]]:
    """The windows (start, end; s since the start) in which the group may
    draw above its limit (never above the breaker), from S1, S2 and C2:

    * an **arrival** (a car plugs in, or a charger boots with one in C): it
      starts at the start current before the server can answer (C2). It
      ends ``TRANSIENT_S`` = ``T_wd`` + 1 s + 5 s later at the latest: the
      server lowers the others at once, or, if it cannot reach them, their
      leases run out within ``T_wd`` + 1 s and they fall back to offline
      currents that sum to at most the limit (S3); either way their EVs
      follow the lower duty within 5 s (IEC 61851-1 Table A.6).
      When the server hears nothing from that charger after the arrival
      (its link is down), the window lasts until the server counts it
      silent (S1: ``T_wd`` + 5 s after its last report and ``T_wd`` + 10 s
      after the last setpoint sent to it; until then it is budgeted as an
      idle member, its start current against the breaker only) + 5 s + 1 s.
    * a **decrease** the server published (a ``set`` lowering a member): S1
      and S2 let the server raise the others within the breaker before the
      decrease is confirmed. The window runs from the publication until the
      member confirms it as S1 says: after a state acknowledging that
      setpoint (or a later one), its measured current seen above the new
      value and then at most the new value + 0.5 A (the charger reports
      every 0.5 A change; an EV not seen drawing more proves nothing, it
      may still be ramping up), or else 5 s + 5 s margin after the
      acknowledgement; plus 1 s for that report to travel. A decrease
      not acknowledged within ``T_wd`` + 1 s gets ``TRANSIENT_S``: a
      charger that did not take it has fallen back by then, and its EV
      follows within 5 s, as after an arrival.
    """
    out = []
    for t, cid in g.arrivals:
        heard = [ts for ts, c, _b in g.rec.states if c == cid]
        if any(t <= ts <= t + TRANSIENT_S for ts in heard):
            out.append((t, t + TRANSIENT_S))
            continue
        # The server never heard of this arrival: it counts the charger idle
        # until it is silent (S1: T_wd + 5 s after its last report, and
        # T_wd + 10 s after the last setpoint sent to it, or after the
        # server's start), then lowers the others, whose EVs follow in 5 s.
        starts = [ts for ts in g.server_starts if ts <= t] or [0.0]
        last_state = max([ts for ts in heard if ts <= t] + [starts[-1]])
        last_set = max([ts for ts, c, _b in g.rec.sets if c == cid and ts <= t] + [starts[-1]])
        silent = max(last_state + T_WD_S + 5, last_set + T_WD_S + 10)
        out.append((t, max(t + TRANSIENT_S, silent + EV_DECREASE_S + 1)))
    prev: dict[str, float] = {}
    states = [(t, cid, b) for t, cid, b in g.rec.states if cid in g.chargers]
    for t, cid, b in g.rec.sets:
        if cid not in g.chargers or not isinstance(b.get("current_a"), (int, float)):
            continue
        new = b["current_a"] if b["current_a"] >= 6 else 0.0
        if cid in prev and new < prev[cid]:
            acks = [(ts, st) for ts, c, st in states
                    if c == cid and ts >= t and st.get("ack_epoch") == b.get("epoch")
                    and ts - t <= FALLBACK_DEADLINE_S
                    and isinstance(st.get("ack_seq"), int) and st["ack_seq"] >= b.get("seq", 0)]
            if acks:
                ack_t = acks[0][0]
                conf_t, high = ack_t + CONFIRM_WAIT_S, False
                for ts, st in acks:         # seen above the new level, then at it (S1)
                    if st.get("measured_a", 99) > new + REPORT_STEP_A:
                        high = True
                    elif high:
                        conf_t = ts
                        break
                out.append((t, min(conf_t, ack_t + CONFIRM_WAIT_S) + 1.0))
            else:
                out.append((t, t + TRANSIENT_S))
        prev[cid] = new
    return sorted(out)


def _check_energy(g: FaultGroup, res: Result) -> None:
    rec = g.rec
    # The charger's own report, per charger: within one boot (uptime_s does
    # not fall) and one session (no state A between), session_wh never falls.
    last: dict[str, tuple[int, int, str | None]] = {}
    for t, cid, b in rec.states:
        if cid not in g.chargers or not isinstance(b.get("session_wh"), int):
            continue
        wh, up, st = b["session_wh"], b.get("uptime_s", 0), b.get("state")
        if cid in last:
            pwh, pup, pst = last[cid]
            if up < pup:
                if pwh > 0:
                    res.session_restarts += 1
            elif wh < pwh and st != "A" and pst != "A":
                res.energy_lost += 1
                res.problems.append(f"{t:.1f} s: {cid} session_wh {pwh} -> {wh} within one session")
        last[cid] = (wh, up, st)
    # The EV's meter in the board telemetry, per boot and plug-in.
    for cid in g.chargers:
        prev = None
        for s in rec.samples:
            c = s.chargers.get(cid, {})
            key = (c.get("ev"), c.get("t_ms", 0))
            e = c.get("energy_wh")
            if e is None or c.get("ev") is None:
                prev = None
                continue
            if prev is not None and prev[0] == key[0] and key[1] >= prev[1] and e < prev[2] - 1e-9:
                res.energy_lost += 1
                res.problems.append(f"{s.t:.1f} s: {cid} EV meter {prev[2]:.2f} -> {e:.2f} Wh")
            prev = (key[0], key[1], e)
    # What the server publishes per member (it ranks rotation by it, S4).
    boundaries = {cid: sorted(g.boots[cid] + [t for t, c in g.arrivals if c == cid]) for cid in g.chargers}
    seen: dict[str, tuple[float, int]] = {}
    for t, body in rec.group_states:
        for cid, m in (body.get("members") or {}).items():
            if cid not in g.chargers or m.get("state") in (None, "A"):
                seen.pop(cid, None)
                continue
            wh = m.get("session_wh", 0)
            if cid in seen:
                pt, pwh = seen[cid]
                if wh < pwh and not any(pt <= b <= t for b in boundaries[cid]):
                    res.energy_lost += 1
                    res.problems.append(f"{t:.1f} s: server's session_wh for {cid} {pwh} -> {wh}")
            seen[cid] = (t, wh)


def _check_settings_files(g: FaultGroup, res: Result) -> None:
    """Each charger's settings.json parses to the provisioned values (with the
    firmware's own loader too), and the server pushed the same offline and
    start currents (S3)."""
    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    from firmware.core import settings as fw_settings
    for cid, ch in g.chargers.items():
        path = ch.workdir / "settings.json"
        exp = g.provisioned(cid)
        end = g.now() + 1.0
        exp.update({k: g.expected(cid, k, end) for k in ("offline_a", "start_a")})
        try:
            got = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            res.settings_lost += 1
            res.problems.append(f"{cid}: settings.json unreadable after the run: {exc}")
            continue
        for key, want in exp.items():
            if got.get(key) != want:
                res.settings_lost += 1
                res.problems.append(f"{cid}: settings.json {key} = {got.get(key)!r}, expected {want!r}")
        cfg, _secrets = fw_settings.load(str(ch.workdir) + "/")
        if cfg.problems:
            res.settings_lost += 1
            res.problems.append(f"{cid}: the firmware's loader reports {cfg.problems}")
    for t, cid, b in g.rec.sets:
        if cid in g.chargers and "offline_a" in b and b["offline_a"] != OFFLINE_A:
            res.settings_lost += 1
            res.problems.append(f"{t:.1f} s: the server pushed offline_a {b['offline_a']} to {cid} "
                                f"(S3 fair fallback: {OFFLINE_A})")


# -- helpers -------------------------------------------------------------------

def _mosquitto(workdir: Path, extra: str = "") -> brokers.Broker:
    return brokers.start_mosquitto(extra_conf=extra, workdir=workdir)


def _until(g: FaultGroup, cond, timeout_s: float) -> float | None:
    """Advance until ``cond()`` holds; the time it took (s), or None."""
    t0 = g.now()
    while g.now() - t0 < timeout_s:
        g.advance(g.now() + 0.5)
        if cond():
            return round(g.now() - t0, 1)
    return None


def _all_on_setpoint(g: FaultGroup) -> bool:
    return all(g.on_setpoint(cid) for cid in g.chargers)


def _plug_all(g: FaultGroup) -> None:
    for i, cid in enumerate(g.chargers):
        g.plug(cid, EVS[i % len(EVS)])
        g.settle(1.0)


def _run(name: str, what: str, workdir: Path, body, broker_conf: str = "", **group_kw) -> Result:
    """Start a broker and a :class:`FaultGroup`, run ``body(g, broker, res)``,
    check the invariants and return the result (a crash of the harness is a
    failed check, never a silent pass)."""
    res = Result(name, what)
    t0 = time.monotonic()
    wd = workdir / name
    if wd.exists():
        shutil.rmtree(wd)
    try:
        broker = _mosquitto(wd / "broker", broker_conf)
        try:
            with FaultGroup(broker, wd / "group", **group_kw) as g:
                try:
                    body(g, broker, res)
                except Exception as exc:   # reported, and the run fails
                    res.check("harness", False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                check(g, res)
                _dump(g, wd / "recording.json")
        finally:
            broker.close()
    except Exception as exc:
        res.check("harness", False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    res.duration_s = round(time.monotonic() - t0, 1)
    return res


def _dump(g: FaultGroup, path: Path) -> None:
    """Write the run's recording (samples, events, MQTT traffic, setpoints
    delivered) for a post-mortem; removed with the workdir unless kept."""
    rec = g.rec
    path.write_text(json.dumps({
        "events": rec.events, "arrivals": g.arrivals, "boots": g.boots,
        "delivered_sets": {cid: g.delivered_sets(cid) for cid in g.chargers},
        "samples": [{"t": round(s.t, 2), "server": s.server_up,
                     "c": {k: {f: v.get(f) for f in ("state", "pilot_a", "measured_a", "limit_by",
                                                     "online", "lease_age_ms", "offline_a")}
                           for k, v in s.chargers.items()}} for s in rec.samples],
        "sets": rec.sets, "states": rec.states, "group_states": rec.group_states[-2000:],
    }, default=str))


# -- the scenarios -------------------------------------------------------------

def scenario_broker_kill(workdir: Path, quick: bool) -> Result:
    """The broker is killed with SIGKILL while three cars charge, stays down
    for longer than ``T_wd`` (everyone falls back to 13 A) and is restarted
    on the same port with its persistence file; every charger must be back on
    a setpoint afterwards."""
    down = 14 if quick else 30

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the fault", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        g.fault("broker killed (SIGKILL)")
        broker.kill()
        g.settle(down)
        g.fault("broker restarted")
        broker.start()
        took = _until(g, lambda: _all_on_setpoint(g), 90)
        res.extra["back_on_setpoints_s"] = took
        res.check("every charger back on a setpoint after the restart", took is not None,
                  "still offline 90 s after the broker came back")
        g.settle(5)

    return _run("broker-kill-9", f"broker SIGKILLed for {down} s, restarted", workdir, body,
                "persistence true\nautosave_interval 1\n")


def scenario_broker_wiped(workdir: Path, quick: bool) -> Result:
    """The broker is stopped, its persistence file (retained messages,
    sessions) deleted, and started again: nothing retained survives, the
    server must learn the chargers again from fresh state messages."""

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the fault", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        g.fault("broker stopped, persistence wiped")
        broker.stop()
        db = broker.workdir / "mosquitto.db"
        res.extra["persistence_file_existed"] = db.exists()
        if db.exists():
            db.unlink()
        g.settle(2)
        g.fault("broker restarted empty")
        broker.start()
        took = _until(g, lambda: _all_on_setpoint(g), 60)
        res.extra["back_on_setpoints_s"] = took
        res.check("every charger back on a setpoint after the wipe", took is not None)
        g.settle(10 if quick else 40)

    return _run("broker-wiped", "broker restarted with its persistence wiped", workdir, body,
                "persistence true\nautosave_interval 1\n")


def scenario_server_kill_mid_rebalance(workdir: Path, quick: bool) -> Result:
    """Two cars share the limit; a third arrives, and 0.5 s later (the
    decreases sent, the raise not yet) the server is killed with SIGKILL and
    restarted 3 s later; in the full run a second kill keeps it down past
    ``T_wd``. After the restart nothing may rise before every member has
    reported (S6)."""

    def body(g, broker, res):
        g.plug(IDS[0], MODEL3)
        g.settle(1)
        g.plug(IDS[1], BOLT)
        res.check("both on a setpoint", _until(g, lambda: all(g.on_setpoint(c) for c in IDS[:2]), 20)
                  is not None)
        g.settle(8)
        rounds = [3.0] if quick else [3.0, 15.0]
        for down in rounds:
            cid = IDS[2] if g.plugged.get(IDS[2]) is None else IDS[0]
            if cid in g.plugged:
                g.unplug(cid)
                g.settle(8)
            g.plug(cid, LEAF)
            g.settle(0.5)
            g.fault(f"server killed (SIGKILL) mid-rebalance, down {down:g} s")
            g.stop_server(kill=True)
            g.settle(down)
            g.fault("server restarted")
            t_restart = g.now()
            g.start_server()
            took = _until(g, lambda: _all_on_setpoint(g), 40)
            res.check("every charger on a setpoint after the restart", took is not None)
            first_report = {}
            for t, c, _b in g.rec.states:
                if t >= t_restart and c not in first_report:
                    first_report[c] = t
            early = [(t, c, b["current_a"]) for t, c, b in g.rec.sets
                     if t >= t_restart and t < max(first_report.values(), default=t_restart)
                     and b["current_a"] > OFFLINE_A]
            res.check("no rise after the restart before every member reported (S6)",
                      not early, f"{early[:3]}")
            g.settle(10)

    return _run("server-kill-mid-rebalance", "server SIGKILLed 0.5 s after an arrival", workdir, body)


def scenario_blackhole_one(workdir: Path, quick: bool) -> Result:
    """One charger's path is blackholed (sockets open, nothing passes) while
    the other two stay connected: it must fall back to 13 A within
    ``T_wd`` + 1 s, the others must stay on their setpoints, and it must
    come back once the path heals."""
    hole = 20 if quick else 90

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the fault", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        g.settle(3)
        victim = IDS[0]
        g.fault(f"{victim}: path blackholed for {hole} s")
        g.proxies[victim].blackhole = True
        t0 = g.now()
        others_left = []
        while g.now() - t0 < hole:
            g.advance(g.now() + 0.5)
            others_left += [c for c in IDS[1:] if g.latest[c].get("limit_by") == "offline"]
        res.check("the other chargers never fell back", not others_left, f"{sorted(set(others_left))}")
        res.check("the blackholed charger is on its offline current",
                  g.latest[victim].get("limit_by") == "offline" and g.latest[victim].get("pilot_a") == OFFLINE_A,
                  f"{g.latest[victim].get('pilot_a')} A by {g.latest[victim].get('limit_by')}")
        g.proxies[victim].blackhole = False
        g.fault(f"{victim}: path restored")
        took = _until(g, lambda: g.on_setpoint(victim), 90)
        res.extra["back_on_setpoint_s"] = took
        res.check("the blackholed charger is back on a setpoint", took is not None)
        g.settle(5)

    return _run("blackhole-one", f"one charger's path blackholed for {hole} s", workdir, body)


def scenario_lossy_link(workdir: Path, quick: bool) -> Result:
    """Every charger's path loses 30 % of its TCP segments (each loss costs a
    retransmission timeout, in order) with 2 s of latency, read both ways:
    first 2 s each way (4 s round trip, as ``tc netem delay 2s`` on both
    ends), then 1 s each way (2 s round trip). Chargers may fall back;
    nothing may overload, and every fallback must come within ``T_wd`` +
    1 s of the last setpoint that got through. Reports the share of the
    time each phase spent on setpoints and the connection attempts."""
    span = 60 if quick else 300

    def share(g, t0):
        got = [c.get("limit_by") in ("setpoint", "unit") for s in g.rec.samples if s.t >= t0
               for c in s.chargers.values()]
        return round(sum(got) / max(1, len(got)), 2)

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the fault", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        for delay, label in ((2.0, "4 s round trip"), (1.0, "2 s round trip")):
            g.fault(f"30 % segment loss, {delay:g} s each way ({label}) on every path for {span // 2} s")
            n0 = {cid: len(g.delivered_sets(cid)) for cid in IDS}
            c0 = sum(p.connections for p in g.proxies.values())
            lost0 = sum(p.segments_lost for p in g.proxies.values())
            for p in g.proxies.values():
                p.loss, p.delay_s = 0.3, delay
            t0 = g.now()
            g.settle(span // 2)
            key = f"rtt{int(2 * delay)}s"
            res.extra[f"{key}_on_setpoint_share"] = share(g, t0)
            res.extra[f"{key}_sets_delivered"] = sum(len(g.delivered_sets(c)) - n0[c] for c in IDS)
            res.extra[f"{key}_connects"] = sum(p.connections for p in g.proxies.values()) - c0
            res.extra[f"{key}_segments_lost"] = sum(p.segments_lost for p in g.proxies.values()) - lost0
        for p in g.proxies.values():
            p.loss, p.delay_s = 0.0, 0.0
        g.fault("paths clean again")
        took = _until(g, lambda: _all_on_setpoint(g), 90)
        res.check("every charger on a setpoint once the path is clean", took is not None)
        g.settle(5)
        for key, label in (("rtt4s", "4 s"), ("rtt2s", "2 s")):
            if res.extra[f"{key}_on_setpoint_share"] < 0.5:
                res.findings.append(
                    f"30 % loss, {label} round trip: the chargers were on a setpoint "
                    f"{res.extra[f'{key}_on_setpoint_share']:.0%} of the time "
                    f"({res.extra[f'{key}_connects']} connections, {res.extra[f'{key}_sets_delivered']} "
                    f"setpoints through), the rest on their offline current: safe, but less load "
                    f"sharing (a retransmitted segment comes 4-8 s late against a 10 s lease; not "
                    f"analysed further)")

    return _run("loss-30pct-2s", f"30 % segment loss + 2 s latency for {span} s", workdir, body)


def scenario_charger_power_cut(workdir: Path, quick: bool) -> Result:
    """A charger's firmware process is killed with SIGKILL mid-session
    (a power cut; a settings write may be cut halfway) and booted again,
    repeatedly: its settings must survive, it must restart at the start
    current and get a setpoint again."""
    cuts = 2 if quick else 6

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the fault", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        victim = IDS[1]
        for i in range(cuts):
            g.settle(2 + 1.7 * i)           # different moments of the session
            g.power_cut(victim)
            took = _until(g, lambda: g.on_setpoint(victim), 40)
            res.check(f"cut {i + 1}: back on a setpoint", took is not None)
        g.settle(5)

    return _run("charger-power-cut", f"a charger SIGKILLed mid-session {cuts} times", workdir, body)


def scenario_setpoint_flood(workdir: Path, quick: bool) -> Result:
    """A stand-in server publishes 10 setpoints/s (16, 20, 24 A in turn) to
    one charger with a car charging; the live heap (``gc.mem_alloc()`` after
    ``gc.collect()``) is sampled all along. Reports the heap growth (median
    of the last five samples minus the first five) and the least-squares
    slope after the first sample (taken as the flood starts); checks
    that the charger never fell back and follows the last setpoint."""
    span = 60 if quick else 600
    every = 5 if quick else 15

    def body(g, broker, res):
        cid = IDS[0]
        ch = g.chargers[cid]
        g.plug(cid, MODEL3)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"evse-flood-{os.getpid()}")
        pub.connect(broker.host, broker.port, keepalive=30)
        pub.loop_start()
        stop = threading.Event()
        sent = {"n": 0, "last": None}
        epoch = int(time.time())

        def flood():
            nxt = time.monotonic()
            while not stop.is_set():
                sent["n"] += 1
                cur = (16, 20, 24)[sent["n"] % 3]
                pub.publish(f"evse/{cid}/set", json.dumps(
                    {"v": 1, "epoch": epoch, "seq": sent["n"], "current_a": cur}), qos=1)
                sent["last"] = cur
                nxt += 0.1
                time.sleep(max(0.0, nxt - time.monotonic()))

        g.fault(f"{span} s of 10 setpoints/s to {cid}")
        th = threading.Thread(target=flood, daemon=True)
        th.start()
        mem: list[tuple[float, int]] = []
        t0 = g.now()
        fell = 0
        while g.now() - t0 < span:
            asked = round(g.now() - t0, 1)
            ch.send({"cmd": "mem"})
            g.advance(g.now() + every)
            for r in ch.replies:
                if "mem_alloc" in r:
                    mem.append((asked, r["mem_alloc"]))
            ch.replies.clear()
            fell += g.latest[cid].get("limit_by") == "offline"
        stop.set()
        th.join()
        g.settle(1.5)
        last = sent["last"]
        pub.loop_stop()
        pub.disconnect()
        vals = [m for _, m in mem]
        n = min(5, max(1, len(vals) // 3))
        growth = statistics.median(vals[-n:]) - statistics.median(vals[:n]) if vals else None
        slope = None
        steady = mem[1:]            # the first sample is taken as the flood starts
        if len(steady) >= 2:
            ts = [t for t, _ in steady]
            mt, mv = statistics.fmean(ts), statistics.fmean(v for _, v in steady)
            den = sum((t - mt) ** 2 for t in ts)
            slope = round(60 * sum((t - mt) * (v - mv) for t, v in steady) / den) if den else None
        res.extra.update({"setpoints_sent": sent["n"], "setpoints_delivered": len(g.delivered_sets(cid)),
                          "heap_samples": len(mem), "heap_first_b": vals[0] if vals else None,
                          "heap_last_b": vals[-1] if vals else None, "heap_max_b": max(vals) if vals else None,
                          "heap_growth_b": growth, "heap_slope_b_per_min": slope,
                          "heap_series": mem})
        res.check("heap sampled", len(mem) >= 5, f"{len(mem)} samples")
        res.check("never fell back during the flood", fell == 0)
        res.check("follows the last setpoint", g.latest[cid].get("pilot_a") == last,
                  f"pilot {g.latest[cid].get('pilot_a')} A, last setpoint {last} A")

    return _run("setpoint-flood", f"10 setpoints/s for {span} s, heap sampled", workdir, body,
                chargers=(IDS[0],), server=False)


def scenario_tick_wrap(workdir: Path, quick: bool) -> Result:
    """Every charger's clock starts ``lead`` s before the ESP32's 2^30 ms tick
    wrap. The cars charge across the wrap, and the server is killed 5 s
    before it, so each watchdog lease expires just after it: the fallback
    must still come within ``T_wd`` + 1 s ("a tick wrap made a dead server
    look alive"), and the chargers must take setpoints again after it."""
    lead = 30
    argv = {cid: ["--tick-offset", str(TICKS_PERIOD - lead * 1000)] for cid in IDS}

    def body(g, broker, res):
        _plug_all(g)
        res.check("all on a setpoint before the wrap", _until(g, lambda: _all_on_setpoint(g), 20) is not None)
        boot = g.boots[IDS[0]][0]
        g.advance(boot + lead - 5)
        g.fault("server killed (SIGKILL) 5 s before the tick wrap")
        g.stop_server(kill=True)
        g.advance(boot + lead + T_WD_S + 5)
        g.fault("server restarted after the wrap")
        g.start_server()
        took = _until(g, lambda: _all_on_setpoint(g), 40)
        res.check("every charger on a setpoint after the wrap", took is not None)
        g.settle(5 if quick else 60)
        wrapped = {}
        for cid in IDS:
            ticks = [s.chargers[cid].get("tick_ms") for s in g.rec.samples if "tick_ms" in s.chargers[cid]]
            wrapped[cid] = any(b < a for a, b in zip(ticks, ticks[1:]))
        res.check("every charger's clock crossed the 2^30 ms wrap", all(wrapped.values()), f"{wrapped}")

    return _run("tick-wrap", f"clocks start {lead} s before the 2^30 ms wrap", workdir, body, argv=argv)


def scenario_max_keepalive(workdir: Path, quick: bool) -> Result:
    """mosquitto with ``max_keepalive 60``; the chargers ask for keepalives of
    30, 60 and 120 s (the settings allow 5-600 s). mosquitto 2.0.11 applies
    the option to MQTT v5 clients only; later releases refuse a 3.1.1 client
    that asks for more with CONNACK "identifier rejected", which each
    charger's proxy plays (``Proxy.max_keepalive``). The two chargers within
    the limit must connect, stay on their setpoints and come back after a
    broker SIGKILL. The refused one must ask again with at most 60 s (the
    firmware's answer to that refusal) and join the group: never locked out."""
    span = 35 if quick else 200
    keep = {IDS[0]: 30, IDS[1]: 60, IDS[2]: 120}
    settings = {cid: {"keepalive_s": k} for cid, k in keep.items()}
    within = [cid for cid, k in keep.items() if k <= 60]

    def body(g, broker, res):
        _plug_all(g)
        took = _until(g, lambda: all(g.on_setpoint(c) for c in IDS), 30)
        res.check("every charger is on a setpoint, the refused one after asking for less",
                  took is not None, f"{ {c: g.latest[c].get('limit_by') for c in IDS} }")
        res.extra["refused_one_on_setpoint_s"] = round(took, 1) if took is not None else None
        g.settle(span)
        fell = {c for s in g.rec.samples for c, v in s.chargers.items()
                if c in within and v.get("limit_by") == "offline"}
        res.check("none of the chargers within the limit fell back with the broker up", not fell,
                  f"{sorted(fell)}")
        g.fault("broker killed (SIGKILL) and restarted at once")
        broker.kill()
        broker.start()
        took = _until(g, lambda: all(g.on_setpoint(c) for c in IDS), 60)
        res.check("all are back on a setpoint after the restart", took is not None)
        g.settle(5)
        refused = {c: len(g.proxies[c].refused) for c in IDS}
        res.check("the broker refused only the charger asking for 120 s, and only once",
                  refused[IDS[2]] == 1 and refused[IDS[0]] == refused[IDS[1]] == 0, f"{refused}")
        res.extra["refused_connects"] = refused

    return _run("max-keepalive-60", "mosquitto max_keepalive 60; keepalives 30/60/120 s", workdir,
                body, "max_keepalive 60\n", settings=settings, max_keepalive=60)


SCENARIOS = {
    "broker-kill-9": scenario_broker_kill,
    "broker-wiped": scenario_broker_wiped,
    "server-kill-mid-rebalance": scenario_server_kill_mid_rebalance,
    "blackhole-one": scenario_blackhole_one,
    "loss-30pct-2s": scenario_lossy_link,
    "charger-power-cut": scenario_charger_power_cut,
    "setpoint-flood": scenario_setpoint_flood,
    "tick-wrap": scenario_tick_wrap,
    "max-keepalive-60": scenario_max_keepalive,
}


# -- the report ------------------------------------------------------------------

def table(results: list[Result]) -> str:
    """The report as a Markdown table, with a totals row."""
    head = ("| scenario | faults injected | samples checked | overloads | missed fallbacks | "
            "fallback delay max | settings lost | energy lost | result |")
    rows = [head, "|" + "---|" * 9]

    def row(name, faults, samples, over, missed, fb, sl, el, ok):
        return f"| {name} | {faults} | {samples:,} | {over} | {missed} | {fb} | {sl} | {el} | {ok} |"

    for r in results:
        fb = f"{max(r.fallbacks):.2f} s ({len(r.fallbacks)})" if r.fallbacks else "none"
        rows.append(row(r.name, len(r.faults), r.samples, r.overloads, r.missed_fallbacks, fb,
                        r.settings_lost, r.energy_lost, "pass" if r.ok else "FAIL"))
    fbs = [d for r in results for d in r.fallbacks]
    rows.append(row("**total**", sum(len(r.faults) for r in results), sum(r.samples for r in results),
                    sum(r.overloads for r in results), sum(r.missed_fallbacks for r in results),
                    f"{max(fbs):.2f} s ({len(fbs)})" if fbs else "none",
                    sum(r.settings_lost for r in results), sum(r.energy_lost for r in results),
                    "pass" if all(r.ok for r in results) else "FAIL"))
    return "\n".join(rows)


def summary(results: list[Result], quick: bool) -> dict:
    fbs = [d for r in results for d in r.fallbacks]
    return {
        "mode": "quick" if quick else "full",
        "t_wd_s": T_WD_S, "breaker_a": BREAKER_A, "limit_a": LIMIT_A, "offline_a": OFFLINE_A,
        "transient_s": TRANSIENT_S, "fallback_deadline_s": FALLBACK_DEADLINE_S,
        "faults_injected": sum(len(r.faults) for r in results),
        "samples_checked": sum(r.samples for r in results),
        "charger_samples_checked": sum(r.charger_checks for r in results),
        "overloads": sum(r.overloads for r in results),
        "missed_fallbacks": sum(r.missed_fallbacks for r in results),
        "fallbacks": len(fbs), "fallback_delay_max_s": max(fbs) if fbs else None,
        "fallback_delay_min_s": min(fbs) if fbs else None,
        "settings_lost": sum(r.settings_lost for r in results),
        "energy_lost": sum(r.energy_lost for r in results),
        "session_restarts": sum(r.session_restarts for r in results),
        "ok": all(r.ok for r in results),
        "scenarios": [dict(asdict(r), overloads=r.overloads, ok=r.ok) for r in results],
    }


def run_suite(quick: bool, only: list[str] | None = None, jobs: int = 2, workdir: Path | None = None,
              out=print) -> list[Result]:
    """Run the scenarios (``jobs`` at a time, each with its own broker) and
    return their results in the order of :data:`SCENARIOS`."""
    if brokers.mosquitto_path() is None:
        raise SystemExit("error: mosquitto is not installed (`apt-get install -y mosquitto`)")
    names = only or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="evse-faults-") as tmp:
        base = workdir or Path(tmp)

        def one(name):
            out(f"-- {name} ...")
            r = SCENARIOS[name](base, quick)
            out(f"-- {name}: {'pass' if r.ok else 'FAIL'} in {r.duration_s:.0f} s")
            for p in r.problems[:10]:
                out(f"     {p}")
            return r

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fault-injection end-to-end suite: real mosquitto, the "
                                             "server and the firmware on the unix port; prints a "
                                             "table and writes JSON.")
    ap.add_argument("--quick", action="store_true", help="the bounded CI size (about 4 minutes)")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    ap.add_argument("--jobs", type=int, default=2, metavar="N",
                    help="scenarios run side by side (default 2)")
    ap.add_argument("--out", default="out/faults.json", metavar="FILE", help="JSON report")
    ap.add_argument("--keep", metavar="DIR", help="keep logs and files of every run in DIR")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    keep = Path(args.keep) if args.keep else None
    results = run_suite(args.quick, args.only, args.jobs, keep)
    wall = time.monotonic() - t0
    print()
    print(table(results))
    s = summary(results, args.quick)
    s["wall_s"] = round(wall, 1)
    s["machine"] = machine_info()
    m = s["machine"]
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['os']}, Python {m['python']}; "
          f"mosquitto at {brokers.mosquitto_path()}")
    print(f"\n{s['mode']} run, {wall:.0f} s; T_wd {T_WD_S} s, breaker {BREAKER_A} A, limit {LIMIT_A} A, "
          f"offline {OFFLINE_A} A; transient windows at most {TRANSIENT_S} s; "
          f"fallback deadline {FALLBACK_DEADLINE_S} s; session counters restarted by a reboot: "
          f"{s['session_restarts']}")
    for r in results:
        if r.extra:
            print(f"  {r.name}: " + ", ".join(f"{k} {v}" for k, v in r.extra.items()
                                              if k != "heap_series"))
    for r in results:
        for f in r.findings:
            print(f"  finding ({r.name}): {f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(s, indent=2) + "\n")
    print(f"JSON: {out}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
