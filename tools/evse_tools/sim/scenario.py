"""Scenario files for the simulated load group (TOML, ``tools/scenarios/``).

A scenario names a group (breaker, optional limit), its chargers (id and unit
rating), the EVs that visit (published onboard-charger ratings, cited in the
file), and a timeline of events::

    name = "garage"
    duration_s = 150
    t_wd_s = 10

    [group]
    name = "garage"
    breaker_a = 50            # limit from the seed chart: 40 A

    [[chargers]]
    id = "garage-1"
    rating_a = 40

    [evs.model3]              # source: ...
    max_a = 48
    battery_wh = 75000

    [[events]]
    at_s = 3
    action = "plug"           # plug, unplug, soc, inject, server_stop, server_kill, server_start
    charger = "garage-1"
    ev = "model3"
    soc = 0.5

    [[events]]                # fault injection: a simulated board command
    at_s = 60
    action = "inject"
    charger = "garage-1"
    cmd = { cmd = "gfci", on = true }

:func:`load` checks everything and raises :class:`ScenarioError` with the file
and the offending entry.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from evse_tools.server.db import default_limit

ACTIONS = ("plug", "unplug", "soc", "inject", "server_stop", "server_kill", "server_start")
INJECT = ("gfci", "selftest", "weld", "ground", "overdraw", "temp", "glitch", "reset_fault", "wants",
          "hang")
EV_KEYS = ("max_a", "battery_wh", "delay_ms", "taper_soc", "name")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message says where and why."""


@dataclass
class Event:
    at_s: float
    action: str
    charger: str | None = None
    ev: dict | None = None
    soc: float | None = None
    cmd: dict | None = None


@dataclass
class Scenario:
    name: str
    description: str
    duration_s: float
    t_wd_s: int
    rotate_s: float
    group: str
    breaker_a: int
    limit_a: int
    chargers: dict[str, float]
    events: list[Event] = field(default_factory=list)
    path: Path | None = None


def _num(where, d, key, lo, hi, default=None):
    x = d.get(key, default)
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi:
        raise ScenarioError(f"{where}: {key} must be a number {lo}..{hi}, got {x!r}")
    return x


def load(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    where = str(path)
    g = data.get("group")
    if not isinstance(g, dict) or not isinstance(g.get("name"), str):
        raise ScenarioError(f"{where}: [group] with a name is required")
    breaker = int(_num(where + " [group]", g, "breaker_a", 6, 400))
    limit = int(_num(where + " [group]", g, "limit_a", 6, 0.8 * breaker, default_limit(breaker)))
    chargers = {}
    for i, c in enumerate(data.get("chargers") or []):
        cid = c.get("id")
        if not isinstance(cid, str) or cid in chargers:
            raise ScenarioError(f"{where}: chargers[{i}] needs a unique id")
        chargers[cid] = float(_num(f"{where} chargers[{i}]", c, "rating_a", 6, 80))
    if not chargers:
        raise ScenarioError(f"{where}: at least one [[chargers]] entry is required")
    evs = data.get("evs") or {}
    for name, ev in evs.items():
        unknown = set(ev) - set(EV_KEYS)
        if unknown:
            raise ScenarioError(f"{where} evs.{name}: unknown keys {sorted(unknown)}")
        _num(f"{where} evs.{name}", ev, "max_a", 1, 80)
        _num(f"{where} evs.{name}", ev, "battery_wh", 1000, 500000)
    duration = float(_num(where, data, "duration_s", 1, 86400))
    events = []
    for i, e in enumerate(data.get("events") or []):
        w = f"{where} events[{i}]"
        action = e.get("action")
        if action not in ACTIONS:
            raise ScenarioError(f"{w}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
        at = float(_num(w, e, "at_s", 0, duration))
        ev = None
        soc = None
        charger = e.get("charger")
        if action in ("plug", "unplug", "soc", "inject") and charger not in chargers:
            raise ScenarioError(f"{w}: charger {charger!r} is not in [[chargers]]")
        if action == "plug":
            if e.get("ev") not in evs:
                raise ScenarioError(f"{w}: ev {e.get('ev')!r} is not in [evs]")
            ev = dict(evs[e["ev"]])
            ev.setdefault("name", e["ev"])
            ev["soc"] = float(_num(w, e, "soc", 0, 1, 0.3))
        if action == "soc":
            soc = float(_num(w, e, "soc", 0, 1))
        cmd = None
        if action == "inject":
            cmd = e.get("cmd")
            if not isinstance(cmd, dict) or cmd.get("cmd") not in INJECT:
                raise ScenarioError(f"{w}: cmd must be a table whose cmd is one of {', '.join(INJECT)}")
        events.append(Event(at, action, charger, ev, soc, cmd))
    events.sort(key=lambda e: e.at_s)
    return Scenario(
        name=str(data.get("name", path.stem)), description=str(data.get("description", "")),
        duration_s=duration, t_wd_s=int(_num(where, data, "t_wd_s", 10, 600, 30)),
        rotate_s=float(_num(where, data, "rotate_s", 10, 86400, 300)),
        group=g["name"], breaker_a=breaker, limit_a=limit, chargers=chargers, events=events,
        path=path)
