"""Broker security for a load group (DESIGN.md §4, "Security"): a private CA,
the broker's TLS certificate, one broker account per charger plus one for the
server, and mosquitto's password, ACL and configuration files.

``evse-server broker-setup --dir DIR --host NAME`` (see :func:`setup`) writes::

    DIR/ca.key             CA private key, EC P-256 (0600; keep it offline after setup)
    DIR/ca.pem             CA certificate: for every charger (evse-deploy provision --ca)
                           and for the server (--cafile)
    DIR/broker.key         the broker's TLS key (0600)
    DIR/broker.pem         the broker's TLS certificate, for every --host (DNS name or IP)
    DIR/passwords/<user>   one password per account (0600), kept across runs
    DIR/passwd             mosquitto password file (PBKDF2-SHA512, mosquitto's "$7$" format)
    DIR/acl                mosquitto ACL file (below)
    DIR/mosquitto.conf     TLS listener, no anonymous clients, the two files above

The ACL: charger ``<id>`` (user ``<id>``) may publish only ``<prefix>/<id>/state``
and ``<prefix>/<id>/online`` and read only ``<prefix>/<id>/set`` and
``<prefix>/<id>/cmd``. So it can neither report for another charger nor send
anyone a setpoint. The server (user :data:`SERVER_USER`, a name no charger id
can take) reads and writes ``<prefix>/#`` and ``loadgroup/#``; the tools'
account :data:`ADMIN_USER` sends commands and reads states. The broker uses
each account name as the client id, so nobody can take over another's
session.

Running it again keeps the CA, the keys and every password; it adds accounts for
new members, removes those of removed members (their access ends at the
broker's next reload, ``kill -HUP``), re-issues the broker certificate when the
host names change or it expires within 30 days, and renews one password with
``--rotate ID``. Every file is written to a temporary name and renamed over
the old one, so a crash leaves the old or the new file, never half of one.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import grp
import hashlib
import ipaddress
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_USER = "evse_server"
"""The server's broker account. ``_`` cannot appear in a charger id
(``[a-z0-9-]{1,32}``, DESIGN.md §4), so no charger can take this name."""
ADMIN_USER = "evse_admin"
"""The installer's tools' account (``evse-server ota``): it may send any
charger a command and read states, but not send setpoints. A separate account
because the broker names each client after its account (below), and a tool
logged in as the server would push the running server off the broker."""
CHARGER_ID = re.compile(r"[a-z0-9-]{1,32}\Z")
TOPIC_PREFIX = re.compile(r"[a-z0-9_/-]{1,32}\Z")
"""The firmware's ``topic_prefix`` characters: no MQTT wildcard, space or
newline can reach the ACL file."""
BROKER_FILES = ("ca.pem", "broker.pem", "broker.key", "passwd", "acl", "mosquitto.conf")
"""What mosquitto reads. With a broker group these are group-readable (0640);
``ca.key`` and ``passwords/`` never are."""
CA_DAYS = 20 * 365
"""CA validity, days: longer than a charger's service life, because replacing
the CA means re-provisioning every charger."""
BROKER_DAYS = 5 * 365
"""Broker certificate validity, days; re-issued by a later run before it ends."""
RENEW_DAYS = 30
"""A broker certificate expiring within this many days is re-issued, days."""
VALID_FROM = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
"""Start of validity of the CA and broker certificates: the ESP32's clock at
power-on before any time sync (MicroPython's epoch). MicroPython checks
certificate dates on the ESP32 since 1.22 (micropython/micropython PR 13100);
a charger without NTP would otherwise refuse a broker whose certificate
starts today and stay on its offline current."""
MAX_PACKET = 65536
"""Largest MQTT packet the broker takes, bytes (mosquitto ``max_packet_size``)."""
PBKDF2_ITERATIONS = 101
"""mosquitto_passwd's default for its "$7$" PBKDF2-SHA512 hashes (mosquitto 2.0)."""


class SetupError(ValueError):
    """A refused broker setup (bad host name or id, unreadable files); the
    message says what to fix. Nothing is written when it is raised before the
    first file, and each file is replaced atomically."""


@dataclass
class SetupReport:
    """What :func:`setup` did: the paths are inside its directory."""
    directory: Path
    created_ca: bool = False
    issued_broker_cert: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: a temp file of its own (mode
    0600, or 0644 unless ``private``), fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _cert(subject: str, public_key, issuer: x509.Name, signer, days: int, ca: bool,
          hosts: list[str] = ()) -> x509.Certificate:
    now = _now()
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer)
         .public_key(public_key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(VALID_FROM)
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = (b.add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return b.sign(signer, hashes.SHA256())


def check_host(host: str) -> str:
    """A broker host name or IP address for the certificate; raises SetupError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+", host) \
            or host.endswith("."):
        raise SetupError("--host %r: not a DNS name or an IP address" % host)
    if host.rsplit(".", 1)[-1].isdigit():
        # No top-level domain is all digits: 127.0.0.256 or 10.0.0 is a typo.
        raise SetupError("--host %r: looks like a mistyped IP address" % host)
    return host.lower()


def _same_key(private_key, cert: x509.Certificate) -> bool:
    return private_key.public_key().public_numbers() == cert.public_key().public_numbers()


def make_ca(directory: Path) -> tuple[object, x509.Certificate, bool]:
    """Load the CA from ``directory`` or create it (EC P-256, :data:`CA_DAYS`).
    Returns ``(key, certificate, created)``.

    ``ca.key`` is written before ``ca.pem``, so a key without a certificate
    is a first run cut short: no charger can trust that CA yet, and a new one
    is made. Raises SetupError for a certificate without its key, an
    unreadable file, or a key that is not the certificate's: a new CA would
    lock out every provisioned charger, so it is never made over an old one."""
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    if cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if not _same_key(key, cert):
                raise ValueError("ca.key is not the key of ca.pem")
        except (OSError, ValueError, TypeError) as exc:
            raise SetupError("the CA in %s is incomplete or unreadable (%s); restore ca.key and "
                             "ca.pem from a backup, or move both away to start a new CA "
                             "(then re-provision every charger)" % (directory, exc)) from None
        return key, cert, False
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EVSE load-group CA")])
    cert = _cert("EVSE load-group CA", key.public_key(), name, key, CA_DAYS, ca=True)
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, True


def _broker_cert_current(directory: Path, ca_cert, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((directory / "broker.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "broker.key").read_bytes(), None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca_cert)      # signed by this CA, not just named after it
        if not _same_key(key, cert):
            return False
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    have = [str(n.value) for n in san]
    left = cert.not_valid_after_utc - _now()
    return (cert.issuer == ca_cert.subject and sorted(have) == sorted(hosts)
            and left > datetime.timedelta(days=RENEW_DAYS))


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """mosquitto's "$7$" password hash: PBKDF2-HMAC-SHA512, 101 iterations, a
    12-byte salt, as ``$7$101$<base64 salt>$<base64 hash>`` (the format of
    mosquitto_passwd in mosquitto 2.0)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return "$7$%d$%s$%s" % (PBKDF2_ITERATIONS, base64.b64encode(salt).decode(),
                            base64.b64encode(digest).decode())


def acl_text(chargers: list[str], prefix: str = "evse") -> str:
    """The mosquitto ACL (see the module docstring). ``chargers``: charger ids."""
    lines = ["# Generated by evse-server broker-setup. A charger publishes only its own",
             "# state and online flag and reads only its own set and cmd (DESIGN.md §4).",
             "", "user %s" % SERVER_USER, "topic readwrite %s/#" % prefix,
             "topic readwrite loadgroup/#",
             "", "user %s" % ADMIN_USER, "topic write %s/+/cmd" % prefix,
             "topic read %s/+/state" % prefix, "topic read %s/+/online" % prefix,
             "topic read loadgroup/#"]
    for cid in chargers:
        lines += ["", "user %s" % cid,
                  "topic write %s/%s/state" % (prefix, cid),
                  "topic write %s/%s/online" % (prefix, cid),
                  "topic read %s/%s/set" % (prefix, cid),
                  "topic read %s/%s/cmd" % (prefix, cid)]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(directory: Path, port: int = 8883, bind: str | None = None) -> str:
    """A mosquitto configuration for :func:`setup`'s files: one TLS listener on
    ``port`` (all interfaces unless ``bind``), passwords required, the ACL."""
    d = directory.resolve()
    return "\n".join([
        "# Generated by evse-server broker-setup: mosquitto -c %s" % (d / "mosquitto.conf"),
        "per_listener_settings false",
        "allow_anonymous false",
        "password_file %s" % (d / "passwd"),
        "acl_file %s" % (d / "acl"),
        "listener %d%s" % (port, " " + bind if bind else ""),
        # Per listener, so after its line (before any listener, mosquitto
        # opens a default plain one on 1883 to hold it). The client id
        # becomes the account name: nobody can take over, and so
        # disconnect, another's session by using its id.
        "use_username_as_clientid true",
        "cafile %s" % (d / "ca.pem"),
        "certfile %s" % (d / "broker.pem"),
        "keyfile %s" % (d / "broker.key"),
        "tls_version tlsv1.2",
        # A state is under 1 KB and a group's state a few KB: nobody needs
        # more, and a charger account must not be able to flood the server.
        "max_packet_size %d" % MAX_PACKET,
    ]) + "\n"


def default_broker_group() -> str | None:
    """``mosquitto`` when run as root and that group exists (a packaged
    mosquitto started as root drops to the user ``mosquitto``), else None."""
    if os.geteuid() != 0:
        return None
    try:
        grp.getgrnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


def _make_dir(path: Path, mode: int) -> None:
    """Create ``path`` with ``mode``; an existing directory keeps its mode
    (``--dir .`` must not lock out the directory's other users), but must be
    a real directory, not a symlink to one."""
    if path.is_symlink():
        raise SetupError("%s is a symbolic link: give the real directory" % path)
    try:
        path.mkdir(parents=True)
        os.chmod(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise SetupError("%s exists and is not a directory" % path) from None


def setup(directory: Path, hosts: list[str], chargers: list[str], prefix: str = "evse",
          port: int = 8883, rotate: list[str] = (), broker_group: str | None = None) -> SetupReport:
    """Create or update the broker's security files in ``directory`` (see the
    module docstring) for ``hosts`` (the names and addresses the chargers use
    to reach the broker, at least one) and ``chargers`` (ids). ``rotate``:
    accounts whose password is renewed. ``broker_group``: a group that may
    read :data:`BROKER_FILES` (mode 0640; the directory 0750), for a broker
    that runs as another user; ``ca.key`` and ``passwords/`` stay the
    caller's alone. Two runs on one directory take turns (a lock file).
    Returns a :class:`SetupReport`. Raises SetupError for a bad host, id,
    prefix, group or rotate name, or an unusable CA."""
    if not hosts:
        raise SetupError("give at least one --host: the name or address chargers use for the broker")
    hosts = sorted({check_host(h) for h in hosts})
    if not TOPIC_PREFIX.match(prefix):
        raise SetupError("--prefix %r: use 1-32 of a-z 0-9 _ / -" % prefix)
    for cid in chargers:
        if not CHARGER_ID.match(cid):
            raise SetupError("charger id %r is not [a-z0-9-]{1,32}" % cid)
    chargers = sorted(set(chargers))
    users = [SERVER_USER, ADMIN_USER] + chargers
    for name in rotate:
        if name not in users:
            raise SetupError("--rotate %s: no such account (accounts: %s)" % (name, ", ".join(users)))
    gid = None
    if broker_group is not None:
        try:
            gid = grp.getgrnam(broker_group).gr_gid
        except KeyError:
            raise SetupError("--broker-group %s: no such group" % broker_group) from None
    _make_dir(directory, 0o750 if gid is not None else 0o700)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = _setup_locked(directory, hosts, chargers, users, prefix, port, rotate)
        if gid is not None:
            os.chown(directory, -1, gid)
            for name in BROKER_FILES:
                os.chown(directory / name, -1, gid)
                os.chmod(directory / name, 0o640)
    return report


def _setup_locked(directory, hosts, chargers, users, prefix, port, rotate) -> SetupReport:
    report = SetupReport(directory)
    ca_key, ca_cert, report.created_ca = make_ca(directory)
    if report.created_ca or not _broker_cert_current(directory, ca_cert, hosts):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(hosts[0], key.public_key(), ca_cert.subject, ca_key, BROKER_DAYS, ca=False,
                     hosts=hosts)
        _write(directory / "broker.key", _key_pem(key), private=True)
        _write(directory / "broker.pem", cert.public_bytes(serialization.Encoding.PEM))
        report.issued_broker_cert = True
    pw_dir = directory / "passwords"
    _make_dir(pw_dir, 0o700)
    entries = []
    for user in users:
        path = pw_dir / user
        password = None
        if path.exists() and user not in rotate:
            password = path.read_text(encoding="ascii").strip() or None
        if password is None:
            password = secrets.token_urlsafe(24)
            _write(path, (password + "\n").encode(), private=True)
            (report.rotated if user in rotate else report.added).append(user)
        entries.append("%s:%s" % (user, mosquitto_hash(password)))
    for path in sorted(pw_dir.iterdir()):
        if path.name not in users and not path.name.startswith("."):
            path.unlink()
            report.removed.append(path.name)
    _write(directory / "passwd", ("\n".join(entries) + "\n").encode(), private=True)
    _write(directory / "acl", acl_text(chargers, prefix).encode())
    _write(directory / "mosquitto.conf", mosquitto_conf_text(directory, port).encode())
    report.accounts = users
    return report


def read_password(path: str) -> str:
    """The first line of a password file (``passwords/<user>``); raises SetupError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.readline().rstrip("\r\n")
    except (OSError, UnicodeError) as exc:
        raise SetupError("cannot read the password file %s: %s" % (path, exc)) from None
    if not text:
        raise SetupError("the password file %s is empty" % path)
    return text


def add_broker_auth_arguments(parser) -> None:
    """The broker account and TLS options shared by ``run`` and ``ota``."""
    parser.add_argument("--username", help="broker user name (from broker-setup: %s)" % SERVER_USER)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--password", help="broker password (prefer --password-file or --password-env)")
    g.add_argument("--password-env", metavar="VAR",
                   help="read the broker password from this environment variable")
    g.add_argument("--password-file", metavar="FILE",
                   help="read the broker password from this file (broker-setup's passwords/%s)"
                        % SERVER_USER)
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the broker against --cafile")
    parser.add_argument("--cafile", metavar="PEM",
                        help="CA certificate for TLS (broker-setup's ca.pem); implies --tls")


def configure_client(client, args) -> None:
    """Apply ``args``' account and TLS options (see
    :func:`add_broker_auth_arguments`; a missing attribute counts as not
    given) to a paho ``client``. TLS always verifies the broker's certificate
    and host name. Raises SetupError for a missing password source or an
    unreadable CA file."""
    opt = {name: getattr(args, name, None) for name in
           ("username", "password", "password_env", "password_file", "tls", "cafile")}
    if opt["username"]:
        password = opt["password"]
        if opt["password_env"]:
            password = os.environ.get(opt["password_env"])
            if password is None:
                raise SetupError("environment variable %s is not set" % opt["password_env"])
        elif opt["password_file"]:
            password = read_password(opt["password_file"])
        client.username_pw_set(opt["username"], password)
    elif opt["password"] or opt["password_env"] or opt["password_file"]:
        raise SetupError("a password was given without --username")
    if opt["tls"] or opt["cafile"]:
        if opt["cafile"] and not os.path.isfile(opt["cafile"]):
            raise SetupError("--cafile %s: no such file" % opt["cafile"])
        try:
            client.tls_set(ca_certs=opt["cafile"])
        except (OSError, ValueError) as exc:
            raise SetupError("--cafile %s: %s" % (opt["cafile"], exc)) from None
