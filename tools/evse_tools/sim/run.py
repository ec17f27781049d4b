"""The main job: a simulated load group, end to end (DESIGN.md §7).

Real parts throughout: each charger is the firmware on the MicroPython unix
port with its simulated board and EV (:class:`evse_tools.charger_sim.SimCharger`),
talking umqtt.simple to a real broker; the load-group server is its own
process (``evse-server run``); the broker is mosquitto when installed, else
the embedded amqtt broker, or the one given with ``--broker``.

The run prints a live timeline (per charger: state, pilot and measured
current; the group's measured sum against its limit and breaker), writes a
PNG plot and ends with a summary: peak group current, seconds above the limit
and above the breaker, energy per car, fallbacks and faults.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from evse_tools import broker as brokers
from evse_tools.charger_sim import HEAP, REPO, SimCharger
from evse_tools.server.db import GroupStore
from evse_tools.sim.scenario import Scenario, ScenarioError, load

SCENARIOS = REPO / "tools" / "scenarios"
SAMPLE_S = 0.1


@dataclass
class Sample:
    """One instant of the run (``t`` s since start)."""

    t: float
    chargers: dict[str, dict]
    server_up: bool

    def group_measured(self) -> float:
        return sum(c.get("measured_a", 0.0) for c in self.chargers.values())

    def group_offered(self) -> float:
        return sum(c.get("pilot_a", 0.0) for c in self.chargers.values())


@dataclass
class Recording:
    """Everything a run saw: samples, events, and the MQTT traffic observed."""

    scenario: Scenario
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    sets: list[tuple[float, str, dict]] = field(default_factory=list)      # (t, id, payload)
    states: list[tuple[float, str, dict]] = field(default_factory=list)
    group_states: list[tuple[float, dict]] = field(default_factory=list)
    energy_wh: dict[str, float] = field(default_factory=dict)             # per EV name


class LoadGroupSim:
    """Runs one scenario. Use as a context manager; :meth:`run` drives the
    whole timeline, or :meth:`advance` a piece of it (for tests)."""

    def __init__(self, scenario: Scenario, broker: brokers.Broker, workdir: Path, out=print,
                 live_every_s: float = 10.0):
        self.sc = scenario
        self.broker = broker
        self.workdir = workdir
        self.out = out
        self.live_every_s = live_every_s
        self.rec = Recording(scenario)
        self.chargers: dict[str, SimCharger] = {}
        self.latest: dict[str, dict] = {}
        self.server: subprocess.Popen | None = None
        self.t0 = 0.0
        self._next_event = 0
        self._last_live = -1e9
        self._last_key = None
        self._observer: mqtt.Client | None = None
        self.db = workdir / "server.db"

    # -- setup -------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            # A charger that never became ready (a heap too small, a crash at
            # boot): the ones already started must not outlive the run.
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> None:
        sc = self.sc
        self.workdir.mkdir(parents=True, exist_ok=True)
        with GroupStore(str(self.db)) as store:
            store.create_group(sc.group, sc.breaker_a, sc.limit_a, t_wd_s=sc.t_wd_s)
            for cid, rating in sc.chargers.items():
                store.add_member(sc.group, cid, rating)
        self._observe()
        self.t0 = time.monotonic()
        for cid, rating in sc.chargers.items():
            settings = {"charger_id": cid, "unit_rating_a": rating, "installer_max_a": rating,
                        "t_wd_s": sc.t_wd_s, "mqtt_host": self.broker.host,
                        "mqtt_port": self.broker.port, "keepalive_s": 10}
            ch = SimCharger(settings, self.workdir / cid)
            self.chargers[cid] = ch
        for cid, ch in self.chargers.items():
            self.latest[cid] = ch.wait_ready()
        self.start_server()

    def _observe(self) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"evse-sim-observer-{os.getpid()}")

        def on_message(client, userdata, msg):
            t = time.monotonic() - self.t0
            parts = msg.topic.split("/")
            try:
                body = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                return
            if body is None:
                return
            if parts[0] == "loadgroup":
                self.rec.group_states.append((t, body))
            elif parts[-1] == "set":
                self.rec.sets.append((t, parts[1], body))
            elif parts[-1] == "state":
                self.rec.states.append((t, parts[1], body))

        c.on_message = on_message
        c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe(
            [("evse/+/set", 1), ("evse/+/state", 1), ("loadgroup/+/state", 1)])
        c.connect(self.broker.host, self.broker.port, keepalive=30)
        c.loop_start()
        self._observer = c

    def start_server(self) -> None:
        log = open(self.workdir / "server.log", "a")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "evse_tools.server.cli", "--db", str(self.db), "run",
             "--broker", f"{self.broker.host}:{self.broker.port}", "--rotate-s", str(self.sc.rotate_s)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop_server(self, kill: bool = False) -> None:
        if self.server is None:
            return
        if kill:
            self.server.kill()
        else:
            self.server.send_signal(signal.SIGTERM)
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server = None

    def close(self) -> None:
        self.stop_server()
        for ch in self.chargers.values():
            ch.close()
        if self._observer is not None:
            self._observer.loop_stop()
            self._observer.disconnect()

    # -- the timeline --------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _apply(self, ev) -> None:
        ch = self.chargers.get(ev.charger) if ev.charger else None
        if ev.action == "plug":
            ch.send({"cmd": "plug", "ev": ev.ev})
            text = f"{ev.charger}: {ev.ev['name']} plugs in (onboard {ev.ev['max_a']:g} A, SoC {ev.ev['soc']:.0%})"
        elif ev.action == "unplug":
            ch.send({"cmd": "unplug"})
            text = f"{ev.charger}: EV leaves"
        elif ev.action == "soc":
            ch.send({"cmd": "soc", "soc": ev.soc})
            text = f"{ev.charger}: battery at {ev.soc:.0%} (tapers)"
        elif ev.action == "inject":
            ch.send(ev.cmd)
            args = ", ".join(f"{k} {v}" for k, v in ev.cmd.items() if k != "cmd")
            text = f"{ev.charger}: inject {ev.cmd['cmd']} {args}".rstrip()
        elif ev.action in ("server_stop", "server_kill"):
            self.stop_server(kill=ev.action == "server_kill")
            text = "server killed (SIGKILL)" if ev.action == "server_kill" else "server stopped"
        else:
            self.start_server()
            text = "server restarted"
        self.rec.events.append((self.now(), text))
        self.out(f"{self.now():7.1f} s  -- {text}")

    def advance(self, until_s: float) -> None:
        """Run the timeline up to ``until_s`` s after the start."""
        events = self.sc.events
        while self.now() < until_s:
            while self._next_event < len(events) and events[self._next_event].at_s <= self.now():
                self._apply(events[self._next_event])
                self._next_event += 1
            for cid, ch in self.chargers.items():
                if ch.check_watchdog():
                    self.rec.events.append((self.now(), f"{cid}: board reset ({ch.last_cause})"))
                    self.out(f"{self.now():7.1f} s  -- {cid}: board reset ({ch.last_cause})")
                got = ch.poll(0.0)
                if got:
                    self.latest[cid] = got[-1]
                    for s in got:
                        if s.get("ev"):
                            self.rec.energy_wh[s["ev"]] = max(self.rec.energy_wh.get(s["ev"], 0.0),
                                                              s.get("energy_wh", 0.0))
                if ch.proc.poll() is not None:
                    raise RuntimeError(f"charger {cid} exited with {ch.proc.returncode}; see "
                                       f"{ch.workdir / 'firmware.log'}")
            s = Sample(self.now(), {k: dict(v) for k, v in self.latest.items()}, self.server is not None)
            self.rec.samples.append(s)
            key = tuple((c.get("state"), c.get("pilot_a"), c.get("limit_by"), round(c.get("measured_a", 0)))
                        for c in s.chargers.values())
            if key != self._last_key or s.t - self._last_live >= self.live_every_s:
                self._last_live = s.t
                self._last_key = key
                self.out(self.live_line(s))
            time.sleep(SAMPLE_S)

    def run(self) -> Recording:
        self.advance(self.sc.duration_s)
        return self.rec

    def live_line(self, s: Sample) -> str:
        parts = []
        for cid, c in s.chargers.items():
            parts.append(f"{cid} {c.get('state', '?')} {c.get('pilot_a', 0):4.1f}/{c.get('measured_a', 0):4.1f} A"
                         f" {c.get('limit_by', ''):<8}")
        total = s.group_measured()
        flag = " OVER BREAKER" if total > self.sc.breaker_a else (" over limit" if total > self.sc.limit_a else "")
        srv = "" if s.server_up else "  [server down]"
        return (f"{s.t:7.1f} s  " + " | ".join(parts) +
                f" | group {total:4.1f} A / limit {self.sc.limit_a} / breaker {self.sc.breaker_a}{flag}{srv}")


def summarize(rec: Recording) -> dict:
    """The run's figures: peak group current, time above limit and breaker,
    the longest excursion above the limit, energy per car, fallbacks, faults."""
    sc = rec.scenario
    peak = 0.0
    above_limit = above_breaker = longest = run = 0.0
    fallbacks: dict[str, int] = {cid: 0 for cid in sc.chargers}
    faults: set[tuple[str, str]] = set()
    prev_online: dict[str, bool] = {}
    prev_t = None
    for s in rec.samples:
        dt = s.t - prev_t if prev_t is not None else 0.0
        prev_t = s.t
        total = s.group_measured()
        peak = max(peak, total)
        if total > sc.limit_a + 1e-6:
            above_limit += dt
            run += dt
            longest = max(longest, run)
        else:
            run = 0.0
        if total > sc.breaker_a + 1e-6:
            above_breaker += dt
        for cid, c in s.chargers.items():
            online = c.get("online", True)
            if prev_online.get(cid, True) and not online:
                fallbacks[cid] += 1
            prev_online[cid] = online
            if c.get("fault"):
                faults.add((cid, c["fault"]))
    return {
        "scenario": sc.name, "limit_a": sc.limit_a, "breaker_a": sc.breaker_a,
        "peak_group_a": round(peak, 1), "seconds_above_limit": round(above_limit, 1),
        "longest_above_limit_s": round(longest, 1), "seconds_above_breaker": round(above_breaker, 1),
        "energy_wh": {k: round(v) for k, v in sorted(rec.energy_wh.items())},
        "fallbacks": fallbacks, "faults": sorted(faults),
    }


def plot(rec: Recording, path: Path) -> Path:
    """Write the run's PNG: per-charger pilot and measured current, and the
    group's measured sum against its limit and breaker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = rec.scenario
    t = [s.t for s in rec.samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for i, cid in enumerate(sc.chargers):
        color = f"C{i}"
        ax1.plot(t, [s.chargers[cid].get("pilot_a", 0) for s in rec.samples], "--", color=color,
                 label=f"{cid} pilot")
        ax1.plot(t, [s.chargers[cid].get("measured_a", 0) for s in rec.samples], "-", color=color,
                 label=f"{cid} measured")
    ax1.set_ylabel("A")
    ax1.set_title(f"{sc.name}: {len(sc.chargers)} chargers, {sc.breaker_a} A breaker, "
                  f"{sc.limit_a} A group limit")
    ax1.legend(loc="upper right", fontsize=8, ncol=2)
    ax2.plot(t, [s.group_measured() for s in rec.samples], color="k", label="group measured")
    ax2.axhline(sc.limit_a, color="tab:orange", linestyle="--", label=f"limit {sc.limit_a} A")
    ax2.axhline(sc.breaker_a, color="tab:red", linestyle=":", label=f"breaker {sc.breaker_a} A")
    down = None
    for s in rec.samples:
        if not s.server_up and down is None:
            down = s.t
        elif s.server_up and down is not None:
            ax2.axvspan(down, s.t, color="grey", alpha=0.2)
            down = None
    if down is not None:
        ax2.axvspan(down, t[-1], color="grey", alpha=0.2)
    for at, text in rec.events:
        for ax in (ax1, ax2):
            ax.axvline(at, color="grey", linewidth=0.5)
        ax1.annotate(text, (at, ax1.get_ylim()[1]), rotation=90, fontsize=7, va="top", ha="right")
    ax2.set_xlabel("s (grey: server down)" if any(not s.server_up for s in rec.samples) else "s")
    ax2.set_ylabel("A")
    ax2.set_ylim(0, sc.breaker_a * 1.15)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a simulated load group end to end and "
                                             "print its timeline, plot and summary.")
    ap.add_argument("scenario", nargs="?", default="garage",
                    help="scenario name in tools/scenarios/ or a path to a .toml file "
                         f"(default garage; available: "
                         f"{', '.join(sorted(p.stem for p in SCENARIOS.glob('*.toml')))})")
    ap.add_argument("--broker", metavar="mqtt://HOST:PORT",
                    help="use this broker (default: mosquitto if installed, else the embedded one)")
    ap.add_argument("--out", default="out", metavar="DIR",
                    help="where the plot and summary go (default ./out)")
    args = ap.parse_args(argv)
    path = Path(args.scenario)
    if not path.suffix:
        path = SCENARIOS / f"{args.scenario}.toml"
    try:
        sc = load(path)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        broker = brokers.default_broker(args.broker)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    print(f"scenario {sc.name}: {sc.description}")
    print(f"chargers: the firmware frozen into the device runtime (MicroPython v1.28.0, 32-bit, "
          f"single-precision floats, GIL), heap {os.environ.get('EVSE_HEAP') or HEAP} each")
    print(f"broker: {broker.kind} at {broker.host}:{broker.port}; T_wd {sc.t_wd_s} s; "
          f"runs {sc.duration_s:g} s")
    try:
        with tempfile.TemporaryDirectory(prefix=f"evse-sim-{sc.name}-") as tmp:
            with LoadGroupSim(sc, broker, Path(tmp)) as sim:
                rec = sim.run()
    finally:
        if broker.managed:
            broker.stop()
    summary = summarize(rec)
    png = plot(rec, out_dir / f"{sc.name}.png")
    (out_dir / f"{sc.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("summary:")
    print(f"  peak group current {summary['peak_group_a']} A (limit {sc.limit_a} A, "
          f"breaker {sc.breaker_a} A)")
    print(f"  above the limit {summary['seconds_above_limit']} s in all, longest "
          f"{summary['longest_above_limit_s']} s; above the breaker {summary['seconds_above_breaker']} s")
    for ev, wh in summary["energy_wh"].items():
        print(f"  energy {ev}: {wh} Wh")
    print("  watchdog fallbacks: " + ", ".join(f"{k} {v}" for k, v in summary["fallbacks"].items()))
    print(f"  faults: {', '.join(f'{c} {f}' for c, f in summary['faults']) or 'none'}")
    print(f"  plot: {png}")
    return 0 if summary["seconds_above_breaker"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
