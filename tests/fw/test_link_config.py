"""The charger's TLS configuration (DESIGN.md §4 "Security"): the CA it
trusts comes from the ``ca_cert`` secret, and a charger meant for TLS never
talks plain MQTT, which would hand its broker password to the network."""
from fakes import FakeClock
from harness import make_store, raises

from firmware.net import mqtt as mqtt_link
from firmware.core import settings
from firmware import start

# Two throwaway CA certificates (EC P-256, made by evse-server broker-setup;
# their keys were discarded).
CA_A = """-----BEGIN CERTIFICATE-----
MIIBYjCCAQigAwIBAgIUT3xR/lcqXjVFSP6VnUgZtLlTKF8wCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSRVZTRSBsb2FkLWdyb3VwIENBMB4XDTAwMDEwMTAwMDAwMFoX
DTQ2MTEyNTEyMDg0NlowHTEbMBkGA1UEAwwSRVZTRSBsb2FkLWdyb3VwIENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2YmK8pvTa4zkpii9905xyhcRhRXaX8lq
0QHOHS/xuztirHxtiNuQWh573v5oVv3+G15Vk2vsJ1uvTvYYm/TjnKMmMCQwEgYD
VR0TAQH/BAgwBgEB/wIBADAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwIDSAAw
RQIgM1bwspNzlj8vCpZziX7ckKgmPkszeAblOdXpBs+rK0YCIQDnETAI2o1clMZl
R/JE6FwiRYXodz5UFAAfjLiWAV8fJQ==
-----END CERTIFICATE-----
"""
CA_B = """-----BEGIN CERTIFICATE-----
MIIBYjCCAQigAwIBAgIUJYuh3o7eP5uKWz6Jh8v+A0HEveMwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSRVZTRSBsb2FkLWdyb3VwIENBMB4XDTAwMDEwMTAwMDAwMFoX
DTQ2MTEyNTEyMDg0NlowHTEbMBkGA1UEAwwSRVZTRSBsb2FkLWdyb3VwIENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENf3s9UAAk79LnZpdAGZzlMgnpkFJIIY0
uQkqTxIJdSpbVakiLTbdVuLufUrOCqxNrjTnjI1IpQT7xyHIlfCfhKMmMCQwEgYD
VR0TAQH/BAgwBgEB/wIBADAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwIDSAAw
RQIgJ5Li7uBpfK6cdmuwjjjaPViNkVI4n1tNuxZ4WWw2vIYCIQCq3u8nChR1pkoU
ppkZjPAGs0q5cDVj2+TJrtDgA4Rkbw==
-----END CERTIFICATE-----
"""


class _Charger:
    def __init__(self):
        self.clock = FakeClock()
        self.lines = []

    def log(self, text):
        self.lines.append(text)


def _link_up(values, secrets):
    cfg = make_store(values)
    sec = settings.Settings("secrets.json", settings.SECRETS, cfg.fs)
    for k in secrets:
        sec.values[k] = secrets[k]
    return start.link_factory(cfg, sec)


def test_pem_ca_becomes_der_for_mbedtls():
    ders = mqtt_link.pem_certificates(CA_A)
    assert len(ders) == 1 and ders[0][0] == 0x30 and 300 < len(ders[0]) < 500


def test_two_cas_are_both_trusted_so_a_ca_can_be_replaced_without_a_gap():
    ders = mqtt_link.pem_certificates(CA_A + CA_B)
    assert len(ders) == 2 and ders[0] != ders[1]


def test_pem_with_windows_line_ends_and_junk_around_still_decodes():
    text = "junk\r\n" + CA_A.replace("\n", "\r\n") + "more junk"
    assert mqtt_link.pem_certificates(text) == mqtt_link.pem_certificates(CA_A)


def test_broken_ca_certificate_is_refused_not_half_used():
    end = "-----END CERTIFICATE-----"
    for bad in ("", "hello", CA_A.replace(end, ""), CA_A[:200] + end,
                "-----BEGIN CERTIFICATE-----\n!!!!\n" + end, CA_A + CA_B.replace(end, "")):
        raises(ValueError, mqtt_link.pem_certificates, bad)


def test_tls_with_an_unusable_ca_runs_without_a_server_never_plain_mqtt():
    make, why = _link_up({"mqtt_host": "broker.lan", "mqtt_tls": True}, {"ca_cert": "not a cert"})
    assert make is None
    assert "CA certificate is unusable" in why


def test_provisioned_ca_with_tls_off_never_sends_the_password_in_the_clear():
    make, why = _link_up({"mqtt_host": "broker.lan", "mqtt_tls": False},
                         {"ca_cert": CA_A, "mqtt_user": "bay-1", "mqtt_password": "s3cret"})
    assert make is None
    assert "not sending the broker password in the clear" in why


def test_unreadable_mqtt_tls_flag_never_means_plain_mqtt():
    cfg = make_store({"mqtt_host": "broker.lan", "mqtt_tls": "yes"})
    assert cfg["mqtt_tls"] is False and cfg.problems        # the default, with a problem noted
    sec = settings.Settings("secrets.json", settings.SECRETS, cfg.fs)
    make, why = start.link_factory(cfg, sec)
    assert make is None
    assert "not sending the broker password in the clear" in why


class MQTTException(Exception):
    """Named as umqtt.simple's, which the link recognises by name."""


class _RefusingClient:
    """A umqtt-like client whose broker refuses every CONNECT with ``code``."""

    def __init__(self, code, asked):
        self.code = code
        self.asked = asked

    def set_callback(self, cb):
        pass

    def set_last_will(self, *args):
        pass

    def connect(self):
        raise MQTTException(self.code)


def _refusing_link(code, keepalive_s):
    asked = []

    def factory(client_id, host, port, user, password, keepalive):
        asked.append(keepalive)
        return _RefusingClient(code, asked)

    topics = {"set": b"evse/b/set", "cmd": b"evse/b/cmd", "state": b"evse/b/state",
              "online": b"evse/b/online"}
    clock = FakeClock()
    link = mqtt_link.MqttLink("b", "broker", 1883, topics, keepalive_s, clock=clock,
                              client_factory=factory)
    return link, clock, asked


def test_broker_refusing_a_long_keepalive_does_not_lock_the_charger_out():
    """mosquitto refuses an MQTT 3.1.1 client asking for more than its
    max_keepalive with "identifier rejected" (2): ask for less next time."""
    link, clock, asked = _refusing_link(2, 600)
    for _ in range(6):
        link.step()
        clock.advance(61000)      # past any backoff
    assert asked == [600, 60, 30, 15, 10, 10]
    assert link.last_connack == 2 and not link.connected


def test_other_refusals_keep_the_keepalive():
    link, clock, asked = _refusing_link(5, 120)     # 5: not authorized
    for _ in range(3):
        link.step()
        clock.advance(61000)
    assert asked == [120, 120, 120]


def test_socket_error_numbers_are_not_taken_for_a_refusal():
    link, clock, asked = _refusing_link(2, 600)
    link.client_factory = lambda *a: _OsErrorClient()
    link.step()
    assert link.last_connack is None and link.keepalive_s == 600


class _OsErrorClient(_RefusingClient):
    def __init__(self):
        pass

    def connect(self):
        raise OSError(2)      # ENOENT, not CONNACK 2
