"""The load-group MQTT service: reports in, setpoints out (DESIGN.md §4).

It subscribes to every member's ``<prefix>/<id>/state`` and ``online``,
feeds the reports to one :class:`~evse_tools.server.allocator.Allocator` per
group, publishes the setpoints it decides on ``<prefix>/<id>/set`` (QoS 1,
never retained) and each group's ``loadgroup/<group>/state`` (QoS 1,
retained), and records every setpoint in the database so that a restarted
server can assume the worst (S6).

At start it clears any retained message on the members' ``set`` and ``cmd``
topics (a zero-length retained publish) and takes a new epoch, larger than
any it used before. paho-mqtt's network thread only queues what arrives; all
decisions happen on the main loop, every ``STEP_S``.
"""
from __future__ import annotations

import json
import math
import queue
import signal
import sys
import time

import paho.mqtt.client as mqtt

from evse_tools.server.allocator import Allocator, GroupConfig, Member, Report, ROTATE_S
from evse_tools.server.ledger import offline_possible, start_possible
from evse_tools.server import secure
from evse_tools.server.db import GroupStore

STEP_S = 0.2
"""Allocation period, s."""
GROUP_STATE_S = 1.0
"""Longest time between two group-state messages, s."""
RELOAD_S = 5.0
"""How often the installer's changes in the database are picked up, s."""
STATES = ("A", "B", "C", "D", "E", "F")
REJECT_LOG_S = 10.0
"""Shortest time between two "ignored state" log lines for one member, s."""


def parse_state(payload: bytes, topic_id: str | None = None) -> Report:
    """Validate a charger's state message; raise ValueError saying what is wrong.

    ``topic_id``: the charger id in the topic. A message whose ``id`` field
    names another charger is refused: a charger that publishes on another's
    topic (which the broker's ACL already forbids, see
    :mod:`evse_tools.server.secure`) must not move that charger's budget.
    Firmware before 0.5 sends no ``id``; such a message is taken on the
    topic's word."""
    if len(payload) > 2048:
        raise ValueError("state message longer than 2048 bytes")
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {type(exc).__name__}") from None
    # type() first: true == 1 and 1.0 == 1 in Python, and neither is v 1.
    if not isinstance(msg, dict) or type(msg.get("v")) is not int or msg["v"] != 1:
        raise ValueError("not a v1 state object")
    if topic_id is not None and "id" in msg and msg["id"] != topic_id:
        raise ValueError(f"it says it is from {str(msg['id'])[:40]!r}")
    if msg.get("state") not in STATES:
        raise ValueError(f"bad state {msg.get('state')!r}")

    def amps(name, required=True):
        x = msg.get(name)
        if x is None and not required:
            return None
        if type(x) not in (int, float) or not 0 <= x <= 1000 or not math.isfinite(float(x)):
            raise ValueError(f"bad {name} {str(x)[:40]}")
        return float(x)

    def stored_amps(name):
        # What a charger can store (DESIGN.md C3/S3): 0 or 6..80 A. These
        # feed the member's worst case (S1), so nothing else is believed.
        x = amps(name, False)
        if x is not None and x != 0 and not 6 <= x <= 80:
            raise ValueError(f"bad {name} {x:g} (0 or 6..80 A)")
        return x

    def count(name):
        x = msg.get(name)
        if x is None:
            return None
        if type(x) is not int or x < 0 or x > 1 << 62:
            raise ValueError(f"bad {name} {str(x)[:40]}")
        return x

    fault = msg.get("fault")
    if fault is not None and not isinstance(fault, str):
        raise ValueError(f"bad fault {fault!r}")
    relay = msg.get("relay")
    return Report(state=msg["state"], measured_a=amps("measured_a"), pilot_a=amps("pilot_a"),
                  ack_seq=count("ack_seq"), ack_epoch=count("ack_epoch"),
                  offline_a=stored_amps("offline_a"), start_a=stored_amps("start_a"),
                  fault=fault, relay=relay if isinstance(relay, bool) else None,
                  session_wh=count("session_wh") or 0, lockout=msg.get("lockout") is True,
                  t_wd_s=count("t_wd_s"),
                  limit_by=msg.get("limit_by") if isinstance(msg.get("limit_by"), str) else None)


class Service:
    """The running service for the groups in ``store`` (all, or ``only``)."""

    def __init__(self, store: GroupStore, prefix: str = "evse", only: list[str] | None = None,
                 rotate_s: float = ROTATE_S, out=print, clock=time.monotonic):
        self.store = store
        self.prefix = prefix
        self.only = only
        self.rotate_s = rotate_s
        self.out = out
        self.clock = clock
        self.inbox: queue.Queue = queue.Queue()
        self.allocators: dict[str, Allocator] = {}
        self.member_group: dict[str, str] = {}
        self.epoch = self._new_epoch()
        self.seq = [0]          # one seq counter for every group of this epoch
        self.rejected = 0
        self.errors = 0
        self._reject_log: dict[str, tuple[float, int]] = {}   # member -> (last logged, unlogged)
        self._config_due: dict[str, int] = {}
        self._config_sent: dict[str, float] = {}
        self._last_group_state: dict[str, float] = {}
        self._last_reload = -1e9

    def _new_epoch(self) -> int:
        used = [m.last_epoch for g in self.store.list_groups() for m in g.members
                if m.last_epoch is not None]
        return max([int(time.time())] + [e + 1 for e in used])

    def _groups(self):
        groups = self.store.list_groups()
        return [g for g in groups if not self.only or g.name in self.only]

    def reload(self, now: float) -> None:
        """Pick up groups and members the installer added, changed or removed."""
        self._last_reload = now
        seen = set()
        for g in self._groups():
            seen.add(g.name)
            cfg = GroupConfig(g.name, float(g.breaker_a), float(g.limit_a), float(g.t_wd_s),
                              g.fair_offline, self.rotate_s)
            alloc = self.allocators.get(g.name)
            if alloc is None:
                members = []
                for m in g.members:
                    # S6: assume max(last setpoint, offline current) until it
                    # reports, and the worst case the ledger had then: its EV
                    # may still follow a higher setpoint sent just before.
                    members.append(Member(m.id, m.unit_rating_a, offline_a=m.offline_a,
                                          start_a=m.start_a,
                                          assumed_a=max(m.last_setpoint_a or 0.0, m.offline_a,
                                                        m.worst_a or 0.0)))
                alloc = Allocator(cfg, members, self.epoch, now, restarted=True, seq_counter=self.seq)
                self.allocators[g.name] = alloc
                self.out(f"group {g.name}: breaker {g.breaker_a} A, limit {g.limit_a} A, "
                         f"{len(members)} members, epoch {self.epoch}")
            else:
                alloc.group = cfg
                ids = {m.id for m in g.members}
                for m in g.members:
                    if m.id not in alloc.members:
                        # A new member: until it reports, it may draw its offline current.
                        alloc.add(Member(m.id, m.unit_rating_a, offline_a=m.offline_a,
                                         start_a=m.start_a, assumed_a=m.offline_a), now)
                    else:
                        alloc.members[m.id].unit_rating_a = m.unit_rating_a
                for mid in list(alloc.members):
                    if mid not in ids:
                        # Told 0 A, offline 0 and start 0, and kept in the
                        # ledger until any lease it holds has run out.
                        alloc.remove(mid, now)
            for m in g.members:
                self.member_group[m.id] = g.name
        for name in list(self.allocators):
            if name not in seen:
                del self.allocators[name]
        for alloc in self.allocators.values():
            alloc.expire_removed(now)
        self.member_group = {m: g for m, g in self.member_group.items()
                             if g in self.allocators and m in self.allocators[g].members}

    # -- MQTT callbacks (paho's thread): only queue --------------------------------

    def on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self.out(f"broker refused the connection: {reason_code}")
            return
        client.subscribe([(f"{self.prefix}/+/state", 1), (f"{self.prefix}/+/online", 1)])
        for mid in self.member_group:
            # §4: set and cmd are never retained; clear any left by someone else.
            client.publish(f"{self.prefix}/{mid}/set", b"", qos=1, retain=True)
            client.publish(f"{self.prefix}/{mid}/cmd", b"", qos=1, retain=True)
        self.out("connected to the broker")

    def on_message(self, client, userdata, msg):
        if msg.retain and msg.topic.endswith("/state"):
            return   # a replay of an old report is no sign of life (S6); a fresh one comes within 5 s
        self.inbox.put((msg.topic, msg.payload, self.clock()))

    # -- main loop ---------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, at: float) -> None:
        """Apply one received message."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix:
            return
        mid, kind = parts[1], parts[2]
        group = self.member_group.get(mid)
        if group is None or not payload:
            return
        if kind == "online":
            if payload in (b"0", b"1"):      # anything else is no news (§4: "1" or "0")
                self.allocators[group].on_online(mid, payload == b"1")
            return
        if kind != "state":
            return
        try:
            report = parse_state(payload, mid)
        except ValueError as exc:
            self.rejected += 1
            self._log_rejection(mid, exc, at)
            return
        alloc = self.allocators[group]
        alloc.on_report(mid, report, at)
        want = int(alloc.group.t_wd_s)
        if report.t_wd_s is not None and report.t_wd_s != want:
            self._config_due[mid] = want   # its watchdog must match the group's

    def _log_rejection(self, mid: str, exc: Exception, at: float) -> None:
        """Log a refused state at most once per :data:`REJECT_LOG_S` per member
        (a flood of bad reports must not fill the disk), with the count of
        those not logged since."""
        last, quiet = self._reject_log.get(mid, (-1e9, 0))
        if at - last < REJECT_LOG_S:
            self._reject_log[mid] = (last, quiet + 1)
            return
        more = f" ({quiet} more since the last one)" if quiet else ""
        self.out(f"ignored state from {mid}: {exc}{more}")
        self._reject_log[mid] = (at, 0)

    def step(self, client, now: float) -> None:
        """One round: reload, take reports, allocate, publish."""
        if now - self._last_reload >= RELOAD_S:
            self.reload(now)
        while True:
            try:
                topic, payload, at = self.inbox.get_nowait()
            except queue.Empty:
                break
            try:
                self.handle(topic, payload, at)
            except Exception as exc:  # one bad message must not stop the service
                self.errors += 1
                self.out(f"error handling {topic}: {type(exc).__name__}: {exc}")
        for mid, t_wd in list(self._config_due.items()):
            if now - self._config_sent.get(mid, -1e9) >= 30:
                self._config_sent[mid] = now
                client.publish(f"{self.prefix}/{mid}/cmd", json.dumps(
                    {"v": 1, "cmd": "config", "settings": {"t_wd_s": t_wd}}), qos=1)
                self.out(f"config {mid}: t_wd_s {t_wd} s (the group's)")
        self._config_due.clear()
        wall = time.time()
        sent = []
        for name, alloc in self.allocators.items():
            for cmd in alloc.step(now):
                client.publish(f"{self.prefix}/{cmd.member}/set", json.dumps(cmd.payload()), qos=1)
                m = alloc.members[cmd.member]
                self.out(f"set {cmd.member} {cmd.current_a:g} A ({m.binding}) offline "
                         f"{cmd.offline_a:g} A start {cmd.start_a:g} A seq {cmd.seq}")
                # The database keeps the highest offline and start currents
                # the charger may store (sent, or stored and not yet
                # replaced): a restarted server must not take an unacknowledged
                # lower one as stored (the review: 32 A on a 30 A breaker).
                sent.append((cmd.member, cmd.current_a, cmd.seq, cmd.epoch, wall,
                             offline_possible(m), start_possible(m), alloc.worst_a(m, now)))
        if sent:
            # One transaction for the round. A member removed from the database
            # meanwhile is skipped: the ledger keeps it until its lease ends.
            self.store.record_sent(sent)
            if now - self._last_group_state.get(name, -1e9) >= GROUP_STATE_S:
                self._last_group_state[name] = now
                client.publish(f"loadgroup/{name}/state", json.dumps(alloc.group_state(now)),
                               qos=1, retain=True)


def run(store: GroupStore, args) -> int:
    """``evse-server run``: serve until SIGINT/SIGTERM. Returns the exit status."""
    svc = Service(store, args.prefix, args.group, getattr(args, "rotate_s", None) or ROTATE_S,
                  out=lambda s: print(time.strftime("%H:%M:%S"), s, flush=True))
    svc.reload(svc.clock())
    if not svc.allocators:
        print("error: no load group to serve (create one with `evse-server group create`)",
              file=sys.stderr)
        return 1
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"evse-server-{svc.epoch}",
                         protocol=mqtt.MQTTv311)
    try:
        secure.configure_client(client, args)
    except secure.SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "username", None) and not (getattr(args, "tls", False) or getattr(args, "cafile", None)):
        print("warning: without --tls/--cafile the broker password crosses the network in the clear",
              file=sys.stderr)
    client.on_connect = svc.on_connect
    client.on_message = svc.on_message
    # Say why the broker cannot be reached (a TLS certificate refused, a
    # wrong port), once per change: paho retries quietly otherwise.
    said = [None]

    def say(text):
        if said[0] != text:
            said[0] = text
            svc.out(text)

    client.on_connect_fail = lambda c, u: say("cannot reach the broker at %s:%d (retrying)"
                                              % args.broker)
    client.on_disconnect = lambda c, u, f, rc, p=None: say(f"disconnected from the broker: {rc}")
    client.reconnect_delay_set(1, 30)
    host, port = args.broker
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        client.connect_async(host, port, keepalive=30)
        client.loop_start()
        while not stop:
            try:
                svc.step(client, svc.clock())
            except Exception as exc:  # keep serving: the chargers' watchdogs are the backstop
                svc.errors += 1
                svc.out(f"error in allocation round: {type(exc).__name__}: {exc}")
            time.sleep(STEP_S)
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
