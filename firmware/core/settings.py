"""Charger settings: schema, validation and persistence (C5).

Two files, each written atomically and only when a value changes:

* ``settings.json``: ordinary settings, safe to show to a technician.
* ``secrets.json``: WiFi and broker credentials, kept apart and never printed.

A missing or corrupt file gives the defaults below; a single out-of-range or
wrongly typed field falls back to its own default. The defaults are safe on
any circuit: 8 A start, 8 A offline (seed), and an installer max of 16 A (the
limit of the smallest common circuit, 20 A x 80 %), never the unit's rating.
"""
import json

from firmware.core import atomicfile
from firmware.core import strictjson

MAX_FILE = 8192
"""Largest settings or secrets file read, bytes; a longer one is corrupt."""

_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
_TOPIC_CHARS = _ID_CHARS + "_/"


def _number(value, lo, hi, name, allow_zero=False):
    # bool is an int on CPython but not on MicroPython: reject it on both.
    if type(value) is not int and type(value) is not float:
        raise ValueError("%s must be a number, got %r" % (name, value))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("%s must be finite" % name)
    if allow_zero and value == 0:
        return 0
    if value < lo or value > hi:
        if allow_zero:
            raise ValueError("%s must be 0 or %s..%s, got %r" % (name, lo, hi, value))
        raise ValueError("%s must be %s..%s, got %r" % (name, lo, hi, value))
    return value


def _integer(value, lo, hi, name):
    if type(value) is not int:
        raise ValueError("%s must be an integer, got %r" % (name, value))
    return _number(value, lo, hi, name)


def _text(value, chars, lo, hi, name):
    if type(value) is not str:
        raise ValueError("%s must be a string, got %r" % (name, value))
    if not lo <= len(value) <= hi:
        raise ValueError("%s must be %d..%d characters long" % (name, lo, hi))
    if chars:
        for c in value:
            if c not in chars:
                raise ValueError("%s may only use %s, got %r" % (name, "a-z 0-9 " + chars[36:], value))
    return value


def _flag(value, name):
    if type(value) is not bool:
        raise ValueError("%s must be true or false, got %r" % (name, value))
    return value


# name: (default, validator(value, name) -> normalised value; raises ValueError)
SCHEMA = {
    # Current that the unit's hardware (contactor, cable, PCB) carries, A.
    "unit_rating_a": (32, lambda v, n: _number(v, 6, 80, n)),
    # Breaker-derived cap set by the installer, A (NEC 625.41: 80 % of the breaker).
    "installer_max_a": (16, lambda v, n: _number(v, 6, 80, n)),
    # Current every session starts at until the server allocates (seed: 8 A; 0 = wait).
    "start_a": (8, lambda v, n: _number(v, 6, 80, n, True)),
    # Current in force once the connectivity watchdog expires (seed: 8 A; 0 = no charging).
    "offline_a": (8, lambda v, n: _number(v, 6, 80, n, True)),
    # Nominal supply voltage for the session energy, V (North American Level 2: 240).
    "supply_v": (240, lambda v, n: _integer(v, 100, 480, n)),
    # Connectivity watchdog timeout T_wd, s (C4: default 30, 10..600).
    "t_wd_s": (30, lambda v, n: _integer(v, 10, 600, n)),
    "charger_id": ("evse-1", lambda v, n: _text(v, _ID_CHARS, 1, 32, n)),
    "topic_prefix": ("evse", lambda v, n: _text(v, _TOPIC_CHARS, 1, 32, n)),
    "mqtt_host": ("", lambda v, n: _text(v, None, 0, 128, n)),
    "mqtt_port": (1883, lambda v, n: _integer(v, 1, 65535, n)),
    "mqtt_tls": (False, _flag),
    # After an OTA switch the new version must reach the server and run this
    # long to be kept (else the next boot rolls back), s.
    "ota_health_s": (60, lambda v, n: _integer(v, 5, 3600, n)),
    # MQTT keepalive, s. mosquitto >= 2.0.12 refuses 0 (DESIGN.md §6).
    "keepalive_s": (30, lambda v, n: _integer(v, 5, 600, n)),
}

SECRETS = {
    "wifi_ssid": ("", lambda v, n: _text(v, None, 0, 32, n)),
    "wifi_password": ("", lambda v, n: _text(v, None, 0, 64, n)),
    "mqtt_user": ("", lambda v, n: _text(v, None, 0, 64, n)),
    "mqtt_password": ("", lambda v, n: _text(v, None, 0, 128, n)),
    "ca_cert": ("", lambda v, n: _text(v, None, 0, 4096, n)),
}


LOWER_FIRST = ("offline_a", "start_a")
"""Settings whose decrease is saved at once rather than coalesced
(:class:`firmware.core.persist.WriteBehind`)."""


class Settings:
    """Validated key/value settings persisted as JSON in one file.

    ``schema`` maps a name to ``(default, validator)``. After construction,
    ``values`` holds every key of the schema; ``problems`` lists what was wrong
    with the file (empty when it loaded cleanly), ``rejected`` the names whose
    stored value was refused (their default is in force). Nothing raises on a
    bad file.
    """

    def __init__(self, path, schema, fs=atomicfile.FS):
        self.path = path
        self.schema = schema
        self.fs = fs
        self.problems = []
        self.rejected = set()
        self.unsaved = False
        self.lowered = False     # an offline or start current went down since the last save
        self.values = self._load()
        self._saved = self.values

    def _load(self):
        values = {}
        for name in self.schema:
            values[name] = self.schema[name][0]
        text = atomicfile.read_text(self.path, self.fs, MAX_FILE + 1)
        if text is None:
            self.problems.append("%s missing: defaults in force" % self.path)
            return values
        try:
            data = strictjson.loads(text) if len(text) <= MAX_FILE else None
        except Exception:  # ValueError, and MemoryError on a small heap: all mean corrupt
            data = None
        if type(data) is not dict:
            self.problems.append("%s corrupt: defaults in force" % self.path)
            return values
        for name in self.schema:
            if name in data:
                try:
                    values[name] = self.schema[name][1](data[name], name)
                except ValueError as exc:
                    self.problems.append("%s: %s; default %r in force" % (self.path, exc, values[name]))
                    self.rejected.add(name)
        return values

    def __getitem__(self, name):
        return self.values[name]

    def check(self, name, value):
        """Return ``value`` validated for ``name``; raise ValueError with a clear
        message for an unknown name or a bad value. Changes nothing."""
        if name not in self.schema:
            raise ValueError("unknown setting %r" % (name,))
        return self.schema[name][1](value, name)

    def apply(self, changes):
        """Validate every item of ``changes`` (dict), then put them all in
        force, in RAM only. All or nothing: a bad item raises ValueError and
        nothing changes. Returns True when a value changed; :attr:`unsaved` is
        then True until :meth:`save` (the control loop's write-behind,
        :class:`firmware.core.persist.WriteBehind`: no flash write on the tick)."""
        checked = {}
        for name in changes:
            checked[name] = self.check(name, changes[name])
        changed = False
        for name in checked:
            if self.values[name] != checked[name]:
                changed = True
        if changed:
            new = dict(self.values)
            new.update(checked)
            for name in LOWER_FIRST:
                if name in new and new[name] < self._saved.get(name, new[name]):
                    self.lowered = True
            self.values = new      # replaced whole: a reader on another thread sees old or new
            self.unsaved = True
        return changed

    def save(self):
        """Write the values atomically if :meth:`apply` changed them since the
        last save. Returns True when written. Raises OSError when the write
        fails: ``unsaved`` stays True and the next :meth:`save` tries again."""
        if not self.unsaved:
            return False
        values = self.values
        atomicfile.write_atomic(self.path, json.dumps(values), self.fs)
        self._saved = values
        self.unsaved = self.values is not values     # changed again meanwhile
        self.lowered = False
        return True

    def update(self, changes):
        """:meth:`apply` then :meth:`save` at once: for provisioning and tools,
        never for the control loop. Returns True when the file was written;
        raises ValueError (nothing changed) or OSError (in force, unsaved)."""
        self.apply(changes)
        return self.save()

    def set(self, name, value):
        """Validate and persist one setting (see :meth:`update`)."""
        return self.update({name: value})


def load(directory="", fs=atomicfile.FS):
    """Open the two stores in ``directory`` (device root by default).

    Returns ``(settings, secrets)``, two :class:`Settings`.
    """
    prefix = directory + "/" if directory and not directory.endswith("/") else directory
    return (Settings(prefix + "settings.json", SCHEMA, fs),
            Settings(prefix + "secrets.json", SECRETS, fs))
