"""Signed OTA verification on the charger (DESIGN.md §4, issue 5): the
signature, the per-file hashes and sizes, and downgrade refusal.

Runs on CPython (pytest) and on the MicroPython unix port (tests/mpy_run.py).
The signed fixtures come from tests/make_fixtures.py (CPython, `cryptography`):
set EVSE_FIXTURES to its output folder. Under CPython, when EVSE_FIXTURES is
unset, this module makes them itself in a temporary folder; under MicroPython
it cannot sign, so every test fails with a message saying what to run.
"""
import os
import sys

from harness import raises

from firmware.ota import verify as ota_verify
from firmware.ota.verify import FileCheck, is_upgrade, load_key, parse_version, verify_manifest

CURRENT = "1.0.0"      # the version the charger under test runs
_fx = []


def _make_on_cpython():
    import atexit
    import shutil
    import tempfile
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import make_fixtures
    out = tempfile.mkdtemp(prefix="evse-ota-fixtures-")
    atexit.register(shutil.rmtree, out, True)
    return str(make_fixtures.make(out))


def fixtures():
    """The fixtures folder (made once per run under CPython if needed)."""
    if not _fx:
        path = os.getenv("EVSE_FIXTURES")
        if not path:
            if sys.implementation.name != "cpython":
                raise AssertionError(
                    "EVSE_FIXTURES is not set: run `.venv/bin/python tests/make_fixtures.py DIR` "
                    "under CPython first and set EVSE_FIXTURES=DIR")
            path = _make_on_cpython()
        try:
            os.stat(path + "/index.json")
        except OSError:
            raise AssertionError("EVSE_FIXTURES=%s holds no fixtures (index.json): run "
                                 "tests/make_fixtures.py %s" % (path, path))
        _fx.append(path)
    return _fx[0]


def read(rel):
    with open(fixtures() + "/" + rel, "rb") as f:
        return f.read()


def key(name="ota_key.json"):
    return load_key(read(name))


def manifest(bundle):
    return read(bundle + "/manifest.json")


def check_file(bundle, entry, chunk=100):
    """Stream a bundle file through FileCheck in chunks, as the downloader does."""
    path = fixtures() + "/" + bundle + "/files/" + entry["path"]
    assert os.stat(path)[6] >= 0
    check = FileCheck(entry["size"], entry["sha256"], entry["path"])
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            check.update(data)
    check.finish()


def message(exc_type, fn, *args):
    return str(raises(exc_type, fn, *args))


# --- the good bundle --------------------------------------------------------

def test_good_bundle_verifies_and_every_file_matches_its_size_and_hash():
    body = verify_manifest(manifest("good"), key())
    assert body["v"] == 1
    assert body["version"] == "9.9.1"
    paths = [e["path"] for e in body["files"]]
    assert paths == ["data/blob.bin", "firmware/ota_hello.mpy"]
    for entry in body["files"]:
        assert os.stat(fixtures() + "/good/files/" + entry["path"])[6] == entry["size"]
        for chunk in (1, 7, 100, 4096):
            check_file("good", entry, chunk)
    assert is_upgrade(body["version"], CURRENT)


# --- rejected bundles -------------------------------------------------------

def test_tampered_file_is_rejected_by_its_hash():
    body = verify_manifest(manifest("tampered"), key())    # the manifest itself is intact
    bad = [e for e in body["files"] if e["path"] == "firmware/ota_hello.mpy"][0]
    msg = message(ValueError, check_file, "tampered", bad)
    assert "SHA-256" in msg, msg
    other = [e for e in body["files"] if e["path"] != "firmware/ota_hello.mpy"][0]
    check_file("tampered", other)


def test_manifest_signed_by_another_key_is_rejected():
    msg = message(ValueError, verify_manifest, manifest("wrong_key"), key())
    assert "signature" in msg, msg


def test_good_manifest_checked_against_another_public_key_is_rejected():
    msg = message(ValueError, verify_manifest, manifest("good"), key("other_key.json"))
    assert "signature" in msg, msg


def test_body_edited_after_signing_is_rejected():
    msg = message(ValueError, verify_manifest, manifest("edited"), key())
    assert "signature" in msg, msg


def test_truncated_manifest_is_rejected():
    msg = message(ValueError, verify_manifest, manifest("truncated"), key())
    assert "JSON" in msg, msg


def test_every_truncation_of_the_manifest_is_rejected():
    data = manifest("good")
    k = key()
    end = len(data.rstrip())       # a trailing newline is only whitespace
    for n in range(end):
        raises(ValueError, verify_manifest, data[:n], k)


def test_garbage_manifest_is_rejected():
    k = key()
    good = manifest("good")
    for data in (b"", b"\x00" * 64, b"null", b"[]", b"{}", b'"body"', b"\xff\xfe{}",
                 b'{"body":"x"}', b'{"sig":"00"}', good + b"x", b"{" * 5000,
                 b'{"body":1,"sig":"00"}', b'{"body":"x","sig":1}',
                 good.replace(b'"sig"', b'"sig","extra":1,"x"', 1)):
        raises(ValueError, verify_manifest, data, k)


def test_oversize_manifest_is_rejected_before_parsing():
    msg = message(ValueError, verify_manifest, b" " * (ota_verify.MAX_MANIFEST_BYTES + 1), key())
    assert "too large" in msg, msg


def test_flipped_signature_bit_is_rejected():
    data = manifest("good")
    i = data.index(b'"sig":"') + 7 + 300
    flipped = b"0" if data[i:i + 1] != b"0" else b"1"
    msg = message(ValueError, verify_manifest, data[:i] + flipped + data[i + 1:], key())
    assert "signature" in msg, msg


def test_malformed_or_out_of_range_signature_is_rejected():
    n, e = key()
    body = b"x"
    for sig in ("", "00", "0" * 511, "0" * 513, "F" * 512, "g" * 512, "f" * 512,
                "%0512x" % n, "0" * 512):
        raises(ValueError, ota_verify.verify_signature, body, sig, (n, e))


def test_signed_body_with_bad_entries_is_rejected():
    # These are correctly signed: only the body's validation stands between
    # them and the file system.
    import json
    names = json.loads(read("index.json"))["bad_bodies"]
    assert len(names) >= 30
    k = key()
    for name in names:
        msg = message(ValueError, verify_manifest, read("bad_bodies/" + name + ".json"), k)
        assert "signature" not in msg, name + ": " + msg


# --- downgrades ---------------------------------------------------------------

def test_downgrade_bundle_is_refused_by_is_upgrade():
    body = verify_manifest(manifest("downgrade"), key())   # authentic, but older
    assert body["version"] == "0.0.1"
    assert not is_upgrade(body["version"], CURRENT)


def test_same_version_is_refused_by_is_upgrade():
    assert not is_upgrade("9.9.1", "9.9.1")
    assert not is_upgrade(CURRENT, CURRENT)
    assert not is_upgrade((1, 0, 0), (1, 0, 0))


def test_versions_compare_as_numbers_not_as_text():
    assert is_upgrade("9.10.0", "9.9.1")
    assert is_upgrade("10.0.0", "9.99.99")
    assert is_upgrade("1.0.1", "1.0.0")
    assert not is_upgrade("1.9.9", "1.10.0")
    assert not is_upgrade("0.9.0", "1.0.0")


def test_malformed_versions_are_refused():
    assert parse_version("0.0.0") == (0, 0, 0)
    assert parse_version("12.345.6") == (12, 345, 6)
    for bad in ("", "1", "1.2", "1.2.3.4", "v1.2.3", "1.02.3", "01.2.3", "1.2.3-rc1",
                "1..3", "1.2.", " 1.2.3", "1.2.3 ", "-1.2.3", "1.2.+3", "1234567.0.0",
                "1.2.3\n", "a.b.c", None, 123, (1, 2, 3)):
        raises(ValueError, parse_version, bad)
    raises(ValueError, is_upgrade, "1.2", "1.0.0")
    raises(ValueError, is_upgrade, "1.2.3", "garbage")


def test_unsafe_paths_are_refused():
    for good in ("boot.py", "firmware/core/charger.py", "lib/umqtt/simple.py", "a-b_c.d", "x" * 64):
        ota_verify.check_path(good)
    for bad in ("", "/boot.py", "../boot.py", "firmware/../boot.py", "a/..", "..", "a..b",
                "./boot.py", "a/./b", "a//b", "a/", "x" * 65, "a b", "a\\b", "a\x00b",
                "caf\u00e9.py", "a:b", "~/x", None, 5):
        raises(ValueError, ota_verify.check_path, bad)


# --- streaming file checks ------------------------------------------------------

def _sha(data):
    import binascii
    import hashlib
    return binascii.hexlify(hashlib.sha256(data).digest()).decode()


def test_oversize_file_stream_fails_at_the_first_extra_byte():
    data = b"0123456789"
    check = FileCheck(len(data), _sha(data))
    check.update(data[:6])
    check.update(data[6:])
    msg = message(ValueError, check.update, b"!")
    assert "more than" in msg, msg
    # A huge stream is cut off at the chunk that crosses the size: the
    # downloader never needs to store more than the manifest promised.
    check = FileCheck(1000, _sha(b"a" * 1000))
    fed = 0
    try:
        for _ in range(1000000):
            check.update(b"a" * 64)
            fed += 64
        raise AssertionError("never stopped")
    except ValueError:
        pass
    assert fed == 960


def test_short_or_altered_file_fails_at_finish():
    data = b"charger firmware"
    check = FileCheck(len(data), _sha(data))
    check.update(data[:-1])
    assert "received" in message(ValueError, check.finish)
    check = FileCheck(len(data), _sha(data))
    check.update(data[:-1] + b"X")
    assert "SHA-256" in message(ValueError, check.finish)
    check = FileCheck(0, _sha(b""))
    check.finish()


def test_file_check_is_spent_after_a_failure_or_finish():
    data = b"abc"
    check = FileCheck(3, _sha(data))
    check.update(data)
    check.finish()
    raises(ValueError, check.finish)
    raises(ValueError, check.update, b"")
    check = FileCheck(3, _sha(data))
    raises(ValueError, check.update, b"abcd")
    raises(ValueError, check.finish)


def test_file_check_refuses_a_bad_manifest_entry():
    for size, sha in ((-1, "ab" * 32), (1000001, "ab" * 32), (True, "ab" * 32), ("3", "ab" * 32),
                      (3, "AB" * 32), (3, "ab" * 31), (3, None)):
        raises(ValueError, FileCheck, size, sha)


# --- the stored public key --------------------------------------------------------

def test_bad_public_key_files_are_refused():
    import json
    good = json.loads(read("ota_key.json"))
    n = good["n"]
    assert load_key(read("ota_key.json"))[1] == 65537
    bad = [
        "", "garbage", "null", "[]", "{}", '{"n": "%s"}' % n, '{"e": 65537}',
        '{"n": "%s", "e": 3}' % n, '{"n": "%s", "e": true}' % n,
        '{"n": "%s", "e": 65537.0}' % n, '{"n": "%s", "e": "65537"}' % n,
        '{"n": "%s", "e": 65537}' % n.upper(), '{"n": "%s", "e": 65537}' % ("f" * 256),
        '{"n": "%s", "e": 65537}' % ("7" + "f" * 511), '{"n": "%s", "e": 65537}' % ("f" * 511 + "e"),
        '{"n": "%s", "e": 65537}' % ("f" * 513), '{"n": 12345, "e": 65537}',
        '{"n": "%s", "e": 65537, "kid": 1}' % n, '{"n": "%s", "e": 65537}' % ("0x" + n[2:]),
        " " * 5000,
    ]
    for text in bad:
        raises(ValueError, load_key, text)
    raises(ValueError, verify_manifest, manifest("good"), (int(n, 16), 3))
    raises(ValueError, verify_manifest, manifest("good"), [int(n, 16), 65537])
