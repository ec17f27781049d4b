"""Parser for the server's setpoint message on ``<prefix>/<id>/set`` (DESIGN.md §4, C3).

Pure logic. Every malformed, non-finite, negative or wrongly typed message is
refused with ValueError and a message that says why; the caller logs it and
changes nothing (in particular it does not feed the connectivity watchdog).

Accepted payload (ASCII JSON object, at most 512 bytes, numbers without
exponent and with at most 2 decimals)::

    {"v": 1, "epoch": 7, "seq": 42, "current_a": 16,
     "offline_a": 8, "start_a": 8}           # the last two are optional

``current_a`` is any finite number >= 0 (A); values above the unit's rating are
clamped and values below 6 A mean pause, both by the limit arbiter.
``offline_a`` and ``start_a`` are 0 or 6..80 A. ``epoch`` and ``seq`` are
integers >= 0.
"""
from firmware.core import strictjson

MAX_PAYLOAD = 512
"""Largest accepted payload, bytes. A real setpoint is under 120 bytes."""

MAX_DECIMALS = 2
"""Numbers are plain decimals with at most 2 decimals and no exponent, so that
the ESP32's 32-bit floats cannot round 5.99999999 A up to 6 A."""

_INF = float("inf")
_FLOAT32_MAX = 3.4e38
"""Above this a number is infinite in the ESP32's 32-bit floats: refused as
non-finite on every runtime (a 400-digit integer is inf to MicroPython and a
finite int to CPython; the verdict must not depend on the runtime)."""


class Setpoint:
    """A validated setpoint: ``epoch`` (int), ``seq`` (int), ``current_a``
    (A, finite, >= 0), ``offline_a`` and ``start_a`` (A, or None when absent)."""

    def __init__(self, epoch, seq, current_a, offline_a, start_a):
        self.epoch = epoch
        self.seq = seq
        self.current_a = current_a
        self.offline_a = offline_a
        self.start_a = start_a


def _amps(obj, name, required):
    if name not in obj:
        if required:
            raise ValueError("missing %s" % name)
        return None
    x = obj[name]
    # bool is an int on CPython but not on MicroPython: reject it on both.
    if type(x) is not int and type(x) is not float:
        raise ValueError("%s must be a number" % name)
    if x != x or x >= _FLOAT32_MAX or x <= -_FLOAT32_MAX:
        raise ValueError("%s must be finite" % name)
    if x < 0:
        raise ValueError("%s must not be negative" % name)
    if not required and x != 0 and (x < 6 or x > 80):
        raise ValueError("%s must be 0 or 6..80 A" % name)
    return x


def _count(obj, name):
    if name not in obj:
        raise ValueError("missing %s" % name)
    x = obj[name]
    if type(x) is not int or x < 0:
        raise ValueError("%s must be an integer >= 0" % name)
    return x


def parse(payload):
    """Validate ``payload`` (bytes or str) and return a :class:`Setpoint`.

    Raises ValueError for: a payload over 512 bytes, non-ASCII bytes, anything
    that is not strict JSON (:mod:`firmware.core.strictjson`, the same verdict on
    MicroPython and CPython), a number with an exponent or more than 2
    decimals, anything but an object, ``v`` other than 1, a missing or non-integer
    ``epoch``/``seq``, a missing, non-numeric, non-finite or negative
    ``current_a``, and ``offline_a``/``start_a`` outside 0 or 6..80 A.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    obj = strictjson.loads(payload, MAX_DECIMALS)
    if type(obj) is not dict:
        raise ValueError("payload is not a JSON object")
    if obj.get("v") != 1 or type(obj.get("v")) is not int:
        raise ValueError("unsupported or missing v (want 1)")
    return Setpoint(_count(obj, "epoch"), _count(obj, "seq"),
                    _amps(obj, "current_a", True),
                    _amps(obj, "offline_a", False), _amps(obj, "start_a", False))
