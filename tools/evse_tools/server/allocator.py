"""The load-group allocator: DESIGN.md §3 S1-S7 for one group.

Pure logic: the service feeds it charger reports and the time (``now``, s,
monotonic) and publishes the setpoint messages it returns. It joins two
parts that never reach into each other:

- the **ledger** (:mod:`evse_tools.server.ledger`, S1): what each member may
  draw at worst, from the offers its EV may still follow, its measured
  current and its fallback;
- the **planner** (:mod:`evse_tools.server.planner`, S3-S5): fair shares,
  taper, rotation, offline and start currents.

Each round (:meth:`Allocator.step`) it asks the planner what it wants and the
ledger what fits, then:

- **decreases first** (S2): whatever lowers a member's setpoint, offline or
  start current goes out at once;
- **raises within the breaker**: a raise goes out when the ledger's total
  with it stays within the breaker. When the whole raise does not fit, the
  member is raised at once by what fits (never to less than 6 A), recorded
  as ``breaker_transient``, and the rest follows as room appears;
- **damping**: no raise to a member within ``FOLLOW_S`` (the EV's 5 s
  response time of IEC 61851-1 Table A.6, plus a margin) of a decrease sent
  to it, recorded as ``ev_response``. An EV may still be following the
  higher pilot for that long, so a pilot flipped back and forth faster than
  that buys nothing and keeps the ledger's old level alive; the cost is at
  most that long before a member gets back what it gave up;
- **restart** (S6): a restarted server raises nobody until every member has
  reported (or T_wd plus a margin has passed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from evse_tools.server.ledger import (CONNECTED, DEFAULT_OFFLINE_A, DEFAULT_START_A, EV_RESPONSE_S,
                                      FOLLOW_S, MARGIN_S, MIN_A, STALE_S, GroupConfig, Ledger, Member,
                                      Report, Sent, effective, offline_possible)
from evse_tools.server.planner import (BREAKER_TRANSIENT, EV_DRAW, EV_RESPONSE, FAULT, GROUP_LIMIT,
                                       IDLE, MINIMUM_CURRENT, OFFLINE, REMOVED, RESTART, ROTATION,
                                       TAPER_HOLD_S, UNIT_RATING, Planner, offline_currents,
                                       water_fill)

__all__ = ["Allocator", "Command", "GroupConfig", "Member", "Report", "Sent", "offline_currents",
           "water_fill", "CONNECTED", "DEFAULT_OFFLINE_A", "DEFAULT_START_A", "EV_RESPONSE_S",
           "FOLLOW_S", "MARGIN_S", "MIN_A", "STALE_S", "ROTATE_S", "TAPER_HOLD_S", "BREAKER_TRANSIENT",
           "EV_DRAW", "EV_RESPONSE", "FAULT", "GROUP_LIMIT", "IDLE", "MINIMUM_CURRENT", "OFFLINE",
           "REMOVED", "RESTART", "ROTATION", "UNIT_RATING"]

ROTATE_S = 300.0
"""S4: shortest time between two rotation hand-overs (anti-flap), s."""
_EPS = 1e-9


@dataclass
class Command:
    """A setpoint message to publish on ``<prefix>/<member>/set`` (A)."""

    member: str
    seq: int
    epoch: int
    current_a: float
    offline_a: float
    start_a: float

    def payload(self) -> dict:
        """The §4 ``set`` payload."""
        return {"v": 1, "epoch": self.epoch, "seq": self.seq, "current_a": self.current_a,
                "offline_a": self.offline_a, "start_a": self.start_a}


class Allocator:
    """Allocates a group's current. ``members``: the group's members with
    their unit ratings (and, after a restart, the stored ``offline_a``/
    ``start_a``/``assumed_a``); ``epoch``: this server run's epoch (int);
    ``now``: start time, s; ``restarted``: True when the server starts with
    members that may be charging (S6); ``seq_counter``: a one-item list
    shared by every group of the epoch, so that a charger moved between
    groups never sees its seq go back."""

    def __init__(self, group: GroupConfig, members: list[Member], epoch: int, now: float,
                 restarted: bool = True, seq_counter: list | None = None):
        self.ledger = Ledger(group, members, epoch, now, restarted)
        self.planner = Planner(group)
        self.epoch = epoch
        self._seq = seq_counter if seq_counter is not None else [0]
        self.started_at = now
        self.restarted = restarted
        # A restarted server does not know what the last run lowered: no
        # raise within the EV's window of its start (damping, as after a
        # decrease).
        self._decreased_at: dict[str, float] = {m.id: now for m in members} if restarted else {}

    @property
    def group(self) -> GroupConfig:
        """The group's configuration; setting it reaches ledger and planner."""
        return self.ledger.group

    @group.setter
    def group(self, cfg: GroupConfig) -> None:
        self.ledger.group = cfg
        self.planner.group = cfg

    @property
    def members(self) -> dict[str, Member]:
        """Members by id (the ledger's records)."""
        return self.ledger.members

    # -- inputs ---------------------------------------------------------------

    def add(self, member: Member, now: float) -> None:
        """A member joined: until it reports, it may draw its offline current."""
        self.ledger.admit(member, now)

    def on_online(self, member_id: str, online: bool) -> None:
        """Take a member's ``online`` flag. ``"0"`` (its last will) does not
        lower its worst case, which only the T_wd silence does (S1); it only
        means its last state message is no sign of life after a restart (S6)."""
        m = self.members.get(member_id)
        if m is not None:
            m.online = online

    def on_report(self, member_id: str, report: Report, now: float) -> None:
        """Take a charger's state message, received at ``now`` (s)."""
        m = self.members.get(member_id)
        if m is None:
            return
        prev = m.report
        self.ledger.on_report(m, report, now)
        if prev is None or (prev.state in CONNECTED) != (report.state in CONNECTED):
            self.planner.session_changed(member_id)

    def remove(self, member_id: str, now: float) -> None:
        """The installer removed a member: it gets 0 A, offline and start 0,
        and stays in the ledger until any lease it holds has run out."""
        m = self.members.get(member_id)
        if m is not None and m.removed_at is None:
            m.removed_at = now

    def expire_removed(self, now: float) -> list[str]:
        """Drop removed members whose leases have run out; return their ids."""
        # Only once it can draw nothing: it has stored offline and start 0
        # and nothing it was offered can still be followed. A charger that
        # never heard of its removal still sits on the breaker with its
        # offline current, so it stays counted (the review: forgetting it
        # after T_wd put 32 A on a 30 A breaker).
        gone = [m.id for m in self.members.values() if m.removed_at is not None
                and now - m.removed_at > self.ledger.t_wd(m) + FOLLOW_S + MARGIN_S
                and self.ledger.worst_a(m, now) == 0]
        for mid in gone:
            del self.members[mid]
            self.planner.forget(mid)
            self._decreased_at.pop(mid, None)
        return gone

    # -- the ledger, for callers ------------------------------------------------

    def worst_a(self, m: Member, now: float) -> float:
        """S1: the most member ``m`` may draw at ``now``, A."""
        return self.ledger.worst_a(m, now)

    def ledger_a(self, now: float) -> float:
        """Sum of the members' worst cases, A (S1: at most the breaker)."""
        return self.ledger.total_a(now)

    def silent(self, m: Member, now: float) -> bool:
        """Member ``m`` runs on its offline current (see the ledger)."""
        return self.ledger.silent(m, now)

    # -- a round ----------------------------------------------------------------

    def step(self, now: float) -> list[Command]:
        """One allocation round: the setpoint messages to publish now.

        Decreases at once, raises within the breaker (partly when the whole
        raise does not fit), no raise within the EV's response window of a
        decrease, every member's setpoint repeated at least every T_wd / 3,
        and no raise while a restarted server waits for its members (S6)."""
        g = self.group
        led = self.ledger
        plan = self.planner.plan(led, now)
        waiting_restart = self.restarted and now - self.started_at <= g.t_wd_s + MARGIN_S and any(
            m.report is None or not m.online for m in self.members.values())
        if self.restarted and not waiting_restart:
            self.restarted = False
        # S3 at every instant: the offline currents stored sum to at most the
        # limit, so an offline raise waits until the decreases are stored.
        off_sum = sum(offline_possible(m) for m in self.members.values())
        wishes = {}
        for m in self.members.values():
            target, why = plan.targets[m.id]
            off = plan.offline.get(m.id, 0.0)
            cur_off = offline_possible(m)
            if off > cur_off:
                if waiting_restart or off_sum - cur_off + off > g.limit_a + _EPS:
                    off = cur_off
                else:
                    off_sum += off - cur_off
            wishes[m.id] = (target, off, plan.start[m.id], why)
        cmds: list[Command] = []
        raises = []
        for m in self.members.values():
            target, off, start, why = wishes[m.id]
            if led.stale(m, now):
                # Never heard from (a restarted server, S6), or gone quiet:
                # nothing is sent, so that no lease is renewed blindly.
                m.target_a, m.binding = 0.0, RESTART if self.restarted else OFFLINE
                continue
            last = m.last_sent()
            # What it offers now: the last setpoint, or after a restart what
            # its report shows (a lower target is a decrease, not a raise).
            now_a = last.current_a if last is not None else m.report.pilot_a if m.report else None
            if (led.projected_a(m, now, target, off, start) > led.worst_a(m, now) + _EPS
                    or now_a is None or effective(target, m) > effective(now_a, m) + _EPS):
                raises.append(m)
                continue
            self._send(m, target, off, start, why, now, cmds)
        total = led.total_a(now)
        for m in sorted(raises, key=lambda m: (led.worst_a(m, now), m.id)):
            target, off, start, why = wishes[m.id]
            before = led.worst_a(m, now)
            self._raise(m, target, off, start, why, now, waiting_restart, total, cmds)
            total += led.worst_a(m, now) - before
        return cmds

    def _raise(self, m: Member, target: float, off: float, start: float, why: str, now: float,
               waiting_restart: bool, total: float, cmds: list[Command]) -> None:
        """Raise ``m`` towards ``target`` as far as the ledger allows now."""
        led = self.ledger
        if waiting_restart:
            self._hold(m, off, start, RESTART, now, cmds)
            return
        last = m.last_sent()
        if (effective(target, m) > (effective(last.current_a, m) if last is not None else 0.0)
                and now - self._decreased_at.get(m.id, -1e18) < FOLLOW_S):
            self._hold(m, off, start, EV_RESPONSE, now, cmds)
            return
        room = led.room_for(m, now, total)
        if led.projected_a(m, now, target, off, start) <= room + _EPS:
            self._send(m, target, off, start, why, now, cmds)
            return
        # A partial raise: the most that fits, keeping the offline and start
        # currents it has (raising those needs room too), never below 6 A.
        keep_off, keep_start = self._kept(m, off, start)
        cur = effective(last.current_a, m) if last is not None else 0.0
        if (last is not None and effective(target, m) <= cur
                and led.projected_a(m, now, target, keep_off, keep_start) <= led.worst_a(m, now) + _EPS):
            # The setpoint itself does not rise (only an offline or start
            # current would): it goes out, the rest waits for room.
            self._send(m, target, keep_off, keep_start, why, now, cmds)
            return
        fit = math.floor(min(target, m.unit_rating_a, room) + _EPS)
        # An idle member's setpoint is its start current (C2): never a part of it.
        if (why != IDLE and fit >= MIN_A and fit > cur
                and led.projected_a(m, now, fit, keep_off, keep_start) <= room + _EPS):
            self._send(m, float(fit), keep_off, keep_start, BREAKER_TRANSIENT, now, cmds)
        else:
            self._hold(m, off, start, BREAKER_TRANSIENT, now, cmds)

    def _kept(self, m: Member, off: float, start: float) -> tuple[float, float]:
        """The offline and start currents to send while a raise waits: the
        lower of the wished and those already in place."""
        last = m.last_sent()
        keep_off = min(off, m.offline_a, last.offline_a if last else off)
        keep_start = min(start, m.start_a, last.start_a if last else start)
        return keep_off, keep_start

    def _hold(self, m: Member, off: float, start: float, why: str, now: float,
              cmds: list[Command]) -> None:
        """No raise for ``m`` now: keep its setpoint, let lower offline and
        start currents through, and renew its lease."""
        last = m.last_sent()
        r = m.report
        # Nothing sent yet in this epoch (a restarted server): keep what the
        # charger offers now, which the ledger already counts; never pause it.
        keep_off, keep_start = self._kept(m, off, start)
        if last is not None:
            keep = last.current_a
        elif r is not None and r.state in CONNECTED:
            keep = float(math.floor(min(r.pilot_a, m.unit_rating_a)))
        else:
            keep = keep_start      # idle: its setpoint is its start current (C2)
        led = self.ledger
        w = led.worst_a(m, now)
        if led.projected_a(m, now, keep, keep_off, keep_start) > w + _EPS:
            # The message itself would raise its worst case: what it was last
            # sent no longer counts (its car left, its contactor opened on a
            # fault), or its lease ran out and a message renews it (its start
            # current counts again). Send nothing above what is counted (the
            # deep property run: 54 A on 50 A; 32 A on 30 A).
            keep = keep if effective(keep, m) <= w + _EPS else (float(math.floor(w)) if w >= MIN_A else 0.0)
            keep_start = keep_start if keep_start <= w + _EPS else (float(MIN_A) if w >= MIN_A else 0.0)
        self._send(m, keep, keep_off, keep_start, why, now, cmds)

    def _send(self, m: Member, current: float, off: float, start: float, why: str, now: float,
              cmds: list[Command]) -> None:
        """Decide ``current`` for ``m`` (binding ``why``) and send it when it
        differs from the last message or that one is T_wd / 3 old."""
        m.target_a, m.binding = current, why
        last = m.last_sent()
        fresh = last is not None and now - last.at < self.group.t_wd_s / 3
        if fresh and last.current_a == current and last.offline_a == off and last.start_a == start:
            return
        if last is not None and effective(current, m) < effective(last.current_a, m):
            self._decreased_at[m.id] = now
        if effective(current, m) > 0 and (last is None or effective(last.current_a, m) == 0):
            self.planner.resumed(m.id, now)
        self._seq[0] += 1
        s = Sent(self._seq[0], current, off, start, now)
        self.ledger.on_sent(m, s)
        cmds.append(Command(m.id, s.seq, self.epoch, current, off, start))

    # -- reporting ----------------------------------------------------------------

    def group_state(self, now: float) -> dict:
        """The ``loadgroup/<group>/state`` payload: limit, breaker, whether
        the group is paused (limit 0), the ledger's worst case, and each
        member's setpoint, worst case and binding constraint (S7)."""
        g = self.group
        led = self.ledger
        members = {}
        for m in sorted(self.members.values(), key=lambda m: m.id):
            r = m.report
            last = m.last_sent()
            members[m.id] = {
                "state": r.state if r else None,
                "online": not led.silent(m, now) and r is not None,
                "setpoint_a": last.current_a if last else None,
                "measured_a": r.measured_a if r else None,
                "worst_a": led.worst_a(m, now),
                "offline_a": m.offline_a,
                "start_a": m.start_a,
                "binding": m.binding,
                "fault": r.fault if r else None,
                "lockout": r.lockout if r else False,
                "relay": r.relay if r else None,
                "session_wh": r.session_wh if r else 0,
            }
        charging = [m for m in self.members.values()
                    if m.report is not None and m.report.state in CONNECTED and not m.report.fault
                    and not led.silent(m, now)]
        return {
            "v": 1, "group": g.name, "breaker_a": g.breaker_a, "limit_a": g.limit_a,
            "paused": g.limit_a == 0,
            "epoch": self.epoch, "fair_offline": g.fair_offline,
            "setpoints_charging_a": sum(m.target_a for m in charging),
            "worst_case_a": led.total_a(now),
            "measured_a": round(sum(m.report.measured_a for m in self.members.values() if m.report), 1),
            "members": members,
        }

