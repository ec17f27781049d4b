"""Diagnostics for a technician at the serial REPL (``from firmware import diag``).

They run *beside* the live control loop, which keeps its own thread: reading
is harmless, and everything that acts (a self-test, a fault reset, stopping)
is a request the control loop carries out in its own tick, so the REPL never
drives the hardware behind its back. Settings changed here go through the
same validation as the MQTT path.

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
import time

COMMISSIONING = ("unit_rating_a", "installer_max_a")
"""Limits only provisioning may change: no typo at the REPL may raise them."""

_charger = None
_uplink = None
_wlan = None


def attach(charger, uplink, wlan=None):
    """Point the diagnostics at a charger (tests; :mod:`firmware.start`
    when this module is already imported)."""
    global _charger, _uplink, _wlan
    _charger, _uplink, _wlan = charger, uplink, wlan


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
    """Print and return the live status (dict)."""
    c = _c()
    st = c.status()
    print("state %s  pilot %s A  measured %.1f A  limit %s A (%s)" % (
        st["state"], st["pilot_a"], st["measured_a"], st["limit_a"], st["limit_by"]))
    print("lease %.1f s (%s)  offline %s A  start %s A  T_wd %d s" % (
        st["lease_age_ms"] / 1000, "online" if st["online"] else "expired", st["offline_a"],
        st["start_a"], st["t_wd_s"]))
    print("fault %s%s  contactor %s  temp %.1f C  reset reason %s" % (
        st["fault"], " (lockout)" if st["lockout"] else "", "closed" if st["relay"] else "open",
        st["temp_c"], st["reset_reason"]))
    return st


def pilot():
    """Print and return the raw pilot levels and their classification."""
    r = _c().reader
    out = {"high_mv": r.high_mv, "low_mv": r.low_mv, "state": r.state, "diode_ok": r.diode_ok,
           "recent": list(r._recent)}
    print("high %d mV  low %d mV  -> state %s  diode %s  last samples %s" % (
        r.high_mv, r.low_mv, r.state, "ok" if r.diode_ok else "not seen", out["recent"]))
    return out


def log(n=10):
    """Print the last ``n`` events and the persisted fault log."""
    c = _c()
    now = c.clock.ticks_ms()
    for t, text in list(c.events)[-n:]:
        print("%8.1f s ago  %s" % (c.clock.ticks_diff(now, t) / 1000, text))
    print("fault log (uptime s, code, detail):")
    for entry in c.fault_log.recent(n):
        print("  %s" % (entry,))


def net():
    """Print and return WiFi and MQTT state and the age of the last valid setpoint."""
    c = _c()
    now = c.clock.ticks_ms()
    link = _uplink.link if _uplink is not None else None
    out = {
        "wifi": {"connected": _wlan.isconnected()} if _wlan is not None else None,
        "mqtt": link.stats() if link is not None else None,
        "setpoint_age_s": c.arbiter.lease_age_ms(now) / 1000 if c.arbiter.ack_seq is not None else None,
    }
    print("wifi %s" % (out["wifi"],))
    print("mqtt %s" % (out["mqtt"],))
    print("last valid setpoint %s s ago (seq %s, epoch %s)" % (
        out["setpoint_age_s"], c.arbiter.ack_seq, c.arbiter.epoch))
    return out


def settings():
    """Print and return the settings (secrets are kept apart and not shown)."""
    values = dict(_c().settings.values)
    for k in sorted(values):
        print("%-16s %r" % (k, values[k]))
    return values


def set(key, value):
    """Change one setting with the same validation as the MQTT path; persist
    it. Prints ``refused: ...`` and changes nothing on a bad key or value."""
    if key in COMMISSIONING:
        print("refused: %s is a commissioning value: set it with `make provision`, which parks "
              "the charger first" % key)
        return False
    try:
        changed = _c().settings.set(key, value)
    except ValueError as exc:
        print("refused: %s" % exc)
        return False
    except OSError as exc:
        print("in force but not saved: %s" % exc)
        return False
    print("%s = %r%s" % (key, value, "" if changed else " (unchanged)"))
    return True


def _ask(name, wait_ms=3000):
    c = _c()
    c.request(name)
    t0 = time.ticks_ms()
    while name not in c.results:
        if time.ticks_diff(time.ticks_ms(), t0) > wait_ms:
            print("%s: no answer from the control loop" % name)
            return None
        time.sleep_ms(20)
    print("%s: %s" % (name, c.results[name]))
    return c.results[name]


def selftest():
    """GFCI self-test and relay check, run by the control loop."""
    return _ask("selftest")


def reset_fault():
    """Clear a fault or lockout (after its 300 ms in state F)."""
    return _ask("reset_fault")


def stop():
    """End the control loop: contactor open, pilot static +12 V."""
    _c().request("stop")
    print("stop requested")
