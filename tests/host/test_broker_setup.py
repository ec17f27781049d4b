"""``evse-server broker-setup`` (tools/evse_tools/server/secure.py) and the
server's check of the sender's id: the files that keep one charger from
speaking for another (DESIGN.md §4 "Security")."""
import base64
import hashlib
import json
import stat

import pytest
from cryptography import x509

from evse_tools.server import cli, secure
from evse_tools.server.service import Service, parse_state
from evse_tools.server.db import GroupStore

HOSTS = ["broker.lan", "192.168.1.10"]


def passwords(d):
    return {p.name: p.read_text().strip() for p in (d / "passwords").iterdir()}


def test_each_charger_gets_its_own_account_and_the_server_one_no_charger_can_take(tmp_path):
    rep = secure.setup(tmp_path, HOSTS, ["bay-2", "bay-1"])
    assert rep.created_ca and rep.issued_broker_cert
    assert rep.accounts == ["evse_server", "evse_admin", "bay-1", "bay-2"]
    assert not secure.CHARGER_ID.match(secure.SERVER_USER)
    assert not secure.CHARGER_ID.match(secure.ADMIN_USER)
    pw = passwords(tmp_path)
    assert sorted(pw) == ["bay-1", "bay-2", "evse_admin", "evse_server"] and len(set(pw.values())) == 4
    assert all(len(p) >= 32 for p in pw.values())
    for name in ("ca.key", "broker.key", "passwd", "passwords/bay-1"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_password_file_hashes_verify_with_mosquittos_pbkdf2_sha512_format(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1"])
    pw = passwords(tmp_path)
    for line in (tmp_path / "passwd").read_text().splitlines():
        user, h = line.split(":", 1)
        _, kind, rounds, salt, digest = h.split("$")
        assert (kind, rounds) == ("7", "101")
        want = hashlib.pbkdf2_hmac("sha512", pw[user].encode(), base64.b64decode(salt), 101)
        assert base64.b64decode(digest) == want and len(base64.b64decode(salt)) == 12


def test_acl_lets_a_charger_publish_only_its_own_state_and_read_only_its_own_set_and_cmd(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1", "bay-2"])
    blocks = (tmp_path / "acl").read_text().split("\n\n")[1:]
    assert blocks[0].splitlines() == ["user evse_server", "topic readwrite evse/#",
                                      "topic readwrite loadgroup/#"]
    assert blocks[1].splitlines() == ["user evse_admin", "topic write evse/+/cmd",
                                      "topic read evse/+/state", "topic read evse/+/online",
                                      "topic read loadgroup/#"]
    assert blocks[2].splitlines() == ["user bay-1", "topic write evse/bay-1/state",
                                      "topic write evse/bay-1/online", "topic read evse/bay-1/set",
                                      "topic read evse/bay-1/cmd"]
    conf = (tmp_path / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf and "listener 8883" in conf
    assert "use_username_as_clientid true" in conf
    assert "allow_anonymous true" not in conf


def test_broker_certificate_names_every_host_and_chains_to_the_ca(tmp_path):
    secure.setup(tmp_path, HOSTS, [])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "broker.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(n.value) for n in san) == sorted(HOSTS)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_charger_without_a_time_sync_still_accepts_the_broker_certificate(tmp_path):
    """An ESP32 without NTP believes it is 2000-01-01 at power-on, and
    MicroPython >= 1.22 checks certificate dates."""
    secure.setup(tmp_path, HOSTS, [])
    for name in ("ca.pem", "broker.pem"):
        cert = x509.load_pem_x509_certificate((tmp_path / name).read_bytes())
        assert cert.not_valid_before_utc.isoformat() == "2000-01-01T00:00:00+00:00"
        assert cert.not_valid_after_utc.year >= 2030


def test_running_setup_again_never_locks_out_a_provisioned_charger(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1", "bay-2"])
    before = passwords(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    broker = (tmp_path / "broker.pem").read_bytes()
    rep = secure.setup(tmp_path, HOSTS, ["bay-1", "bay-2", "bay-3"])
    after = passwords(tmp_path)
    assert not rep.created_ca and not rep.issued_broker_cert and rep.added == ["bay-3"]
    assert (tmp_path / "ca.pem").read_bytes() == ca and (tmp_path / "broker.pem").read_bytes() == broker
    assert {k: after[k] for k in before} == before


def test_removed_member_loses_its_account_and_rotation_renews_only_one(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1", "bay-2"])
    before = passwords(tmp_path)
    rep = secure.setup(tmp_path, HOSTS, ["bay-1"], rotate=["bay-1"])
    after = passwords(tmp_path)
    assert rep.removed == ["bay-2"] and rep.rotated == ["bay-1"]
    assert "bay-2" not in after and "bay-2" not in (tmp_path / "acl").read_text()
    assert not any(line.startswith("bay-2:") for line in (tmp_path / "passwd").read_text().splitlines())
    assert after["bay-1"] != before["bay-1"] and after["evse_server"] == before["evse_server"]


def test_new_host_name_reissues_the_broker_certificate_under_the_same_ca(tmp_path):
    secure.setup(tmp_path, ["broker.lan"], [])
    ca = (tmp_path / "ca.pem").read_bytes()
    rep = secure.setup(tmp_path, ["broker.lan", "10.0.0.2"], [])
    assert rep.issued_broker_cert and not rep.created_ca and (tmp_path / "ca.pem").read_bytes() == ca


def test_half_a_ca_is_refused_rather_than_replaced(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1"])
    (tmp_path / "ca.key").unlink()
    ca = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(secure.SetupError, match="incomplete or unreadable"):
        secure.setup(tmp_path, HOSTS, ["bay-1"])
    assert (tmp_path / "ca.pem").read_bytes() == ca and not (tmp_path / "ca.key").exists()


@pytest.mark.parametrize("host", ["", "bad host", "-x.lan", "a..b", "x" * 254, "broker.lan.",
                                  "127.0.0.256", "10.0.0", "1.2.3.4.5"])
def test_bad_host_name_is_refused_before_anything_is_written(tmp_path, host):
    with pytest.raises(secure.SetupError):
        secure.setup(tmp_path / "d", [host], ["bay-1"])
    assert not (tmp_path / "d").exists()


def test_unknown_account_to_rotate_is_refused(tmp_path):
    with pytest.raises(secure.SetupError, match="no such account"):
        secure.setup(tmp_path / "d", HOSTS, ["bay-1"], rotate=["bay-9"])
    assert not (tmp_path / "d").exists()


def run_cli(tmp_path, *argv):
    return cli.main(["--db", str(tmp_path / "s.db"), *argv])


def test_cli_sets_up_accounts_for_every_member_of_every_group(tmp_path, capsys):
    assert run_cli(tmp_path, "group", "create", "garage", "--breaker", "50") == 0
    assert run_cli(tmp_path, "group", "create", "barn", "--breaker", "30") == 0
    assert run_cli(tmp_path, "member", "add", "garage", "bay-1", "--rating", "32") == 0
    assert run_cli(tmp_path, "member", "add", "barn", "barn-1", "--rating", "16") == 0
    capsys.readouterr()
    assert run_cli(tmp_path, "broker-setup", "--dir", str(tmp_path / "b"), "--host", "broker.lan") == 0
    out = capsys.readouterr().out
    assert "accounts      4 (evse_server, evse_admin and 2 charger(s))" in out
    assert "mqtts://broker.lan:8883" in out
    assert sorted(passwords(tmp_path / "b")) == ["barn-1", "bay-1", "evse_admin", "evse_server"]


def test_cli_bad_host_exits_1_with_a_message_and_writes_nothing(tmp_path, capsys):
    assert run_cli(tmp_path, "broker-setup", "--dir", str(tmp_path / "b"), "--host", "no way") == 1
    assert "not a DNS name or an IP address" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_server_refuses_a_password_without_a_user(tmp_path):
    class Args:
        username = None
        password = "x"
        password_env = password_file = cafile = None
        tls = False
    with pytest.raises(secure.SetupError, match="without --username"):
        secure.configure_client(object(), Args())


STATE = {"v": 1, "seq": 3, "state": "C", "pilot_a": 20, "measured_a": 19.5, "ack_seq": 1,
         "ack_epoch": 1, "offline_a": 8, "start_a": 8, "t_wd_s": 30, "session_wh": 10}


def test_state_claiming_another_chargers_id_is_refused():
    with pytest.raises(ValueError, match="says it is from 'bay-1'"):
        parse_state(json.dumps(dict(STATE, id="bay-1")).encode(), "bay-2")
    assert parse_state(json.dumps(dict(STATE, id="bay-2")).encode(), "bay-2").measured_a == 19.5
    assert parse_state(json.dumps(STATE).encode(), "bay-2").measured_a == 19.5   # firmware < 0.5


def test_server_ignores_a_report_on_a_topic_that_is_not_the_senders(tmp_path):
    db = tmp_path / "s.db"
    with GroupStore(str(db)) as store:
        store.create_group("garage", 50, 40)
        store.add_member("garage", "bay-1", 32)
        store.add_member("garage", "bay-2", 32)
    with GroupStore(str(db)) as store:
        svc = Service(store, out=lambda s: None)
        svc.reload(0.0)
        alloc = svc.allocators["garage"]
        svc.handle("evse/bay-2/state", json.dumps(dict(STATE, id="bay-1")).encode(), 1.0)
        assert svc.rejected == 1 and alloc.members["bay-2"].report is None
        svc.handle("evse/bay-2/state", json.dumps(dict(STATE, id="bay-2")).encode(), 1.0)
        assert svc.rejected == 1 and alloc.members["bay-2"].report.measured_a == 19.5


def test_two_setups_at_once_leave_one_consistent_ca(tmp_path):
    """Found by review: concurrent runs left ca.key from one run beside
    ca.pem from another, and a later broker certificate chained to neither."""
    from concurrent.futures import ThreadPoolExecutor

    for round_ in range(3):
        d = tmp_path / str(round_)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: secure.setup(d, HOSTS, ["bay-1"]), range(6)))
        key, ca, created = secure.make_ca(d)
        assert not created
        cert = x509.load_pem_x509_certificate((d / "broker.pem").read_bytes())
        cert.verify_directly_issued_by(ca)


def test_ca_key_that_is_not_the_certificates_is_refused(tmp_path):
    secure.setup(tmp_path / "a", HOSTS, [])
    secure.setup(tmp_path / "b", HOSTS, [])
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(secure.SetupError, match="not the key of ca.pem"):
        secure.setup(tmp_path / "a", HOSTS, [])


def test_first_run_cut_after_the_key_makes_a_new_ca_on_the_next_run(tmp_path):
    secure.setup(tmp_path, HOSTS, ["bay-1"])
    (tmp_path / "ca.pem").unlink()       # as if cut between writing ca.key and ca.pem
    rep = secure.setup(tmp_path, HOSTS, ["bay-1"])
    assert rep.created_ca and rep.issued_broker_cert
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "broker.pem").read_bytes()).verify_directly_issued_by(ca)


def test_broker_certificate_from_another_ca_of_the_same_name_is_reissued(tmp_path):
    """Every CA broker-setup makes has the same name: the issuer's name alone
    must not make a broker certificate look current."""
    secure.setup(tmp_path / "a", HOSTS, [])
    secure.setup(tmp_path / "b", HOSTS, [])
    for name in ("broker.pem", "broker.key"):
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    assert secure.setup(tmp_path / "a", HOSTS, []).issued_broker_cert
    ca = x509.load_pem_x509_certificate((tmp_path / "a" / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "a" / "broker.pem").read_bytes()).verify_directly_issued_by(ca)


def test_broker_group_reads_the_broker_files_but_never_the_ca_key_or_passwords(tmp_path):
    import grp
    import os

    group = grp.getgrgid(os.getgid()).gr_name
    secure.setup(tmp_path / "b", HOSTS, ["bay-1"], broker_group=group)
    d = tmp_path / "b"
    for name in secure.BROKER_FILES:
        st = (d / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, os.getgid()), name
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "passwords").stat().st_mode) == 0o700


def test_existing_directory_keeps_its_mode_and_a_symlink_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    secure.setup(d, HOSTS, [])
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(secure.SetupError, match="symbolic link"):
        secure.setup(tmp_path / "link", HOSTS, [])


@pytest.mark.parametrize("prefix", ["evse/#", "e+", "has space", "two\nlines", "", "x" * 33])
def test_topic_prefix_that_could_widen_the_acl_is_refused(tmp_path, prefix):
    with pytest.raises(secure.SetupError, match="--prefix"):
        secure.setup(tmp_path / "d", HOSTS, ["bay-1"], prefix=prefix)
    assert not (tmp_path / "d").exists()


def test_flood_of_refused_states_cannot_fill_the_servers_log(tmp_path):
    db = tmp_path / "s.db"
    with GroupStore(str(db)) as store:
        store.create_group("garage", 50, 40)
        store.add_member("garage", "bay-2", 32)
    lines = []
    with GroupStore(str(db)) as store:
        svc = Service(store, out=lines.append)
        svc.reload(0.0)
        bad = json.dumps(dict(STATE, id="bay-1")).encode()
        for i in range(100):
            svc.handle("evse/bay-2/state", bad, 1.0 + i * 0.05)     # 100 in 5 s
        svc.handle("evse/bay-2/state", bad, 11.5)
    assert svc.rejected == 101
    assert [x for x in lines if x.startswith("ignored")] == [
        "ignored state from bay-2: it says it is from 'bay-1'",
        "ignored state from bay-2: it says it is from 'bay-1' (99 more since the last one)"]
