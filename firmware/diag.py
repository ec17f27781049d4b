"""Diagnostics for a technician at the serial REPL (``from firmware import diag``).

They run *beside* the live control loop, which keeps its own thread. They
read the core only through its snapshot (:mod:`firmware.core.snapshot`), and
everything that acts (a self-test, a fault reset, a settings change,
stopping) is a command on the core's queue (:mod:`firmware.core.commands`)
that the control loop carries out in its own tick: the REPL never drives the
hardware behind its back, and a diagnostic that fails cannot stop the
charger. Settings changed here go through the same validation as the MQTT
path, and are saved by the write-behind, between ticks.

    >>> from firmware import diag
    >>> diag.status()          # state, pilot A, measured A, limit and reason, lease, fault
    >>> diag.pilot()           # raw pilot levels and classification
    >>> diag.log(10)           # recent events and the persisted fault log
    >>> diag.net()             # WiFi, MQTT, age of the last valid setpoint
    >>> diag.settings()        # settings (secrets hidden)
    >>> diag.set("offline_a", 10)
    >>> diag.selftest()        # GFCI test and relay check (contactor open only)
    >>> diag.reset_fault()
    >>> diag.stop()            # end the control loop: contactor open, pilot +12 V
"""
from firmware.core.charger import COMMISSIONING

_charger = None
_bridge = None
_wlan = None


def attach(charger, bridge, wlan=None):
    """Point the diagnostics at a charger (tests; :mod:`firmware.start`
    when this module is already imported). ``bridge``: its
    :class:`firmware.net.bridge.ServerBridge` (or None)."""
    global _charger, _bridge, _wlan
    _charger, _bridge, _wlan = charger, bridge, wlan


def _adopt():
    # Imported at the REPL once the charger runs: take what start.py left.
    import sys
    start = sys.modules.get("firmware.start")
    if start is not None and start.running is not None:
        attach(*start.running)


_adopt()


def _c():
    if _charger is None:
        raise RuntimeError("no charger running")
    return _charger


def status():
    """Print and return the live status (dict, see
    :class:`firmware.core.snapshot.Snapshot`)."""
    st = _c().status()
    temp = st["temp_c"]
    print("state %s  pilot %s A  measured %.1f A  limit %s A (%s)" % (
        st["state"], st["pilot_a"], st["measured_a"], st["limit_a"], st["limit_by"]))
    print("lease %.1f s (%s)  offline %s A  start %s A  T_wd %d s" % (
        st["lease_age_ms"] / 1000, "online" if st["online"] else "expired", st["offline_a"],
        st["start_a"], st["t_wd_s"]))
    print("fault %s%s  contactor %s  temp %s C  reset reason %s" % (
        st["fault"], " (lockout)" if st["lockout"] else "", "closed" if st["relay"] else "open",
        "%.1f" % temp if temp == temp else "unreadable", st["reset_reason"]))
    return st


def pilot():
    """Print and return the pilot levels and their classification."""
    st = _c().status()
    out = {"high_mv": st["high_mv"], "low_mv": st["low_mv"], "state": st["state"],
           "diode_ok": st["diode_ok"]}
    print("high %d mV  low %d mV  -> state %s  diode %s" % (
        out["high_mv"], out["low_mv"], out["state"], "ok" if out["diode_ok"] else "not seen"))
    return out


def log(n=10):
    """Print the last ``n`` events and the persisted fault log."""
    c = _c()
    s = c.snapshot
    now = c.clock.ticks_ms()
    for t, text in list(s.events)[-n:]:
        print("%8.1f s ago  %s" % (c.clock.ticks_diff(now, t) / 1000, text))
    print("fault log (uptime s, code, detail):")
    for entry in list(s.fault_entries)[-n:]:
        print("  %s" % (entry,))


def net():
    """Print and return WiFi and MQTT state and the age of the last valid setpoint."""
    st = _c().status()
    link = _bridge.link if _bridge is not None else None
    out = {
        "wifi": {"connected": _wlan.isconnected()} if _wlan is not None else None,
        "mqtt": link.stats() if link is not None else None,
        "setpoint_age_s": st["lease_age_ms"] / 1000 if st["ack_seq"] is not None else None,
    }
    print("wifi %s" % (out["wifi"],))
    print("mqtt %s" % (out["mqtt"],))
    print("last valid setpoint %s s ago (seq %s, epoch %s)" % (
        out["setpoint_age_s"], st["ack_seq"], st["epoch"]))
    return out


def settings():
    """Print and return the settings (secrets are kept apart and not shown)."""
    values = dict(_c().snapshot.settings)   # replaced whole by the core: a consistent read
    for k in sorted(values):
        print("%-16s %r" % (k, values[k]))
    return values


def set(key, value, wait_ms=3000):
    """Change one setting with the same validation as the MQTT path; it is
    saved behind the tick. Prints ``refused: ...`` and changes nothing on a
    bad key or value. ``wait_ms`` 0: queue it and return at once."""
    if key in COMMISSIONING:
        print("refused: %s is a commissioning value: set it with `make provision`, which parks "
              "the charger first" % key)
        return False
    outcome = _ask("settings", {key: value}, wait_ms, quiet=True)
    if outcome is None:
        return False
    if outcome.startswith("refused") or outcome.startswith("failed"):
        print(outcome)
        return False
    print("%s = %r (%s; saved behind the tick)" % (key, value, outcome))
    return True


def _ask(name, arg=None, wait_ms=3000, quiet=False):
    c = _c()
    clock = c.clock
    t0 = clock.ticks_ms()
    while not c.request(name, arg):          # the queue refuses rather than blocks
        if clock.ticks_diff(clock.ticks_ms(), t0) > wait_ms:
            print("%s: the control loop's queue stays full" % name)
            return None
        clock.sleep_ms(20)
    if not wait_ms:
        return "queued"
    while name not in c.results:
        if clock.ticks_diff(clock.ticks_ms(), t0) > wait_ms:
            print("%s: no answer from the control loop" % name)
            return None
        clock.sleep_ms(20)
    if not quiet:
        print("%s: %s" % (name, c.results[name]))
    return c.results[name]


def selftest():
    """GFCI self-test and relay check, run by the control loop."""
    return _ask("selftest")


def reset_fault():
    """Clear a fault or lockout (after its 300 ms in state F)."""
    return _ask("reset_fault")


def stop():
    """End the control loop by the stop path: stop offering, open the
    contactor once the EV has stopped drawing (or after 6 s), pilot +12 V."""
    if _c().request("stop"):
        print("stop requested")
        return True
    print("stop: the control loop's queue is full: try again")
    return False
