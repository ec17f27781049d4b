"""Firmware versions ``MAJOR.MINOR.PATCH``: parsing and ordering. Pure.

Apart from :mod:`firmware.ota.verify` (RSA, SHA-256, the manifest parser) so
that taking an ``ota`` command costs no import of those: they are imported
on the update's own thread, when it runs."""

_DIGITS = "0123456789"
_MAX_VERSION_DIGITS = 6         # each part below 10^6, far below 2^30


def parse_version(text):
    """``"MAJOR.MINOR.PATCH"`` -> ``(major, minor, patch)`` ints.

    Each part is 1 to 6 decimal digits without a leading zero (``0`` itself
    is fine). Anything else (``1.2``, ``v1.2.3``, ``1.02.3``, ``1.2.3-rc1``)
    raises ValueError.
    """
    if type(text) is not str:
        raise ValueError("version must be a string MAJOR.MINOR.PATCH")
    parts = text.split(".")
    if len(parts) != 3:
        raise ValueError("version %r is not MAJOR.MINOR.PATCH" % text)
    out = []
    for p in parts:
        if not p or len(p) > _MAX_VERSION_DIGITS or (len(p) > 1 and p[0] == "0"):
            raise ValueError("version %r is not MAJOR.MINOR.PATCH" % text)
        for c in p:
            if c not in _DIGITS:
                raise ValueError("version %r is not MAJOR.MINOR.PATCH" % text)
        out.append(int(p))
    return tuple(out)


def is_upgrade(new, current):
    """True if version ``new`` is strictly newer than ``current``.

    Both are ``"X.Y.Z"`` strings or tuples from parse_version. Equal or older
    is False: a downgrade, or a replay of the installed version, is refused.
    Raises ValueError if either is malformed.
    """
    if type(new) is not tuple:
        new = parse_version(new)
    if type(current) is not tuple:
        current = parse_version(current)
    return new > current
