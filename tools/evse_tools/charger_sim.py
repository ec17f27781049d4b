"""Run one simulated charger on the device runtime, with no server, and print
its timeline.

The charger is the real firmware (``main.py`` and the frozen ``firmware``
package) in a process of the device runtime
with the simulated board (:mod:`simboard.board`). This tool provisions its
settings file, drives the board over UDP (plug in an EV, unplug) and prints
each telemetry change. With no server the session starts at the start current
(8 A) and falls to the offline current once the connectivity watchdog
``T_wd`` expires.

Reference EV (default): Chevrolet Bolt EV (2020): 7.2 kW onboard charger,
32 A at 240 V; 66 kWh battery (Chevrolet's 2020 Bolt EV specifications).
"""
import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evse_tools.device_runtime import REPO, device_env, micropython_cmd

__all__ = ["REPO", "HEAP", "SLOT_HEAP", "SimCharger", "device_env", "free_udp_port", "install_main",
           "micropython_cmd"]

BOLT_EV = {"name": "bolt-ev", "max_a": 32, "battery_wh": 66000, "soc": 0.3, "delay_ms": 2000}


HEAP = "48K"
"""Heap of each simulated charger (``-X heapsize``): the ESP32's heap starts
at 56 KB, and 48 KB leaves it room never to grow into WiFi's and TLS's
memory (issue 12). The environment variable ``EVSE_HEAP`` overrides it for
the chargers started after it is set (the memory benchmark's searches)."""
FLASH_MS = 20
"""Modelled flash write latency of each simulated charger, ms (``--flash-ms``:
every file write on its root waits this long before it commits, as a
littlefs erase does on the ESP32), so that every end-to-end test and the
simulator see the cost of persisting. ``EVSE_FLASH_MS`` overrides it."""
SLOT_HEAP = "96K"
"""Heap of a charger that boots an OTA slot: a slot's ``.mpy`` bytecode lives
in RAM, where the image's frozen bytecode does not (``make bench`` measures
the minimum; see the README's memory table)."""


def install_main(root: Path) -> None:
    """Put ``main.py`` on the device root, as ``make deploy`` does on a
    charger. A process started there has the root first on ``sys.path``
    (as the ESP32 has ``''``), never the repository's ``firmware/``."""
    src = (REPO / "main.py").read_bytes()
    dst = root / "main.py"
    if not dst.exists() or dst.read_bytes() != src:
        part = root / "main.py.part"
        part.write_bytes(src)
        os.replace(part, dst)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimCharger:
    """A firmware process on the unix port with its simulated board.

    ``settings`` (dict) is written to its ``settings.json`` before start
    (None: the charger keeps the files already in ``workdir``, as after a
    power cycle).
    Use as a context manager; :meth:`send` sends a control command and
    :meth:`poll` returns the telemetry received (list of dicts).

    It also plays the board's reset circuitry, which sits outside the
    firmware: :meth:`check_watchdog` resets a process whose control loop
    stopped (no telemetry for ``watchdog_s``: the hardware watchdog), and
    boots again a process that ended (exit 3: a reboot it asked for, such as
    after an OTA switch; 1: a crash, after which a real board resets too),
    with the matching reset cause, and plugs the same EV back in (it never
    left). ``restart_on_exit=False`` leaves an ended process ended.
    ``extra_argv`` is added to ``main.py``'s options at every boot (e.g.
    ``--tick-offset MS``). ``heap`` is the ``-X heapsize`` (default
    :data:`HEAP`); the process runs on the device runtime from ``workdir``
    (its filesystem root), with ``main.py`` put there and only the frozen
    modules on the module path.
    """

    def __init__(self, settings: dict | None, workdir: Path, port: int | None = None,
                 watchdog_s: float = 5.0, restart_on_exit: bool = True,
                 extra_argv: list[str] | None = None, heap: str | None = None):
        self.workdir = workdir
        self.heap = heap or os.environ.get("EVSE_HEAP") or HEAP
        self.extra_argv = list(extra_argv or [])
        self.restart_on_exit = restart_on_exit
        self.exits: list[int] = []
        self.port = port or free_udp_port()
        self.watchdog_s = watchdog_s
        self.resets = 0
        self.replies: list[dict] = []     # answers to commands (e.g. mem)
        self.last_cause: str | None = None
        self._closing = False
        self.last_seen: float | None = None
        self._plugged: dict | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            (workdir / "settings.json").write_text(json.dumps(settings))
        self.log = open(workdir / "firmware.log", "w")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self._launch()

    def _launch(self, reset_cause: str | None = None) -> None:
        install_main(self.workdir)
        argv = [micropython_cmd(), "-X", f"heapsize={self.heap}", "main.py",
                "--dir", str(self.workdir.resolve()), "--ctl-port", str(self.port),
                "--flash-ms", os.environ.get("EVSE_FLASH_MS") or str(FLASH_MS)]
        if reset_cause:
            argv += ["--reset-cause", reset_cause]
        argv += self.extra_argv
        self.proc = subprocess.Popen(argv, env=device_env(), cwd=self.workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def check_watchdog(self) -> bool:
        """Reset the firmware if its control loop has been silent for
        ``watchdog_s``, or boot it again if it ended; returns True when it did
        (the new process is ready)."""
        code = self.proc.poll()
        if code is not None and code != 0 and self.restart_on_exit and not self._closing:
            self.exits.append(code)
            cause = "reboot" if code == 3 else "crash"
        elif self.last_seen is not None and time.monotonic() - self.last_seen >= self.watchdog_s:
            self.proc.kill()
            self.proc.wait()
            cause = "watchdog"
        else:
            return False
        self.resets += 1
        self.last_cause = cause
        self._launch(cause)
        self.last_seen = None
        self.wait_ready()
        if self._plugged is not None:
            self.send({"cmd": "plug", "ev": self._plugged})
        return True

    def power_cut(self) -> None:
        """Kill the firmware process with SIGKILL (a power cut: no clean-up,
        a write may be cut halfway) and boot it again with reset cause
        ``power_on``; the EV that was plugged in is plugged in again (it
        never left). Returns once the new process sends telemetry."""
        self.proc.kill()
        self.proc.wait()
        self.resets += 1
        self.last_cause = "power_on"
        self._launch("power_on")
        self.last_seen = None
        self.wait_ready()
        if self._plugged is not None:
            self.send({"cmd": "plug", "ev": self._plugged})

    def send(self, cmd: dict) -> None:
        if cmd.get("cmd") == "plug":
            self._plugged = dict(cmd.get("ev", {}))
        elif cmd.get("cmd") == "unplug":
            self._plugged = None
        self.sock.sendto(json.dumps(cmd).encode(), ("127.0.0.1", self.port))

    def poll(self, timeout: float = 0.05) -> list[dict]:
        out = []
        self.sock.settimeout(timeout)
        while True:
            try:
                data, _ = self.sock.recvfrom(65536)
            except (socket.timeout, BlockingIOError):
                return out
            msg = json.loads(data)
            if "t_ms" in msg:
                out.append(msg)
                self.last_seen = time.monotonic()
            elif "error" in msg:
                raise RuntimeError(f"charger refused a command: {msg['error']}")
            else:
                self.replies.append(msg)
            self.sock.settimeout(0)

    def ask(self, cmd: dict, key: str, timeout: float = 5.0):
        """Send ``cmd`` and return the value of ``key`` in its reply (e.g.
        ``ask({"cmd": "code"}, "code")``); RuntimeError when no reply with
        ``key`` comes within ``timeout`` s."""
        self.replies.clear()
        self.send(cmd)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.poll(0.05)
            for r in self.replies:
                if key in r:
                    return r[key]
        raise RuntimeError(f"no reply with {key!r} to {cmd}")

    def wait_ready(self, timeout: float = 10.0) -> dict:
        """Subscribe to telemetry; return the first sample (raises on timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"firmware exited with {self.proc.returncode}; "
                                   f"see {self.workdir / 'firmware.log'}")
            self.send({"cmd": "watch"})
            got = self.poll(0.2)
            if got:
                return got[0]
        raise RuntimeError("no telemetry from the firmware process")

    def close(self) -> int:
        self._closing = True
        if self.proc.poll() is None:
            self.send({"cmd": "quit"})
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fmt(s: dict) -> str:
    return (f"{s['t_ms'] / 1000:7.2f} s  state {s['state']}  pilot {s['pilot_a']:5.1f} A  "
            f"measured {s['measured_a']:5.1f} A  limit {s['limit_a']:>4} A ({s['limit_by']:<8})  "
            f"contactor {'closed' if s['relay'] else 'open  '}  "
            f"lease {s['lease_age_ms'] / 1000:5.1f} s")


def run(t_wd_s: int, offline_a: float, plug_at: float, unplug_at: float, ev: dict,
        out=print) -> list[dict]:
    """Run the timeline and return every telemetry sample received."""
    settings = {"charger_id": "garage-1", "unit_rating_a": 40, "installer_max_a": 40,
                "start_a": 8, "offline_a": offline_a, "t_wd_s": t_wd_s}
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="evse-charger-") as tmp:
        with SimCharger(settings, Path(tmp)) as ch:
            first = ch.wait_ready()
            out(f"firmware frozen into the device runtime (MicroPython v1.28.0, 32-bit, float, GIL), "
                f"heap {ch.heap}; simulated board on udp {ch.port}; "
                f"no server. T_wd {t_wd_s} s, start 8 A, offline {offline_a:g} A")
            t0 = time.monotonic() - first["t_ms"] / 1000
            plugged = unplugged = False
            samples.append(first)
            out(fmt(first))
            while True:
                now = time.monotonic() - t0
                if not plugged and now >= plug_at:
                    out(f"{now:7.2f} s  -- plug in {ev['name']} (onboard charger {ev['max_a']} A)")
                    ch.send({"cmd": "plug", "ev": ev})
                    plugged = True
                if not unplugged and now >= unplug_at:
                    out(f"{now:7.2f} s  -- unplug")
                    ch.send({"cmd": "unplug"})
                    unplugged = True
                if now >= unplug_at + 1:
                    break
                for s in ch.poll(0.05):
                    prev = samples[-1]
                    samples.append(s)
                    if any(s[k] != prev[k] for k in ("state", "pilot_a", "measured_a", "limit_by",
                                                      "relay", "fault")):
                        out(fmt(s))
    return samples


def summary(samples: list[dict], t_wd_s: int) -> dict:
    """First offer of the session and the watchdog fallback, from telemetry."""
    first_pwm = next((s for s in samples if s["pilot_a"] > 0), None)
    fallback = next((s for s in samples if not s["online"]), None)
    return {
        "first_offer_a": first_pwm["pilot_a"] if first_pwm else None,
        "first_offer_by": first_pwm["limit_by"] if first_pwm else None,
        "fallback_at_s": fallback["t_ms"] / 1000 if fallback else None,
        "offline_a": fallback["limit_a"] if fallback else None,
        "fallback_by": fallback["limit_by"] if fallback else None,
        "peak_measured_a": max(s["measured_a"] for s in samples),
        "t_wd_s": t_wd_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one simulated charger with no server and "
                                             "print its timeline.")
    ap.add_argument("--t-wd", type=int, default=10, metavar="S",
                    help="connectivity watchdog timeout T_wd, 10..600 s (default 10)")
    ap.add_argument("--offline", type=float, default=6, metavar="A",
                    help="offline current, 0 or 6..80 A (default 6, so the fallback shows)")
    ap.add_argument("--plug-at", type=float, default=2.0, metavar="S",
                    help="when the EV plugs in, s after boot (default 2)")
    ap.add_argument("--unplug-at", type=float, default=None, metavar="S",
                    help="when the EV leaves, s after boot (default T_wd + 5)")
    args = ap.parse_args(argv)
    if not 10 <= args.t_wd <= 600:
        ap.error("--t-wd must be 10..600 s")
    if args.offline != 0 and not 6 <= args.offline <= 80:
        ap.error("--offline must be 0 or 6..80 A")
    unplug_at = args.unplug_at if args.unplug_at is not None else args.t_wd + 5
    # nan compares false with everything: without this an --unplug-at nan
    # never comes, and the charger runs for ever.
    if not (math.isfinite(args.plug_at) and args.plug_at >= 0):
        ap.error("--plug-at must be a number of seconds, 0 or more")
    if not math.isfinite(unplug_at):
        ap.error("--unplug-at must be a finite number of seconds")
    if unplug_at <= args.plug_at:
        ap.error("--unplug-at must come after --plug-at")
    samples = run(args.t_wd, args.offline, args.plug_at, unplug_at, BOLT_EV)
    s = summary(samples, args.t_wd)
    print("summary:")
    print(f"  first offer of the session: {s['first_offer_a']} A ({s['first_offer_by']})")
    if s["fallback_at_s"] is None:
        print("  no watchdog fallback seen")
    else:
        print(f"  watchdog fallback at {s['fallback_at_s']:.2f} s after boot (T_wd {args.t_wd} s, "
              f"no server): limit {s['offline_a']} A ({s['fallback_by']})")
    print(f"  peak measured current: {s['peak_measured_a']} A")
    return 0


if __name__ == "__main__":
    sys.exit(main())
