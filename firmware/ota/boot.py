"""File-level A/B slots for over-the-air updates: which firmware boots, and
rollback (DESIGN.md §6: Python files on the filesystem are not covered by
the ESP32's image rollback).

Layout under the device root (``/`` on the ESP32, the ``--dir`` of a
simulated charger):

* ``firmware/``: the factory firmware written by ``make deploy``. OTA never
  touches it, and this module always runs from it.
* ``ota/a/firmware/``, ``ota/b/firmware/``: the two OTA slots.
* ``ota.json``: ``{"active": "factory"|"a"|"b", "previous": ..., "pending":
  bool, "boots": n, "version": "X.Y.Z", "rolled_back": slot or null}``,
  replaced atomically (temp file,
  rename) and only by :func:`switch`, :func:`select` and :func:`confirm`.

A new slot is *pending* until the firmware in it has reached the server and
run healthy for a while (:func:`confirm`). A pending slot gets one boot; a
second boot that finds it still pending rolls back to the previous slot.
So a version that crashes at import, hangs (the hardware watchdog resets),
or never reaches the server (it reboots itself, see
:class:`firmware.ota.update.Updater`) is gone at the next boot. A power cut at any
step leaves ``ota.json`` either old or new, and both name a complete slot.
"""
import json

from firmware.core import atomicfile
from firmware.core import strictjson

SLOTS = ("a", "b")
FACTORY = "factory"
STATE = "ota.json"


def join(root, *parts):
    """``root`` and ``parts`` joined with ``/`` (``""`` is the current
    directory, ``/`` the filesystem root)."""
    path = root[:-1] if len(root) > 1 and root.endswith("/") else root
    for p in parts:
        path = p if not path else (path + p if path.endswith("/") else path + "/" + p)
    return path


def read_state(root, fs=atomicfile.FS):
    """The slot state under ``root`` (dict). A missing or corrupt ``ota.json``
    means the factory firmware, nothing pending."""
    text = atomicfile.read_text(join(root, STATE), fs, 1024)
    state = {"active": FACTORY, "previous": FACTORY, "pending": False, "boots": 0, "version": None,
             "rolled_back": None}
    try:
        data = strictjson.loads(text) if text else None
    except Exception:  # corrupt: the factory firmware is always there
        data = None
    if type(data) is dict:
        for key in state:
            if key in data:
                state[key] = data[key]
    for key in ("active", "previous"):
        if state[key] not in SLOTS:
            state[key] = FACTORY
    if type(state["pending"]) is not bool or type(state["boots"]) is not int:
        state["pending"], state["boots"] = False, 0
    return state


def _write(root, state, fs):
    atomicfile.write_atomic(join(root, STATE), json.dumps(state), fs)


def slot_path(root, slot):
    """The directory to put first on ``sys.path`` for ``slot`` (None for the
    factory firmware, which is already importable)."""
    return None if slot == FACTORY else join(root, "ota", slot)


def inactive(state):
    """The OTA slot a new version goes into: never the one running."""
    return "b" if state["active"] == "a" else "a"


MARK = "complete"
"""File written last into a slot by an install; a slot without it is never booted."""


def complete(root, slot, fs=atomicfile.FS):
    """True when ``slot`` is the factory firmware or a finished install."""
    return slot == FACTORY or atomicfile.read_text(join(root, "ota", slot, MARK), fs, 64) is not None


def select(root, fs=atomicfile.FS):
    """At boot: return ``(slot, path)`` to run, rolling back a pending slot
    that already had its boot, and never booting a slot that is not complete
    (the factory firmware then). Writes ``ota.json`` when something changes."""
    state = read_state(root, fs)
    if state["pending"]:
        if state["boots"] >= 1:
            state = {"active": state["previous"], "previous": state["previous"], "pending": False,
                     "boots": 0, "version": None, "rolled_back": state["active"]}
        else:
            state["boots"] += 1
        _write(root, state, fs)
    if not complete(root, state["active"], fs):
        state = {"active": FACTORY, "previous": FACTORY, "pending": False, "boots": 0,
                 "version": None, "rolled_back": state["active"]}
        _write(root, state, fs)
    return state["active"], slot_path(root, state["active"])


def switch(root, slot, version, fs=atomicfile.FS):
    """Make ``slot`` (a complete, verified slot) the one that boots next, as
    pending. One atomic write; before it the old slot boots, after it the new."""
    if slot not in SLOTS:
        raise ValueError("no such slot %r" % (slot,))
    state = read_state(root, fs)
    _write(root, {"active": slot, "previous": state["active"], "pending": True, "boots": 0,
                  "version": version, "rolled_back": None}, fs)


def confirm(root, fs=atomicfile.FS):
    """The running slot reached the server and ran healthy: keep it."""
    state = read_state(root, fs)
    if state["pending"]:
        state["pending"] = False
        state["boots"] = 0
        _write(root, state, fs)
        return True
    return False


def activate(path):
    """Import the firmware from ``path`` from now on: put it first on
    ``sys.path`` and forget the factory modules already imported."""
    import sys
    sys.path.insert(0, path)
    for name in list(sys.modules):
        if name == "firmware" or name.startswith("firmware."):
            del sys.modules[name]
