"""Verification of signed OTA bundles on the charger (DESIGN.md §4, issue 5).

Pure logic: no file system, no network, no ``machine``. Runs unchanged on
MicroPython (ESP32 and unix port) and on CPython, where ``evse_tools.ota``
reuses it to check the bundles it builds.

A bundle is a directory holding ``manifest.json`` and ``files/<path>``. The
manifest is ``{"body": "<text>", "sig": "<512 hex digits>"}``: ``body`` is
compact ASCII JSON ``{"v":1,"version":"X.Y.Z","files":[{"path":...,
"size":N,"sha256":"<hex>"},...]}`` sorted by path, and ``sig`` is the RSA
PKCS#1 v1.5 SHA-256 signature (RSASSA-PKCS1-v1_5, RFC 8017 §8.2) of the
body's bytes made with the server's 2048-bit key. The charger stores the
public half as ``/ota_key.json`` (``{"n": "<hex>", "e": 65537}``).

Order of checks, so that nothing unauthenticated is interpreted: size bound,
outer JSON, signature over the exact body bytes, and only then the body's
content. Every failure raises ValueError with a message that says what was
wrong; nothing here returns a "bad" value that a caller could ignore.

Signature check (RFC 8017 §8.2.2 RSASSA-PKCS1-V1_5-VERIFY): the signature
representative s must lie in [0, n-1] (RSAVP1, §5.2.2), m = s^e mod n is
turned into the 256-byte block EM (I2OSP), and EM is compared in full with
the block that EMSA-PKCS1-v1_5 (§9.2) encodes from the body's SHA-256:
``0x00 0x01 FF..FF 0x00 DigestInfo(sha256) H``. The decrypted block is
never parsed, which rules out the padding-parsing forgeries (Bleichenbacher
2006, e = 3 signature forgery) that lenient parsers allow. With e = 65537
the exponentiation costs 17 modular multiplications: milliseconds, even on
the ESP32 (where integers above 2^30 allocate, but big ints work).
"""
import binascii
import hashlib

from firmware.core import strictjson
from firmware.ota.semver import is_upgrade, parse_version  # noqa: F401  (part of this API)

MAX_MANIFEST_BYTES = 16384      # the device reads the whole manifest into RAM
MAX_KEY_BYTES = 4096
MAX_FILE_SIZE = 1000000
MAX_PATH_LEN = 64
KEY_BITS = 2048
KEY_BYTES = 256                 # k in RFC 8017: length of n in octets
PUBLIC_EXPONENT = 65537
MANIFEST_V = 1

# DER of DigestInfo{sha256, NULL} followed by the OCTET STRING header of the
# 32-byte hash: RFC 8017 §9.2, note 1 ("SHA-256: (0x)30 31 30 0d 06 09 60 86
# 48 01 65 03 04 02 01 05 00 04 20 || H").
SHA256_DIGEST_INFO = (b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01"
                      b"\x05\x00\x04\x20")

_HEX = "0123456789abcdef"
_PATH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-"
_BODY_KEYS = ("v", "version", "files")
_ENTRY_KEYS = ("path", "size", "sha256")


def _is_int(x):
    # bool is a subclass of int on both runtimes; true/false are not sizes.
    return type(x) is int


def _check_keys(obj, keys, what):
    if type(obj) is not dict:
        raise ValueError("%s must be a JSON object" % what)
    for k in obj:
        if k not in keys:
            raise ValueError("%s has an unknown field %r" % (what, k))
    for k in keys:
        if k not in obj:
            raise ValueError("%s lacks the field %r" % (what, k))


def _check_hex(text, length, what):
    if type(text) is not str or len(text) != length:
        raise ValueError("%s must be %d lowercase hex digits" % (what, length))
    for c in text:
        if c not in _HEX:
            raise ValueError("%s must be %d lowercase hex digits" % (what, length))


def load_key(text):
    """Parse the charger's OTA public key, the text of ``/ota_key.json``.

    ``text`` (str or bytes) must be ``{"n": "<512 lowercase hex digits>",
    "e": 65537}`` and nothing else; ``n`` must be a 2048-bit odd modulus.
    Returns ``(n, e)``. Raises ValueError on anything else.
    """
    if len(text) > MAX_KEY_BYTES:
        raise ValueError("OTA key file too large")
    try:
        obj = strictjson.loads(text)
    except ValueError as exc:
        raise ValueError("OTA key file is not valid JSON: %s" % exc)
    _check_keys(obj, ("n", "e"), "OTA key")
    e = obj["e"]
    if not _is_int(e) or e != PUBLIC_EXPONENT:
        raise ValueError("OTA key: e must be %d" % PUBLIC_EXPONENT)
    _check_hex(obj["n"], KEY_BYTES * 2, "OTA key: n")
    n = int(obj["n"], 16)
    if n >> (KEY_BITS - 1) != 1:
        raise ValueError("OTA key: n must be a %d-bit modulus" % KEY_BITS)
    if n & 1 == 0:
        raise ValueError("OTA key: n must be odd")
    return (n, e)


def _check_key_tuple(key):
    if type(key) is not tuple or len(key) != 2:
        raise ValueError("OTA key must be (n, e) from load_key()")
    n, e = key
    if not _is_int(n) or not _is_int(e) or e != PUBLIC_EXPONENT or n >> (KEY_BITS - 1) != 1:
        raise ValueError("OTA key must be a %d-bit modulus with e = %d"
                         % (KEY_BITS, PUBLIC_EXPONENT))
    return n, e


def encoded_message(message):
    """EMSA-PKCS1-v1_5 encoding (RFC 8017 §9.2) of ``message`` with SHA-256,
    for a 2048-bit key: the whole 256-byte block ``0x00 0x01 PS 0x00 T``,
    where T is the DigestInfo of SHA-256(message) and PS is 0xFF repeated
    (256 - 3 - 51 = 202 bytes, at least the 8 the RFC requires)."""
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    ps = b"\xff" * (KEY_BYTES - 3 - len(t))
    return b"\x00\x01" + ps + b"\x00" + t


def verify_signature(message, sig_hex, key):
    """RSASSA-PKCS1-V1_5-VERIFY (RFC 8017 §8.2.2) of ``message`` (bytes)
    against ``sig_hex`` (512 lowercase hex digits) with ``key`` = (n, e).

    Raises ValueError unless the signature is valid for exactly this message.
    """
    n, e = _check_key_tuple(key)
    _check_hex(sig_hex, KEY_BYTES * 2, "signature")
    s = int(sig_hex, 16)
    if s >= n:   # RSAVP1 step 1: "signature representative out of range"
        raise ValueError("bad signature: out of range for this key (wrong key?)")
    em = pow(s, e, n).to_bytes(KEY_BYTES, "big")
    if em != encoded_message(message):
        raise ValueError("bad signature: the manifest was not signed by this charger's "
                         "OTA key (wrong key, or the manifest was edited after signing)")


def check_path(path):
    """Raise ValueError unless ``path`` is a safe relative device path:
    1 to 64 characters from ``[A-Za-z0-9_./-]``, ``/``-separated, no leading
    or trailing ``/``, no empty, ``.`` or ``..`` segment and no ``..``."""
    if type(path) is not str or not path or len(path) > MAX_PATH_LEN:
        raise ValueError("file path must be 1 to %d characters: %r" % (MAX_PATH_LEN, path))
    for c in path:
        if c not in _PATH_CHARS:
            raise ValueError("file path has a character outside [A-Za-z0-9_./-]: %r" % path)
    if path[0] == "/":
        raise ValueError("file path must be relative: %r" % path)
    if ".." in path:
        raise ValueError("file path must not contain '..': %r" % path)
    for seg in path.split("/"):
        if seg == "" or seg == ".":
            raise ValueError("file path has an empty or '.' segment: %r" % path)


def _check_entry(entry, i):
    what = "file entry %d" % i
    _check_keys(entry, _ENTRY_KEYS, what)
    check_path(entry["path"])
    size = entry["size"]
    if not _is_int(size) or size < 0 or size > MAX_FILE_SIZE:
        raise ValueError("%s (%s): size must be an integer 0..%d"
                         % (what, entry["path"], MAX_FILE_SIZE))
    _check_hex(entry["sha256"], 64, "%s (%s): sha256" % (what, entry["path"]))


def check_body(body):
    """Validate a parsed manifest body; return it. Raises ValueError."""
    _check_keys(body, _BODY_KEYS, "manifest body")
    v = body["v"]
    if not _is_int(v) or v != MANIFEST_V:
        raise ValueError("manifest format v=%r is not supported (expected %d)" % (v, MANIFEST_V))
    parse_version(body["version"])
    files = body["files"]
    if type(files) is not list or not files:
        raise ValueError("manifest body: files must be a non-empty list")
    seen = {}
    prev = ""
    for i in range(len(files)):
        entry = files[i]
        _check_entry(entry, i)
        path = entry["path"]
        if path in seen:
            raise ValueError("manifest lists %r twice" % path)
        if path < prev:
            raise ValueError("manifest files are not sorted by path at %r" % path)
        seen[path] = True
        prev = path
    for path in seen:
        # "a" and "a/b" cannot both be files.
        cut = path.rfind("/")
        while cut > 0:
            if path[:cut] in seen:
                raise ValueError("manifest lists %r both as a file and as a folder" % path[:cut])
            cut = path.rfind("/", 0, cut)
    return body


def verify_manifest(manifest_bytes, key):
    """Check a bundle's ``manifest.json`` (bytes) against ``key`` = (n, e)
    from load_key(); return the body as a dict
    ``{"v": 1, "version": "X.Y.Z", "files": [{"path", "size", "sha256"}, ...]}``.

    Raises ValueError for a manifest over 16 KB, one that is not
    ``{"body": str, "sig": str}`` strict JSON (truncated, garbage), a bad
    signature (wrong key, body edited after signing), and a signed body with
    a bad version, bad or duplicate paths, bad sizes or hashes.
    Does not decide whether the version is an upgrade: see is_upgrade().
    """
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ValueError("manifest too large: %d bytes (at most %d)"
                         % (len(manifest_bytes), MAX_MANIFEST_BYTES))
    try:
        outer = strictjson.loads(manifest_bytes)
    except ValueError as exc:
        raise ValueError("manifest is not valid JSON (truncated or garbage): %s" % exc)
    _check_keys(outer, ("body", "sig"), "manifest")
    body_text = outer["body"]
    if type(body_text) is not str:
        raise ValueError("manifest body must be a string")
    sig = outer["sig"]
    if type(sig) is not str:
        raise ValueError("manifest sig must be a string")
    outer = None            # on a 48 KB heap every copy of the manifest counts
    verify_signature(body_text.encode(), sig, key)
    sig = None
    # Authentic from here on; still validated, since a signed bundle from a
    # faulty build must not write outside its folder either.
    try:
        body = strictjson.loads(body_text)
    except ValueError as exc:
        raise ValueError("signed manifest body is not valid JSON: %s" % exc)
    return check_body(body)


class FileCheck:
    """Incremental size and SHA-256 check of one downloaded file.

    ``FileCheck(size, sha256_hex)`` from a manifest entry; feed the file with
    ``update(chunk)`` as chunks arrive, then call ``finish()``. ``update``
    raises ValueError as soon as more than ``size`` bytes have arrived, so an
    oversize download is cut off early instead of filling the flash;
    ``finish`` raises ValueError unless exactly ``size`` bytes with exactly
    that SHA-256 arrived. After a failure or finish() the check is spent.
    """

    def __init__(self, size, sha256_hex, name=""):
        if not _is_int(size) or size < 0 or size > MAX_FILE_SIZE:
            raise ValueError("size must be an integer 0..%d" % MAX_FILE_SIZE)
        _check_hex(sha256_hex, 64, "sha256")
        self.size = size
        self.sha256_hex = sha256_hex
        self.name = name
        self.received = 0
        self._hash = hashlib.sha256()
        self._spent = False

    def _label(self):
        return ("file %s" % self.name) if self.name else "file"

    def update(self, chunk):
        if self._spent:
            raise ValueError("%s: check already finished or failed" % self._label())
        self.received += len(chunk)
        if self.received > self.size:
            self._spent = True
            raise ValueError("%s: more than the %d bytes the manifest lists"
                             % (self._label(), self.size))
        self._hash.update(chunk)

    def finish(self):
        if self._spent:
            raise ValueError("%s: check already finished or failed" % self._label())
        self._spent = True
        if self.received != self.size:
            raise ValueError("%s: %d bytes received, the manifest lists %d"
                             % (self._label(), self.received, self.size))
        got = binascii.hexlify(self._hash.digest()).decode()
        if got != self.sha256_hex:
            raise ValueError("%s: SHA-256 does not match the manifest (tampered or corrupt)"
                             % self._label())
