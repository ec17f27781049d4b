"""Signed OTA bundles for the charger: key generation, build and sign, check, serve.

    evse-ota keygen --out DIR
    evse-ota build  --key PEM --version X.Y.Z --out DIR [--file PATH ...]
    evse-ota verify --bundle DIR --pubkey JSON
    evse-ota serve  --root DIR [--host H] [--port N]

A bundle is a directory with ``manifest.json`` and ``files/<path>``. The
manifest is ``{"body": "<text>", "sig": "<hex>"}``; the body is compact ASCII
JSON ``{"v":1,"version":"X.Y.Z","files":[{"path","size","sha256"},...]}``
sorted by path, and ``sig`` is its RSA PKCS#1 v1.5 SHA-256 signature (RFC 8017
§8.2) with the server's 2048-bit key, as 512 hex digits. The charger checks it
with :mod:`firmware.ota.verify` (the same module :func:`verify` uses here)
against the public key it stores as ``/ota_key.json``.

Exit status: 0 done, 1 refused (bad bundle, bad key, I/O error), 2 bad
arguments (including a malformed version or file path).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:          # firmware/ is not an installed package
    sys.path.append(str(REPO))

from firmware.ota import verify as ota_verify  # noqa: E402  (after the path fix above)
from evse_tools.device_runtime import compile_mpy  # noqa: E402

PRIVATE_NAME = "ota_private.pem"
PUBLIC_NAME = "ota_key.json"
MANIFEST_NAME = "manifest.json"
FILES_DIR = "files"
_CHUNK = 4096


class OtaError(Exception):
    """A refused request: a user error, reported without a traceback (exit 1)."""


# --- keys -----------------------------------------------------------------

def keygen(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Create the server's OTA signing key pair in ``out_dir``.

    Writes ``ota_private.pem`` (RSA-2048, e = 65537, PKCS#8 PEM, unencrypted,
    mode 0600) and ``ota_key.json`` (``{"n": "<hex>", "e": 65537}``, which is
    copied to the charger as ``/ota_key.json``). Returns both paths.

    Keep the private key off the repository and off the chargers: whoever has
    it can push firmware to every charger that trusts the public half. Store
    it with the server's secrets and back it up; losing it means re-keying
    every charger by hand. Refuses to overwrite an existing private key.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if priv_path.exists() or pub_path.exists():
        raise OtaError(f"{out} already holds an OTA key; refusing to overwrite it")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)      # whatever the umask
        os.write(fd, pem)
    finally:
        os.close(fd)
    pub_path.write_text(public_key_json(key.public_key()))
    return priv_path, pub_path


def public_key_json(public_key: rsa.RSAPublicKey) -> str:
    """The device's ``ota_key.json`` text for ``public_key``."""
    nums = public_key.public_numbers()
    return json.dumps({"n": format(nums.n, "0512x"), "e": nums.e}) + "\n"


def load_private_key(path: str | os.PathLike) -> rsa.RSAPrivateKey:
    """Load an unencrypted PEM RSA-2048 (e = 65537) private key; OtaError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OtaError(f"cannot read the signing key: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise OtaError(f"{path}: encrypted private keys are not supported") from None
    except ValueError as exc:
        raise OtaError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 2048 \
            or key.public_key().public_numbers().e != 65537:
        raise OtaError(f"{path}: the OTA key must be RSA-2048 with e = 65537")
    return key


def load_public_key(path: str | os.PathLike) -> tuple[int, int]:
    """Read an ``ota_key.json`` and parse it as the charger does; OtaError otherwise."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise OtaError(f"cannot read the public key: {exc}") from None
    try:
        return ota_verify.load_key(text)
    except ValueError as exc:
        raise OtaError(f"{path}: {exc}") from None


# --- build ----------------------------------------------------------------

def default_files() -> dict[str, Path]:
    """The firmware files of this repository: every ``.py`` of the
    ``firmware`` package, subpackages included (the simulated board lives
    outside it, in ``tools/simboard``). ``boot.py`` and ``main.py`` hold the
    rollback and are never updated over the air, so they are not shipped."""
    return {p.relative_to(REPO).as_posix(): p for p in sorted((REPO / "firmware").rglob("*.py"))}


def sign_body(key: rsa.RSAPrivateKey, body_text: str) -> bytes:
    """Sign ``body_text`` (ASCII) and return the manifest bytes
    ``{"body": ..., "sig": ...}``. No check of the body's content: build()
    makes valid bodies; this is also how test fixtures make invalid ones."""
    sig = key.sign(body_text.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return (json.dumps({"body": body_text, "sig": sig.hex()}, separators=(",", ":"))
            + "\n").encode("ascii")


def body_text(version: str, entries: list[dict]) -> str:
    """The compact JSON body for ``version`` and file ``entries`` (sorted here)."""
    entries = sorted(entries, key=lambda e: e["path"])
    return json.dumps({"v": ota_verify.MANIFEST_V, "version": version, "files": entries},
                      separators=(",", ":"), ensure_ascii=True)


def build(private_key_path: str | os.PathLike, version: str,
          files: dict[str, Path] | None, out_dir: str | os.PathLike) -> Path:
    """Build and sign a bundle directory ``out_dir``; return its path.

    ``files`` maps device paths (``firmware/core/charger.py``) to source files; None
    means :func:`default_files`. A ``firmware/*.py`` file is shipped as
    ``.mpy`` compiled by mpy-cross v1.28.0 (``firmware/core/charger.py`` becomes
    ``firmware/core/charger.mpy``), the bytecode the charger image loads, with
    ``firmware/core/charger.py`` kept as its name in tracebacks; every other file is
    shipped as it is (a charger installs only ``firmware/``). Refuses (ValueError for a bad version or path,
    OtaError otherwise) a malformed version, unsafe paths, missing or oversize
    files, a manifest over the device's 16 KB, a bad key and an existing
    non-empty ``out_dir``. The bundle appears whole or not at all: it is built
    in a temporary sibling folder and renamed into place.
    """
    ota_verify.parse_version(version)
    key = load_private_key(private_key_path)
    files = default_files() if files is None else dict(files)
    if not files:
        raise OtaError("a bundle needs at least one file")
    for path in files:
        ota_verify.check_path(path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OtaError(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries = []
        for path, src in sorted(files.items()):
            if path.startswith("firmware/") and path.endswith(".py"):
                # A charger loads bytecode: compiling on the device would
                # need a heap peak no test has seen (issue 12).
                if not Path(src).is_file():
                    raise OtaError(f"{path}: cannot read {src}")
                try:
                    data = compile_mpy(Path(src), tmp / ".mpy" / (path[:-3] + ".mpy"), path)
                except RuntimeError as exc:
                    raise OtaError(f"{path}: {exc}") from None
                path = path[:-3] + ".mpy"
                ota_verify.check_path(path)
            else:
                try:
                    data = Path(src).read_bytes()
                except OSError as exc:
                    raise OtaError(f"{path}: cannot read {src}: {exc}") from None
            if len(data) > ota_verify.MAX_FILE_SIZE:
                raise OtaError(f"{path}: {len(data)} bytes, more than the "
                               f"{ota_verify.MAX_FILE_SIZE} a bundle file may have")
            dest = tmp / FILES_DIR / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            entries.append({"path": path, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        shutil.rmtree(tmp / ".mpy", ignore_errors=True)
        manifest = sign_body(key, body_text(version, entries))
        if len(manifest) > ota_verify.MAX_MANIFEST_BYTES:
            raise OtaError(f"manifest is {len(manifest)} bytes, more than the charger's "
                           f"{ota_verify.MAX_MANIFEST_BYTES}: fewer files or shorter paths")
        # Self-check with the charger's own verifier before publishing.
        pub = ota_verify.load_key(public_key_json(key.public_key()))
        ota_verify.verify_manifest(manifest, pub)
        (tmp / MANIFEST_NAME).write_bytes(manifest)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- verify ---------------------------------------------------------------

def verify(bundle_dir: str | os.PathLike, public_key_json: str | os.PathLike) -> dict:
    """Check a bundle as the charger would: the manifest's signature against
    the ``ota_key.json`` at ``public_key_json``, then every listed file's size
    and SHA-256 (read in chunks through :class:`firmware.ota.verify.FileCheck`).
    Also refuses files in the bundle that the manifest does not list.
    Returns the manifest body; raises OtaError naming the first problem."""
    key = load_public_key(public_key_json)
    bundle = Path(bundle_dir)
    mpath = bundle / MANIFEST_NAME
    try:
        with open(mpath, "rb") as f:
            manifest = f.read(ota_verify.MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise OtaError(f"cannot read {mpath}: {exc}") from None
    try:
        body = ota_verify.verify_manifest(manifest, key)
    except ValueError as exc:
        raise OtaError(f"{mpath}: {exc}") from None
    listed = set()
    for entry in body["files"]:
        listed.add(entry["path"])
        src = bundle / FILES_DIR / entry["path"]
        check = ota_verify.FileCheck(entry["size"], entry["sha256"], entry["path"])
        try:
            with open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    check.update(chunk)
            check.finish()
        except OSError as exc:
            raise OtaError(f"cannot read {src}: {exc}") from None
        except ValueError as exc:
            raise OtaError(str(exc)) from None
    files_root = bundle / FILES_DIR
    for p in sorted(files_root.rglob("*")):
        if not p.is_dir() and p.relative_to(files_root).as_posix() not in listed:
            raise OtaError(f"{p} is in the bundle but not in its manifest")
    return body


# --- serve ----------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range -> (first, last) inclusive;
    None to ignore the header (RFC 9110 §14.2 allows that for syntax it does
    not support, such as several ranges); "unsatisfiable" for 416."""
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    a, b = m.group(1), m.group(2)
    if a == "":                          # suffix: the last n bytes
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(a)
    last = size - 1 if b == "" else min(int(b), size - 1)
    if b != "" and int(b) < first:
        return None                      # invalid range: ignore it
    if first >= size:
        return "unsatisfiable"
    return first, last


def _handler(root: Path, quiet: bool) -> type[BaseHTTPRequestHandler]:
    class BundleHandler(BaseHTTPRequestHandler):
        server_version = "evse-ota"
        sys_version = ""

        def log_message(self, format, *args):  # noqa: A002 (base class name)
            if not quiet:
                super().log_message(format, *args)

        def _refuse(self, code: int, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _target(self) -> Path | None:
            raw = urllib.parse.urlsplit(self.path).path
            rel = urllib.parse.unquote(raw).lstrip("/")
            if not rel or "\x00" in rel:
                return None
            try:
                target = (root / rel).resolve()
            except (OSError, RuntimeError):
                return None
            if not target.is_relative_to(root) or not target.is_file():
                return None
            return target

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            target = self._target()
            if target is None:
                self._refuse(404)
                return
            try:
                f = open(target, "rb")
            except OSError:
                self._refuse(404)
                return
            with f:
                size = os.fstat(f.fileno()).st_size
                rng = _parse_range(self.headers.get("Range", ""), size) \
                    if "Range" in self.headers else None
                if rng == "unsatisfiable":
                    self._refuse(416, {"Content-Range": f"bytes */{size}",
                                       "Accept-Ranges": "bytes"})
                    return
                if isinstance(rng, tuple):
                    first, last = rng
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                else:
                    first, last = 0, size - 1
                    self.send_response(200)
                length = last - first + 1
                ctype = "application/json" if target.suffix == ".json" \
                    else "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                f.seek(first)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK * 16, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def _not_allowed(self) -> None:
            self._refuse(405, {"Allow": "GET"})

        do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    return BundleHandler


def serve(bundle_root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          quiet: bool = True) -> tuple[ThreadingHTTPServer, str]:
    """Serve the files under ``bundle_root`` over HTTP from a daemon thread.

    GET only (405 otherwise); 404 for folders and for anything outside
    ``bundle_root`` (``..``, symlinks out); a single ``Range: bytes=a-b``
    (also ``a-`` and ``-n``) gets 206 with Content-Range, so the charger can
    download in chunks. Returns ``(server, base_url)``; a bundle built into
    ``bundle_root/0.5.0`` is at ``base_url + "0.5.0/manifest.json"``. Stop
    with ``server.shutdown(); server.server_close()``.
    """
    root = Path(bundle_root).resolve()
    if not root.is_dir():
        raise OtaError(f"{bundle_root} is not a folder")
    server = ThreadingHTTPServer((host, port), _handler(root, quiet))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="evse-ota-http", daemon=True).start()
    h, p = server.server_address[:2]
    h = str(h)
    url = f"http://[{h}]:{p}/" if ":" in h else f"http://{h}:{p}/"
    return server, url


# --- command line ---------------------------------------------------------

def _version_arg(text: str) -> str:
    try:
        ota_verify.parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _file_arg(text: str) -> tuple[str, Path]:
    """``PATH`` (device path = source path) or ``DEVICE_PATH=SOURCE``."""
    dev, sep, src = text.partition("=")
    if not sep:
        src = dev
    try:
        ota_verify.check_path(dev)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return dev, Path(src)


def _dir_arg(text: str) -> Path:
    # Path("") is ".": an empty --out would write the keys into the current folder.
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name is not a folder")
    return Path(text)


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evse-ota", description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("keygen", help="create the OTA signing key pair")
    p.add_argument("--out", required=True, type=_dir_arg, metavar="DIR",
                   help="folder for ota_private.pem (0600) and ota_key.json; keep it out of git")
    p = sub.add_parser("build", help="build and sign a bundle")
    p.add_argument("--key", required=True, type=Path, metavar="PEM", help="ota_private.pem")
    p.add_argument("--version", required=True, type=_version_arg, metavar="X.Y.Z")
    p.add_argument("--out", required=True, type=_dir_arg, metavar="DIR", help="new bundle folder")
    p.add_argument("--file", action="append", type=_file_arg, metavar="PATH",
                   help="a file to ship (repeatable): PATH relative to the current folder, "
                        "or DEVICE_PATH=SOURCE; default: boot.py, main.py, firmware/*.py "
                        "without the simulator modules")
    p = sub.add_parser("verify", help="check a bundle as the charger would")
    p.add_argument("--bundle", required=True, type=Path, metavar="DIR")
    p.add_argument("--pubkey", required=True, type=Path, metavar="JSON", help="ota_key.json")
    p = sub.add_parser("serve", help="serve bundles over HTTP (GET, Range)")
    p.add_argument("--root", required=True, type=Path, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port_arg, default=8080, metavar="N")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "keygen":
            priv, pub = keygen(args.out)
            try:
                priv.resolve().relative_to(REPO)
                print(f"warning: {priv} is inside the repository; move it out and "
                      "never commit it", file=sys.stderr)
            except ValueError:
                pass
            print(f"private key: {priv} (mode 0600; keep it secret, out of the repository)")
            print(f"public key:  {pub} (copy to the charger as /ota_key.json)")
        elif args.cmd == "build":
            files = None if not args.file else dict(args.file)
            if files is not None and len(files) != len(args.file):
                raise OtaError("the same device path is given twice")
            out = build(args.key, args.version, files, args.out)
            body = json.loads(json.loads((out / MANIFEST_NAME).read_text())["body"])
            print(f"bundle {out}: version {body['version']}, {len(body['files'])} files, signed")
        elif args.cmd == "verify":
            body = verify(args.bundle, args.pubkey)
            print(f"OK: {args.bundle}: version {body['version']}, "
                  f"{len(body['files'])} files, signature and hashes verified")
        elif args.cmd == "serve":
            server, url = serve(args.root, args.host, args.port, quiet=False)
            print(f"serving {args.root} at {url} (Ctrl-C to stop)", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            finally:
                server.shutdown()
                server.server_close()
    except (OtaError, ValueError, OSError) as exc:
        print(f"evse-ota: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
