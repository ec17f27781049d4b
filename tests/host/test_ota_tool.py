"""The OTA bundle tool (evse_tools.ota, `evse-ota`): keys, build and sign,
verify, and the HTTP server the charger downloads from (issue 5).

The charger-side checks themselves are tested on both runtimes in
tests/fw/test_ota_verify.py; here the tool's own refusals and file handling.
"""
import hashlib
import http.client
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from evse_tools import ota
from firmware.ota import verify as ota_verify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    priv, pub = ota.keygen(out)
    return priv, pub


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    (src / "firmware").mkdir(parents=True)
    (src / "firmware" / "app.py").write_bytes(b"X = 1\n" * 100)
    (src / "boot.py").write_bytes(b"# boot\n")
    return {"firmware/app.py": src / "firmware" / "app.py", "boot.py": src / "boot.py"}


def run_cli(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr), argparse's exits included."""
    try:
        rc = ota.main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# --- keygen ---------------------------------------------------------------------

def test_keygen_private_key_is_0600_pkcs8_and_public_key_is_device_json(keys):
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    pem = priv.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")      # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    doc = json.loads(pub.read_text())
    assert set(doc) == {"n", "e"} and doc["e"] == 65537 and len(doc["n"]) == 512
    assert int(doc["n"], 16) == key.public_key().public_numbers().n
    assert ota_verify.load_key(pub.read_text()) == (int(doc["n"], 16), 65537)


def test_keygen_private_key_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        priv, _ = ota.keygen(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_an_existing_key(keys, capsys):
    priv, _ = keys
    before = priv.read_bytes()
    rc, _, err = run_cli(capsys, "keygen", "--out", str(priv.parent))
    assert rc == 1 and "refusing to overwrite" in err
    assert priv.read_bytes() == before


# --- build and verify --------------------------------------------------------------

def test_build_then_verify_round_trip(keys, sources, tmp_path):
    priv, pub = keys
    out = ota.build(priv, "1.4.2", sources, tmp_path / "bundle")
    body = ota.verify(out, pub)
    assert body["version"] == "1.4.2"
    # firmware/*.py ships as the bytecode the image loads; the rest as it is.
    assert [e["path"] for e in body["files"]] == ["boot.py", "firmware/app.mpy"]
    for e in body["files"]:
        data = (out / "files" / e["path"]).read_bytes()
        if e["path"].endswith(".mpy"):     # mpy-cross v1.28.0: magic "M", version 6
            assert data[:2] == b"M\x06" and sources["firmware/app.py"].read_bytes() not in data
        else:
            assert data == sources[e["path"]].read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    # The manifest is exactly the documented format, and the signature checks
    # with a second implementation (cryptography) too.
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert set(manifest) == {"body", "sig"} and len(manifest["sig"]) == 512
    assert manifest["body"] == json.dumps(body, separators=(",", ":"))
    assert manifest["body"].startswith('{"v":1,"version":"1.4.2","files":[{"path":"boot.py",')
    key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    key.public_key().verify(bytes.fromhex(manifest["sig"]), manifest["body"].encode(),
                            padding.PKCS1v15(), hashes.SHA256())


def test_build_default_files_are_the_device_files_without_the_simulator(keys, tmp_path):
    priv, pub = keys
    out = ota.build(priv, "0.9.0", None, tmp_path / "b")
    paths = [e["path"] for e in ota.verify(out, pub)["files"]]
    assert "boot.py" not in paths and "main.py" not in paths   # they hold the rollback
    assert "firmware/core/charger.mpy" in paths and "firmware/ota/verify.mpy" in paths
    assert not [p for p in paths if p.endswith(".py")]        # never source
    assert not [p for p in paths if "simboard" in p]
    expected = {p.relative_to(REPO).with_suffix(".mpy").as_posix()
                for p in (REPO / "firmware").rglob("*.py")}
    assert set(paths) == expected


def test_cli_build_and_verify(keys, sources, tmp_path, capsys, monkeypatch):
    priv, pub = keys
    monkeypatch.chdir(sources["boot.py"].parent)
    rc, out, err = run_cli(capsys, "build", "--key", str(priv), "--version", "2.0.0",
                           "--out", str(tmp_path / "b"), "--file", "boot.py",
                           "--file", "firmware/app.py", "--file", f"extra/x.py={sources['boot.py']}")
    assert rc == 0, err
    assert "version 2.0.0, 3 files" in out
    rc, out, err = run_cli(capsys, "verify", "--bundle", str(tmp_path / "b"), "--pubkey", str(pub))
    assert rc == 0, err
    assert out.startswith("OK:")


def test_verify_refuses_a_tampered_file(keys, sources, tmp_path, capsys):
    priv, pub = keys
    out = ota.build(priv, "1.0.1", sources, tmp_path / "b")
    target = out / "files" / "firmware" / "app.mpy"
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    rc, _, err = run_cli(capsys, "verify", "--bundle", str(out), "--pubkey", str(pub))
    assert rc == 1 and "SHA-256" in err


def test_verify_refuses_an_unlisted_extra_file(keys, sources, tmp_path):
    priv, pub = keys
    out = ota.build(priv, "1.0.1", sources, tmp_path / "b")
    (out / "files" / "evil.py").write_text("import os\n")
    with pytest.raises(ota.OtaError, match="not in its manifest"):
        ota.verify(out, pub)


def test_verify_refuses_a_bundle_signed_by_another_key(keys, sources, tmp_path, capsys):
    _, pub = keys
    other, _ = ota.keygen(tmp_path / "other")
    out = ota.build(other, "1.0.1", sources, tmp_path / "b")
    rc, _, err = run_cli(capsys, "verify", "--bundle", str(out), "--pubkey", str(pub))
    assert rc == 1 and "signature" in err


def test_path_with_dotdot_is_refused(keys, sources, tmp_path, capsys):
    priv, _ = keys
    for bad in ("../boot.py", "firmware/../../etc/x", "/boot.py", "a//b", "a b.py", "x" * 65):
        with pytest.raises(ValueError):
            ota.build(priv, "1.0.0", {bad: sources["boot.py"]}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    rc, _, err = run_cli(capsys, "build", "--key", str(priv), "--version", "1.0.0",
                         "--out", str(tmp_path / "b"), "--file", f"../boot.py={sources['boot.py']}")
    assert rc == 2 and ".." in err
    assert not (tmp_path / "b").exists()


def test_bad_version_is_refused(keys, sources, tmp_path, capsys):
    priv, _ = keys
    for bad in ("1.2", "1.2.3.4", "v1.2.3", "1.02.3", "1.2.3-rc1", "", "a.b.c"):
        with pytest.raises(ValueError):
            ota.build(priv, bad, sources, tmp_path / "b")
        rc, _, err = run_cli(capsys, "build", "--key", str(priv), "--version", bad,
                             "--out", str(tmp_path / "b"))
        assert rc == 2 and "MAJOR.MINOR.PATCH" in err, (bad, err)
    assert not (tmp_path / "b").exists()


def test_build_refuses_a_non_empty_output_folder_and_leaves_it_alone(keys, sources, tmp_path, capsys):
    priv, _ = keys
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "build", "--key", str(priv), "--version", "1.0.0",
                         "--out", str(out))
    assert rc == 1 and "not an empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_build_refuses_missing_files_bad_keys_and_oversize_manifests(keys, sources, tmp_path, capsys):
    priv, _ = keys
    with pytest.raises(ota.OtaError, match="cannot read"):
        ota.build(priv, "1.0.0", {"a.py": tmp_path / "missing.py"}, tmp_path / "b1")
    rc, _, err = run_cli(capsys, "build", "--key", str(tmp_path / "nokey.pem"),
                         "--version", "1.0.0", "--out", str(tmp_path / "b2"))
    assert rc == 1 and "signing key" in err
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = tmp_path / "weak.pem"
    weak.write_bytes(small.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(ota.OtaError, match="RSA-2048"):
        ota.build(weak, "1.0.0", sources, tmp_path / "b3")
    many = {f"firmware/m{i:03d}_{'x' * 40}.py": sources["boot.py"] for i in range(120)}
    with pytest.raises(ota.OtaError, match="16384"):
        ota.build(priv, "1.0.0", many, tmp_path / "b4")
    assert not any(tmp_path.glob("b*"))


def test_cli_without_arguments_or_with_unknown_ones_exits_2(capsys):
    assert run_cli(capsys)[0] == 2
    assert run_cli(capsys, "sign")[0] == 2
    assert run_cli(capsys, "serve", "--root", "/tmp", "--port", "99999")[0] == 2


def test_cli_as_a_process_prints_no_traceback_for_user_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evse_tools.ota", "verify", "--bundle",
                           str(tmp_path), "--pubkey", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "evse-ota: error:" in proc.stderr and "Traceback" not in proc.stderr


# --- serve ----------------------------------------------------------------------

@pytest.fixture
def served(keys, sources, tmp_path):
    priv, _ = keys
    root = tmp_path / "root"
    ota.build(priv, "3.0.0", sources, root / "3.0.0")
    (tmp_path / "secret.txt").write_text("outside the root")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    server, url = ota.serve(root)
    host, port = server.server_address[:2]
    yield root, url, host, port
    server.shutdown()
    server.server_close()


def get(host, port, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_serve_returns_bundle_files(served):
    root, url, host, port = served
    assert url == f"http://127.0.0.1:{port}/"
    status, headers, data = get(host, port, "/3.0.0/manifest.json")
    assert status == 200 and data == (root / "3.0.0" / "manifest.json").read_bytes()
    assert headers["Accept-Ranges"] == "bytes"
    status, _, data = get(host, port, "/3.0.0/files/firmware/app.mpy")
    assert status == 200 and data == (root / "3.0.0" / "files" / "firmware" / "app.mpy").read_bytes()


def test_serve_honours_range_requests_for_chunked_download(served):
    root, _, host, port = served
    full = (root / "3.0.0" / "files" / "firmware" / "app.mpy").read_bytes()
    size = len(full)
    status, headers, data = get(host, port, "/3.0.0/files/firmware/app.mpy",
                                {"Range": "bytes=10-109"})
    assert status == 206 and data == full[10:110]
    assert headers["Content-Range"] == f"bytes 10-109/{size}"
    assert headers["Content-Length"] == "100"
    # Chunks of 128 bytes, as the charger fetches them, rebuild the file.
    got = b""
    while len(got) < size:
        status, _, data = get(host, port, "/3.0.0/files/firmware/app.mpy",
                              {"Range": f"bytes={len(got)}-{len(got) + 127}"})
        assert status == 206 and data
        got += data
    assert got == full
    assert get(host, port, "/3.0.0/files/firmware/app.mpy",
               {"Range": f"bytes={size - 5}-"})[2] == full[-5:]
    assert get(host, port, "/3.0.0/files/firmware/app.mpy", {"Range": "bytes=-7"})[2] == full[-7:]
    assert get(host, port, "/3.0.0/files/firmware/app.mpy",
               {"Range": f"bytes=0-{size + 1000}"})[2] == full
    status, headers, _ = get(host, port, "/3.0.0/files/firmware/app.mpy",
                             {"Range": f"bytes={size}-{size + 10}"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"


def test_serve_gives_404_outside_the_root_and_for_folders(served):
    _, _, host, port = served
    for path in ("/../secret.txt", "/3.0.0/../../secret.txt", "/%2e%2e/secret.txt",
                 "/3.0.0/%2e%2e/%2e%2e/secret.txt", "/link.txt", "/", "/3.0.0/",
                 "/3.0.0/files", "/missing.json", "//etc/passwd", "/3.0.0/manifest.json%00"):
        assert get(host, port, path)[0] == 404, path


def test_serve_is_get_only(served):
    _, _, host, port = served
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        status, headers, _ = get(host, port, "/3.0.0/manifest.json", method=method)
        assert status == 405 and headers["Allow"] == "GET", method
