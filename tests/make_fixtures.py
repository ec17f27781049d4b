"""Make the OTA test fixtures: ``python tests/make_fixtures.py OUT_DIR``.

CPython only (it signs with ``evse_tools.ota``, i.e. the ``cryptography``
package). The firmware tests in ``tests/fw/test_ota_verify.py`` read the result
on both runtimes through the environment variable ``EVSE_FIXTURES=OUT_DIR``.

Everything goes under OUT_DIR, which must be outside the repository or under
its ignored ``build/`` folder. Two throwaway key pairs are made for each run;
their private halves are deleted once the bundles are signed, so no private
key outlives this script.

Layout of OUT_DIR:
    ota_key.json         public key the bundles are checked against
    other_key.json       public key of a second, unrelated pair
    good/                version 9.9.1, two small files, correctly signed
    tampered/            good, with one file's content changed (same size)
    wrong_key/           the good files, signed by the other key
    truncated/           good's manifest cut in half
    downgrade/           version 0.0.1, correctly signed
    edited/              good's manifest with the body's version changed after signing
    bad_bodies/NAME.json manifests correctly signed by the key whose body is invalid
    index.json           the names above and what each must do
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.append(str(REPO / "tools"))

from evse_tools import ota  # noqa: E402

GOOD_VERSION = "9.9.1"
DOWNGRADE_VERSION = "0.0.1"
FILES = {
    "firmware/ota_hello.py": b"# OTA fixture file\nGREETING = 'hello from 9.9.1'\n",
    "data/blob.bin": bytes(range(256)) * 3 + b"\x00tail",
}

_H = "ab" * 32


def _entry(path: str, size: object = 1, sha: str = _H) -> dict:
    return {"path": path, "size": size, "sha256": sha}


def _body(files: list, version: str = "1.2.3", v: int = 1, **extra) -> str:
    body = {"v": v, "version": version, "files": files}
    body.update(extra)
    return json.dumps(body, separators=(",", ":"))


# Each is signed by the good key, so only the body's validation can refuse it.
BAD_BODIES = {
    "dotdot_path": _body([_entry("../boot.py")]),
    "dotdot_inside": _body([_entry("firmware/../../x.py")]),
    "absolute_path": _body([_entry("/boot.py")]),
    "backslash_path": _body([_entry("firmware\\app.py")]),
    "empty_segment": _body([_entry("firmware//app.py")]),
    "dot_segment": _body([_entry("./boot.py")]),
    "trailing_slash": _body([_entry("firmware/")]),
    "long_path": _body([_entry("a" * 65)]),
    "empty_path": _body([_entry("")]),
    "space_path": _body([_entry("boot .py")]),
    "duplicate_path": _body([_entry("a.py"), _entry("a.py")]),
    "unsorted": _body([_entry("b.py"), _entry("a.py")]),
    "file_and_folder": _body([_entry("lib"), _entry("lib/x.py")]),
    "negative_size": _body([_entry("a.py", size=-1)]),
    "huge_size": _body([_entry("a.py", size=1000001)]),
    "float_size": _body([_entry("a.py", size=1.0)]),
    "bool_size": _body([_entry("a.py", size=True)]),
    "string_size": _body([_entry("a.py", size="1")]),
    "upper_sha": _body([_entry("a.py", sha="AB" * 32)]),
    "short_sha": _body([_entry("a.py", sha="ab" * 31)]),
    "extra_entry_field": json.dumps({"v": 1, "version": "1.2.3", "files": [
        {"path": "a.py", "size": 1, "sha256": _H, "mode": 493}]}, separators=(",", ":")),
    "missing_sha": json.dumps({"v": 1, "version": "1.2.3", "files": [
        {"path": "a.py", "size": 1}]}, separators=(",", ":")),
    "v2": _body([_entry("a.py")], v=2),
    "v_true": _body([_entry("a.py")], v=True),
    "version_two_parts": _body([_entry("a.py")], version="1.2"),
    "version_leading_zero": _body([_entry("a.py")], version="1.02.3"),
    "version_suffix": _body([_entry("a.py")], version="1.2.3-rc1"),
    "version_number": json.dumps({"v": 1, "version": 123, "files": [_entry("a.py")]},
                                 separators=(",", ":")),
    "no_files": _body([]),
    "files_not_list": json.dumps({"v": 1, "version": "1.2.3", "files": {"a.py": 1}},
                                 separators=(",", ":")),
    "extra_body_field": _body([_entry("a.py")], install_to="/"),
    "body_not_json": "{\"v\":1,",
    "body_is_list": "[1,2,3]",
}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def make(out_dir: str | Path) -> Path:
    """Create the fixtures in ``out_dir`` (emptied first); return its path."""
    out = Path(out_dir).resolve()
    if _inside(out, REPO) and not _inside(out, REPO / "build"):
        raise SystemExit(f"make_fixtures: {out} is inside the repository; use a folder "
                         f"outside it or under {REPO / 'build'}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keys = out / "keys"
    priv, pub = ota.keygen(keys / "good")
    other_priv, other_pub = ota.keygen(keys / "other")
    shutil.copy(pub, out / "ota_key.json")
    shutil.copy(other_pub, out / "other_key.json")

    src = out / "src"
    files = {}
    for path, data in FILES.items():
        p = src / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[path] = p

    good = ota.build(priv, GOOD_VERSION, files, out / "good")
    ota.build(other_priv, GOOD_VERSION, files, out / "wrong_key")
    ota.build(priv, DOWNGRADE_VERSION, files, out / "downgrade")

    tampered = out / "tampered"
    shutil.copytree(good, tampered)
    victim = tampered / "files" / "firmware/ota_hello.mpy"   # built from ota_hello.py
    data = victim.read_bytes()
    victim.write_bytes(data.replace(b"hello", b"HACKD"))    # same size, other bytes

    truncated = out / "truncated"
    shutil.copytree(good, truncated)
    manifest = (good / "manifest.json").read_bytes()
    (truncated / "manifest.json").write_bytes(manifest[:len(manifest) // 2])

    edited = out / "edited"
    shutil.copytree(good, edited)
    outer = json.loads(manifest)
    assert f'"version":"{GOOD_VERSION}"' in outer["body"]
    outer["body"] = outer["body"].replace(f'"version":"{GOOD_VERSION}"', '"version":"9.9.2"')
    (edited / "manifest.json").write_text(json.dumps(outer, separators=(",", ":")))

    bad = out / "bad_bodies"
    bad.mkdir()
    key = ota.load_private_key(priv)
    for name, text in BAD_BODIES.items():
        (bad / f"{name}.json").write_bytes(ota.sign_body(key, text))

    shutil.rmtree(keys)       # no private key outlives the run
    shutil.rmtree(src)
    index = {
        "good_version": GOOD_VERSION,
        "downgrade_version": DOWNGRADE_VERSION,
        "files": {p: len(d) for p, d in FILES.items()},
        "bundles": ["good", "tampered", "wrong_key", "truncated", "downgrade", "edited"],
        "bad_bodies": sorted(BAD_BODIES),
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/make_fixtures.py OUT_DIR", file=sys.stderr)
        return 2
    out = make(argv[0])
    print(f"OTA fixtures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
