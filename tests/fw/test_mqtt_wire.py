"""The MQTT link's socket layer against the exact umqtt.simple the image
freezes (1.7.0, micropython-lib at the commit MicroPython v1.28.0 pins), byte
for byte. The broker's side is a script of fixtures written from MQTT 3.1.1
(OASIS, sections 3.1-3.14); every read returns one byte, so every packet
arrives in pieces. On the device runtime the client is the frozen module; on
CPython it is ``lib/umqtt/simple.py``, the same file by SHA-256.

The hazard: umqtt.simple 1.7.0's ``connect()`` calls ``sock.settimeout()``,
which the link's bounded socket lacked. Every connect failed and the charger
stayed on its offline current for ever, with no load sharing (issue 12)."""
from fakes import FakeClock, FakeNet

from firmware.net import mqtt as mqtt_link
from firmware import start

TOPICS = start.topics({"topic_prefix": "evse", "charger_id": "garage-1"})

# What the client sends (MQTT 3.1.1 §3.1, §3.8, §3.3).
CONNECT_KEEPALIVE_30 = (
    b"\x10\x2d" b"\x00\x04MQTT\x04"
    b"\x2e"                                   # clean session, will QoS 1, will retained
    b"\x00\x1e"                               # keepalive 30 s
    b"\x00\x08garage-1" b"\x00\x14evse/garage-1/online" b"\x00\x010")
SUBSCRIBE_SET = b"\x82\x16\x00\x01\x00\x11evse/garage-1/set\x01"
SUBSCRIBE_CMD = b"\x82\x16\x00\x02\x00\x11evse/garage-1/cmd\x01"
ONLINE_1 = b"\x33\x19\x00\x14evse/garage-1/online\x00\x03" b"1"

# What the broker sends (§3.2, §3.9, §3.4).
CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_IDENTIFIER_REJECTED = b"\x20\x02\x00\x02"
SUBACK_1 = b"\x90\x03\x00\x01\x01"
SUBACK_2 = b"\x90\x03\x00\x02\x01"
PUBACK_3 = b"\x40\x02\x00\x03"
SETPOINT = b'{"v":1,"epoch":1,"seq":5,"current_a":16}'
SET_QOS1_PID_7 = bytes([0x32, 2 + 17 + 2 + len(SETPOINT)]) + b"\x00\x11evse/garage-1/set\x00\x07" + SETPOINT
SET_RETAINED = bytes([0x31, 2 + 17 + len(SETPOINT)]) + b"\x00\x11evse/garage-1/set" + SETPOINT
PINGRESP = b"\xd0\x00"


def _link(keepalive_s=30):
    clock = FakeClock()
    net = FakeNet(clock, chunk=1)
    link = mqtt_link.MqttLink("garage-1", "broker.local", 1883, TOPICS, keepalive_s,
                              io_timeout_ms=2000, clock=clock, client_factory=lambda *a: None)
    link.client_factory = mqtt_link.umqtt_factory(link, net, net.poll)
    return link, net, clock


def test_charger_connects_with_the_image_umqtt_simple_so_load_sharing_works():
    link, net, _clock = _link()
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    link.step()
    assert link.last_error is None, link.last_error
    assert link.connected and link.connects == 1
    assert net.addr == ("broker.local", 1883)
    assert bytes(net.sent) == CONNECT_KEEPALIVE_30 + SUBSCRIBE_SET + SUBSCRIBE_CMD + ONLINE_1
    assert not net.inbound


def test_setpoint_in_pieces_reaches_the_control_loop_and_is_acknowledged():
    link, net, _clock = _link()
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    link.step()
    net.sent = bytearray()
    net.inbound += SET_QOS1_PID_7
    link.step()
    assert link.take() == [("set", SETPOINT)]
    assert bytes(net.sent) == b"\x40\x02\x00\x07"          # PUBACK, pid 7


def test_retained_setpoint_is_never_obeyed():
    # DESIGN.md §4: set is never retained; a retained one is a stale leftover.
    link, net, _clock = _link()
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    link.step()
    net.inbound += SET_RETAINED
    link.step()
    assert not link.take() and link.retained_dropped == 1


def test_state_goes_out_retained_qos0_and_pingresp_is_seen():
    link, net, clock = _link()
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    link.step()
    net.sent = bytearray()
    assert link.offer_state(b'{"state":"C"}')
    clock.advance(15000)                                    # keepalive / 2: a PINGREQ
    link.step()
    assert bytes(net.sent) == b"\x31\x22\x00\x13evse/garage-1/state" b'{"state":"C"}' + b"\xc0\x00"
    net.inbound += PINGRESP
    link.step()
    assert link.stats()["pingresp_age_ms"] == 0


def test_broker_refusing_a_long_keepalive_never_locks_the_charger_out():
    # mosquitto's max_keepalive answers "identifier rejected" (code 2).
    link, net, clock = _link(keepalive_s=120)
    net.inbound += CONNACK_IDENTIFIER_REJECTED
    link.step()
    assert not link.connected and link.last_connack == 2 and net.closed == 1
    assert net.sent[10:12] == b"\x00\x78"                    # asked for 120 s
    assert link.keepalive_s == 60
    net.sent = bytearray()
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    clock.advance(1000)                                     # the first backoff
    link.step()
    assert link.connected and net.sent[10:12] == b"\x00\x3c"  # then 60 s


def test_silent_broker_costs_the_link_at_most_its_io_timeout():
    # No CONNACK ever: the link thread gives up after io_timeout_ms (C4).
    link, net, clock = _link()
    t0 = clock.ticks_ms()
    link.step()
    assert not link.connected and "110" in link.last_error
    assert 2000 <= clock.ticks_diff(clock.ticks_ms(), t0) <= 2100


def test_non_ascii_broker_password_gives_a_well_formed_connect():
    # umqtt counts characters; the wire counts UTF-8 bytes. "café" is 5 bytes:
    # sent with a length of 4, the broker reads garbage and never lets it in.
    clock = FakeClock()
    net = FakeNet(clock, chunk=1)
    link = mqtt_link.MqttLink("garage-1", "broker.local", 1883, TOPICS, 30, user="garage-1",
                              password="caf\u00e9", io_timeout_ms=2000, clock=clock,
                              client_factory=lambda *a: None)
    link.client_factory = mqtt_link.umqtt_factory(link, net, net.poll)
    net.inbound += CONNACK_OK + SUBACK_1 + SUBACK_2 + PUBACK_3
    link.step()
    assert link.connected, link.last_error
    connect = bytes(net.sent[:2 + net.sent[1]])
    assert connect.endswith(b"\x00\x08garage-1" + b"\x00\x05caf\xc3\xa9")
    assert connect[9] & 0xC0 == 0xC0                       # user name and password flags
