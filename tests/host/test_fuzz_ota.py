"""Property-based fuzzing (hypothesis) of signed OTA manifests and the
install that follows them (DESIGN.md §4: verified before anything is
switched; issue 6).

Manifests are signed here with a throwaway key, so that hostile bodies
(path traversal, absolute paths, missing or extra fields, wrong sizes and
hashes) get past the signature and meet the body's own checks, and some are
then edited, truncated or re-signed wrongly. The install gets files that are
short, long or altered. Properties:

- verify_manifest raises ValueError or returns a body that an independent
  reading of the format accepts (safe relative paths only);
- a refused install switches nothing: no ``ota.json``, nothing written
  outside ``ota/<slot>/``, the next boot runs the factory firmware;
- a finished install holds exactly the files the manifest lists.

CPython only; the corpus (tests/corpus/ota.jsonl) replays on both runtimes.
"""
import hashlib
import json
import os
import re

from cryptography.hazmat.primitives.asymmetric import rsa
from fakes import CutFs
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from evse_tools import ota as ota_tool
from firmware.ota import update as ota
from firmware.ota import verify as ota_verify
from firmware.ota import boot as otaboot

FUZZ = hsettings(max_examples=int(os.environ.get("EVSE_FUZZ_EXAMPLES", "300")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY = ota_verify.load_key(ota_tool.public_key_json(_PRIVATE.public_key()))
CURRENT = "1.0.0"

paths = st.sampled_from([
    "firmware/core/charger.py", "firmware/new.py", "firmware/sub/x.mpy", "data/blob.bin", "boot.py",
    "../boot.py", "/boot.py", "firmware/../../boot.py", "firmware/..", "./firmware/a.py",
    "firmware//a.py", "firmware/", "firmware\\a.py", "firmware/a b.py", "", "firmware/" + "a" * 60,
    "firmware/\u00e9.py", "firmware/a.py\u0000", "~/x", "C:/x", "firmware/a.py/b"]) | st.text(max_size=12)
contents = st.binary(max_size=40)


@st.composite
def bundles(draw):
    """(manifest bytes, {path: content served}, the body as signed)."""
    clean = draw(st.booleans())      # half are good bundles, to reach the install
    good_paths = st.sampled_from(["firmware/core/charger.py", "firmware/new.py", "firmware/sub/x.mpy", "data/b.bin"])
    files = draw(st.lists(st.tuples(good_paths if clean else paths, contents), min_size=clean, max_size=4,
                          unique_by=lambda f: f[0]))
    entries, served = [], {}
    for path, data in files:
        e = {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        mess = draw(st.integers(0, 12)) if not clean else 12
        if mess == 0:
            e["size"] = draw(st.sampled_from([-1, 1000001, 1.0, True, "1", None, len(data) + 1]))
        elif mess == 1:
            e["sha256"] = draw(st.sampled_from([e["sha256"].upper(), e["sha256"][:-1], "", 5, "g" * 64]))
        elif mess == 2:
            del e[draw(st.sampled_from(["path", "size", "sha256"]))]
        elif mess == 3:
            e["mode"] = 493
        entries.append(e)
        got = draw(st.sampled_from(["exact"] * 6 + ["short", "long", "flip", "none"])) if not clean else "exact"
        served[path] = {"exact": data, "short": data[:-1], "long": data + b"!", "none": b"",
                        "flip": bytes([data[0] ^ 1]) + data[1:] if data else b"x"}[got]
    if clean or draw(st.booleans()):
        entries.sort(key=lambda e: str(e.get("path")))
    body = {"v": draw(st.sampled_from([1, 1, 1, 2, True, "1"])) if not clean else 1,
            "version": draw(st.sampled_from(["9.9.9", "1.0.1", "1.0.0", "0.9.0", "1.2", "01.0.0",
                                             "1.0.0-rc1", "1000000.0.0", 9])) if not clean else "9.9.9",
            "files": entries}
    if not clean and draw(st.integers(0, 8)) == 0:
        body["install_to"] = "/"
    if not clean and draw(st.integers(0, 8)) == 0:
        del body[draw(st.sampled_from(["v", "version", "files"]))]
    text = json.dumps(body, separators=(",", ":"))
    signer = _OTHER if not clean and draw(st.integers(0, 10)) == 0 else _PRIVATE
    manifest = signed = ota_tool.sign_body(signer, text)
    tamper = draw(st.integers(0, 10)) if not clean else 10
    if tamper == 0:
        manifest = manifest[:draw(st.integers(0, len(manifest)))]
    elif tamper == 1 and "9.9.9" in text:
        outer = json.loads(manifest)
        outer["body"] = outer["body"].replace("9.9.9", "9.9.8")
        manifest = json.dumps(outer).encode()
    return manifest, served, text, signer is _PRIVATE and manifest == signed


_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
_PATH = re.compile(r"[A-Za-z0-9_./-]{1,64}")


def _safe_path(p):
    return (type(p) is str and _PATH.fullmatch(p) is not None and not p.startswith("/")
            and ".." not in p and all(seg not in ("", ".") for seg in p.split("/")))


def reference_body_ok(text):
    """An independent reading of the signed body format (ota_verify's docstring)."""
    body = json.loads(text)
    if type(body) is not dict or set(body) != {"v", "version", "files"}:
        return False
    if type(body["v"]) is not int or body["v"] != 1:
        return False
    if type(body["version"]) is not str or not _VERSION.fullmatch(body["version"]):
        return False
    files = body["files"]
    if type(files) is not list or not files:
        return False
    seen = []
    for e in files:
        if type(e) is not dict or set(e) != {"path", "size", "sha256"} or not _safe_path(e["path"]):
            return False
        if type(e["size"]) is not int or not 0 <= e["size"] <= 1000000:
            return False
        if type(e["sha256"]) is not str or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]):
            return False
        seen.append(e["path"])
    if seen != sorted(seen) or len(set(seen)) != len(seen):
        return False
    return not any(q.startswith(p + "/") for p in seen for q in seen)


@FUZZ
@given(bundle=bundles())
def test_only_a_signed_well_formed_manifest_with_safe_paths_is_accepted(bundle):
    manifest, _served, text, signed_here = bundle
    try:
        body = ota_verify.verify_manifest(manifest, KEY)
    except ValueError:
        assert not (signed_here and reference_body_ok(text))
        event("refused")
        return
    event("accepted")
    assert signed_here and reference_body_ok(text)
    assert body == json.loads(text)
    for e in body["files"]:
        assert _safe_path(e["path"])


@FUZZ
@given(bundle=bundles(), running=st.sampled_from(["factory", "a", "b"]))
def test_a_refused_install_switches_nothing_and_writes_only_inside_the_idle_slot(bundle, running):
    manifest, served, text, signed_here = bundle
    fs = CutFs()
    if running != "factory":
        fs.files["ota/%s/complete" % running] = CURRENT
        fs.files["ota.json"] = json.dumps({"active": running, "previous": "factory", "pending": False,
                                           "boots": 0, "version": CURRENT, "rolled_back": None})
    before = dict(fs.files)
    idle = "b" if running == "a" else "a"

    def fetch(path, start, end):
        return served.get(path, b"")[start:end + 1]

    try:
        version = ota.install("", manifest, fetch, CURRENT, KEY, fs)
    except (ValueError, OSError):
        assert fs.files.get("ota.json") == before.get("ota.json")        # nothing switched
        for name in fs.files:
            assert name in before or name.startswith("ota/%s/" % idle), name
        assert "ota/%s/complete" % idle not in fs.files
        assert otaboot.select("", fs)[0] == running
        event("install refused")
        return
    event("installed")
    body = json.loads(text)
    assert signed_here and reference_body_ok(text) and ota_verify.is_upgrade(body["version"], CURRENT)
    assert version == body["version"]
    for e in body["files"]:
        if e["path"].startswith("firmware/"):
            got = fs.files["ota/%s/%s" % (idle, e["path"])]
            assert hashlib.sha256(got).hexdigest() == e["sha256"] and len(got) == e["size"]
        else:
            assert "ota/%s/%s" % (idle, e["path"]) not in fs.files     # firmware files only
    assert otaboot.read_state("", fs)["active"] == idle and otaboot.select("", fs)[0] == idle
