"""The load-group allocator: pure logic implementing DESIGN.md §3 S1-S7.

No I/O and no clock of its own: the service feeds it charger reports and the
time (``now``, seconds, monotonic) and publishes the messages it returns.

The ledger (S1)
    For every member the allocator keeps ``hold_a``: the most current the
    member may be drawing right now, whatever happened to the messages in
    flight. Sending a setpoint raises ``hold_a`` at once to at least that
    value, and so does a report of a higher pilot offer or measured current.
    It comes down only when the charger has acknowledged a lower setpoint
    (``ack_seq``) and its EV was seen to follow it (measured current down
    from above to at or below it), or 5 s plus a margin have passed since the
    acknowledgement. A member's worst case is ``hold_a``, raised to its start
    current while it is idle (a car may plug in at any moment) and to its
    stored offline current (its link may fail at any moment, and T_wd later
    it runs on that while the others may still run on their setpoints), and
    replaced by its offline current once it has been silent for ``T_wd`` +
    margin. Never 0 for a member that can draw.

Decrease before increase (S2)
    Each step computes targets, sends every decrease at once, and sends an
    increase only when the sum of worst cases with it stays within the
    breaker. The rest wait, recorded as ``breaker_transient``.

Offline contract (S3), minimum current and rotation (S4), taper (S5),
restart (S6) and the record of the binding constraint (S7) are described at
the functions that do them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_A = 6
"""Smallest setpoint other than 0 (S4; J1772's 10 % duty)."""
DEFAULT_OFFLINE_A = 8
"""Seed: offline current 8 A."""
DEFAULT_START_A = 8
"""Seed: every session starts at 8 A."""
MARGIN_S = 5.0
"""Margin added to T_wd and to the EV's 5 s response time (S1), s."""
EV_RESPONSE_S = 5.0
"""IEC 61851-1 Table A.6: the EV follows a lower duty within 5 s."""
CONFIRM_TOL_A = 1.0
"""Measured current this close above a lowered setpoint confirms the decrease, A."""
TAPER_MARGIN_A = 2.0
"""S5: a tapering member's setpoint follows its measured current plus this, A."""
TAPER_HOLD_S = 10.0
"""S5: measured current must stay below the setpoint this long before it counts as taper, s."""
ROTATE_S = 300.0
"""S4: shortest time a rotation decision holds (anti-flap), s."""

CONNECTED = ("B", "C", "D")

# Binding constraints (S7): why a member has the setpoint it has.
GROUP_LIMIT = "group_limit"
UNIT_RATING = "unit_rating"
EV_DRAW = "ev_draw"
MINIMUM_CURRENT = "minimum_current"
ROTATION = "rotation"
BREAKER_TRANSIENT = "breaker_transient"
IDLE = "idle"
OFFLINE = "offline"
RESTART = "restart"
FAULT = "fault"
REMOVED = "removed"

STALE_S = 11.0
"""A member silent this long (two 5 s report periods and a margin) gets no
more setpoints, so that its lease can run out (S1), s."""


@dataclass
class GroupConfig:
    """A load group: ``limit_a`` (80 % of ``breaker_a`` at most), ``t_wd_s``
    (the chargers' watchdog timeout), ``fair_offline`` (Tesla's rule, S3),
    ``rotate_s`` (S4 anti-flap period)."""

    name: str
    breaker_a: float
    limit_a: float
    t_wd_s: float = 30.0
    fair_offline: bool = False
    rotate_s: float = ROTATE_S


@dataclass
class Report:
    """What a charger said in its latest state message (DESIGN.md §4)."""

    state: str
    measured_a: float = 0.0
    pilot_a: float = 0.0
    ack_seq: int | None = None
    ack_epoch: int | None = None
    offline_a: float | None = None
    start_a: float | None = None
    fault: str | None = None
    relay: bool | None = None
    session_wh: int = 0
    limit_by: str | None = None
    lockout: bool = False
    t_wd_s: int | None = None


@dataclass
class Sent:
    """A setpoint message sent to a member (``at`` in s)."""

    seq: int
    current_a: float
    offline_a: float
    start_a: float
    at: float


@dataclass
class Member:
    """The allocator's knowledge of one member. Units: A, s."""

    id: str
    unit_rating_a: float
    offline_a: float = DEFAULT_OFFLINE_A   # last value the charger is known to store
    start_a: float = DEFAULT_START_A
    hold_a: float = 0.0                   # S1 worst-case draw from setpoints
    report: Report | None = None
    reported_at: float | None = None
    sent: list[Sent] = field(default_factory=list)
    acked: Sent | None = None
    ack_seen_at: float | None = None
    low_since: float | None = None         # S5: measured below setpoint since
    demand_a: float | None = None          # S5: None = no taper seen
    active_since: float | None = None      # S4: in the active (charging) set since
    waiting_since: float | None = None     # S4: paused by rotation since
    target_a: float = 0.0
    binding: str = IDLE
    online: bool = True                    # its retained online flag ("0": its last will)
    peak_a: float = 0.0                    # most measured since hold_a last rose
    removed_at: float | None = None        # the installer removed it (kept in the ledger a while)

    def last_sent(self) -> Sent | None:
        return self.sent[-1] if self.sent else None


@dataclass
class Command:
    """A setpoint message to publish on ``<prefix>/<member>/set``."""

    member: str
    seq: int
    epoch: int
    current_a: float
    offline_a: float
    start_a: float

    def payload(self) -> dict:
        return {"v": 1, "epoch": self.epoch, "seq": self.seq, "current_a": self.current_a,
                "offline_a": self.offline_a, "start_a": self.start_a}


def offline_currents(limit_a: float, members: list[Member], fair: bool,
                     charging: set | None = None) -> dict[str, float]:
    """S3: the offline current of each member; they sum to at most ``limit_a``.

    Default: the seed's 8 A each. When 8 A x members exceeds the limit, as many
    members as fit get the same lower value, never below 6 A, and the rest 0
    (they cannot charge offline); members being given current now
    (``charging``, ids) come first, then members with a car, then by id, so
    that a member paused in a shortage cannot start on its own when its link
    fails. ``fair`` (Tesla's rule): floor(limit / members), capped at the unit
    rating, when that is at least 6 A. Result in whole amps.
    """
    n = len(members)
    if n == 0:
        return {}
    charging = charging or set()
    order = sorted(members, key=lambda m: (m.id not in charging, not _connected(m), m.id))
    def rating(m):
        return float(math.floor(m.unit_rating_a))

    if fair and limit_a // n >= MIN_A:
        return {m.id: float(min(limit_a // n, rating(m))) for m in members}
    if DEFAULT_OFFLINE_A * n <= limit_a:
        return {m.id: float(min(DEFAULT_OFFLINE_A, rating(m))) for m in members}
    k = min(n, int(limit_a // MIN_A))
    each = float(min(DEFAULT_OFFLINE_A, limit_a // k)) if k else 0.0
    return {m.id: (min(each, rating(m)) if i < k else 0.0) for i, m in enumerate(order)}


def _connected(m: Member) -> bool:
    return m.report is not None and m.report.state in CONNECTED and not m.report.fault


def water_fill(budget: float, caps: dict[str, float]) -> dict[str, float]:
    """Max-min fair split of ``budget`` (A) over members with ``caps`` (A):
    equal shares, and what a capped member cannot take goes to the others.
    Shares are whole amps; the amps that rounding down leaves over go one each
    to the uncapped members in id order, so the sum is the budget (or all the
    caps), never more."""
    alloc: dict[str, float] = {}
    left = dict(caps)
    remaining = budget
    while left:
        share = remaining / len(left)
        capped = {k: c for k, c in left.items() if c <= share}
        if not capped:
            spare = int(remaining - math.floor(share) * len(left) + 1e-9)
            for i, k in enumerate(sorted(left)):
                alloc[k] = float(math.floor(share) + (1 if i < spare else 0))
            break
        for k, c in capped.items():
            alloc[k] = float(c)
            remaining -= c
            del left[k]
    return alloc


class Allocator:
    """Allocates a group's current. ``members``: the group's members with
    their unit ratings (and, after a restart, the stored ``offline_a``/
    ``start_a``/``hold_a``); ``epoch``: this server run's epoch (int);
    ``now``: start time, s; ``restarted``: True when the server starts with
    members that may be charging (S6)."""

    def __init__(self, group: GroupConfig, members: list[Member], epoch: int, now: float,
                 restarted: bool = True, seq_counter: list | None = None):
        self.group = group
        self.members = {m.id: m for m in members}
        self.epoch = epoch
        # One counter per server epoch, shared by every group the service runs,
        # so that a charger moved between groups never sees its seq go back.
        self._seq = seq_counter if seq_counter is not None else [0]
        self.started_at = now
        self.restarted = restarted
        for m in members:
            if restarted:
                # S6: assume the worst until it reports: max(last setpoint, offline current).
                m.hold_a = max(m.hold_a, m.offline_a)

    # -- inputs ---------------------------------------------------------------

    def on_online(self, member_id: str, online: bool) -> None:
        """Take a member's ``online`` flag. ``"0"`` (its last will) does not
        lower its worst case, which only the T_wd silence does (S1); it only
        means its last state message is no sign of life after a restart (S6)."""
        m = self.members.get(member_id)
        if m is not None:
            m.online = online

    def on_report(self, member_id: str, report: Report, now: float) -> None:
        """Take a charger's state message, received at ``now``."""
        m = self.members.get(member_id)
        if m is None:
            return
        prev = m.report
        m.report = report
        m.reported_at = now
        # Whatever the charger offers or draws now may go on (a restarted
        # server, an old epoch's setpoint): never budget it below that. Its
        # first report replaces the restart assumption (S6), which must not
        # make a later raise look free.
        now_a = max(min(report.pilot_a, m.unit_rating_a), report.measured_a)
        if prev is None:
            last = m.last_sent()
            m.hold_a = max(now_a, _effective(last.current_a, m) if last is not None else 0.0)
        else:
            m.hold_a = max(m.hold_a, now_a)
        m.peak_a = max(m.peak_a, report.measured_a)
        if report.offline_a is not None:
            m.offline_a = report.offline_a
        if report.start_a is not None:
            m.start_a = report.start_a
        if report.ack_epoch == self.epoch and report.ack_seq is not None:
            acked = next((s for s in m.sent if s.seq == report.ack_seq), None)
            if acked is not None and (m.acked is None or acked.seq > m.acked.seq):
                if m.acked is None or acked.current_a != m.acked.current_a:
                    m.low_since = None       # a new level: judge the draw afresh (S5)
                    m.ack_seen_at = now
                m.acked = acked
                m.sent = [s for s in m.sent if s.seq >= acked.seq]
        if prev is None or (prev.state in CONNECTED) != (report.state in CONNECTED):
            # A session began or ended: forget the taper and rotation history.
            m.demand_a = None
            m.low_since = None
        if report.fault and report.relay is False:
            # Contactor open on a fault: the old session's setpoints are void
            # (a retry starts a new session at the start current, C2); only
            # what is still in flight may yet arrive.
            m.hold_a = max((_effective(s.current_a, m) for s in m.sent
                            if m.acked is None or s.seq > m.acked.seq), default=0.0)
            m.peak_a = 0.0
        self._settle(m, now)

    def _settle(self, m: Member, now: float) -> None:
        """Lower ``hold_a`` when a decrease is confirmed (S1): the charger has
        acknowledged it, and either its EV was seen drawing more and now
        draws no more than the new level (it followed the decrease), or 5 s
        plus a margin have passed since the acknowledgement (IEC 61851-1
        Table A.6: the EV follows a lower duty within 5 s). An EV that was
        not yet drawing proves nothing: it may still ramp up to what it read
        before. Without a car (state A) nothing can draw."""
        a = m.acked
        r = m.report
        if a is None or r is None:
            return
        in_flight = max((s.current_a for s in m.sent if s.seq > a.seq), default=0.0)
        level = max(_effective(a.current_a, m), _effective(in_flight, m), r.measured_a,
                    min(r.pilot_a, m.unit_rating_a))
        if level >= m.hold_a:
            return
        followed = (m.peak_a > a.current_a + CONFIRM_TOL_A
                    and r.measured_a <= a.current_a + CONFIRM_TOL_A)
        waited = m.ack_seen_at is not None and now - m.ack_seen_at >= EV_RESPONSE_S + MARGIN_S
        if r.state == "A" or followed or waited:
            m.hold_a = level
            m.peak_a = r.measured_a

    def remove(self, member_id: str, now: float) -> None:
        """The installer removed a member: it gets 0 A, offline and start 0,
        and stays in the ledger until any lease it holds has run out."""
        m = self.members.get(member_id)
        if m is not None and m.removed_at is None:
            m.removed_at = now

    def expire_removed(self, now: float) -> list[str]:
        """Drop removed members whose leases have run out; return their ids."""
        gone = [m.id for m in self.members.values() if m.removed_at is not None
                and now - m.removed_at > self.t_wd(m) + EV_RESPONSE_S + MARGIN_S]
        for mid in gone:
            del self.members[mid]
        return gone

    # -- the ledger -----------------------------------------------------------

    def t_wd(self, m: Member) -> float:
        """The watchdog timeout that member ``m`` runs with: the longer of the
        group's and the one it reports (they differ until it has taken the
        group's, see the service), s."""
        r = m.report
        return max(self.group.t_wd_s, r.t_wd_s if r is not None and r.t_wd_s else 0)

    def silent(self, m: Member, now: float) -> bool:
        """The charger runs on its offline current: no report for T_wd +
        margin (counted from the server's start when it never reported), and
        no setpoint sent to it for T_wd + the EV's 5 s + margin, since its
        lease runs from the last setpoint it received."""
        since = m.reported_at if m.reported_at is not None else self.started_at
        last = m.last_sent()
        sent_at = last.at if last is not None else self.started_at
        t_wd = self.t_wd(m)
        return now - since > t_wd + MARGIN_S and now - sent_at > t_wd + EV_RESPONSE_S + MARGIN_S

    def worst_a(self, m: Member, now: float) -> float:
        """S1: the most member ``m`` may draw at ``now``, A.

        A faulted member counts 0 only once it has reported its contactor
        open and has stored start and offline currents of 0, which the
        allocator asks of every faulted member: its fault may clear by itself
        (a retry) or by a power cycle, and then it may draw only what the
        server gives it. Until then it counts its start and offline currents
        (the property test found a fault cleared with offline 8 A stored,
        which put 24 A on a 20 A breaker)."""
        off = _offline_possible(m)
        if self.silent(m, now):
            return off
        r = m.report
        if r is not None and r.fault:
            if r.relay is False:
                return max(_start_stored(m), off)
            return max(m.hold_a, _start_stored(m), off)
        w = m.hold_a
        if m.report is None or m.report.state not in CONNECTED:
            w = max(w, _start_stored(m))
        # Its link may fail at any moment, and then T_wd later it runs on its
        # offline current while the others may still run on their setpoints.
        return max(w, off)

    def ledger_a(self, now: float) -> float:
        """Sum of the members' worst cases, A (S1: at most the breaker)."""
        return sum(self.worst_a(m, now) for m in self.members.values())

    # -- allocation -------------------------------------------------------------

    def _demand(self, m: Member, now: float) -> tuple[float, str]:
        """S5: what a connected member can use, and the constraint that says so."""
        cap, why = float(math.floor(m.unit_rating_a)), UNIT_RATING
        r = m.report
        a = m.acked
        if r is None or a is None or a.current_a < MIN_A:
            return cap, why
        if r.measured_a < a.current_a - TAPER_MARGIN_A:
            # "Stays below" is judged from reports, not from the clock: only a
            # report received TAPER_HOLD_S after the first low one proves it.
            # Found by the fault suite (30 % loss, 2 s latency): one report
            # taken while the EV was still ramping, then none got through, and
            # 10 s later the member was "tapering" at 6 A while it drew 13 A,
            # and the others were raised into the breaker's headroom.
            seen = m.reported_at if m.reported_at is not None else now
            if m.low_since is None:
                m.low_since = seen
            if seen - m.low_since >= TAPER_HOLD_S:
                m.demand_a = max(MIN_A, float(math.ceil(r.measured_a + TAPER_MARGIN_A)))
        else:
            m.low_since = None
            if m.demand_a is not None and r.measured_a >= m.demand_a - CONFIRM_TOL_A:
                m.demand_a = None      # its draw climbs back: it gets current back
        if m.demand_a is not None and m.demand_a < cap:
            return m.demand_a, EV_DRAW
        return cap, why

    def _active_set(self, charging: list[Member], k: int, now: float) -> set[str]:
        """S4: which ``k`` of the charging members get current in a shortage.
        Fair by energy delivered (least first); a decision holds ``rotate_s``
        (anti-flap) unless members came or went."""
        ids = {m.id for m in charging}
        current = {m.id for m in charging if m.active_since is not None}
        due = any(now - m.active_since >= self.group.rotate_s
                  for m in charging if m.active_since is not None)
        if len(current) == min(k, len(ids)) and current <= ids and not due:
            return current
        ranked = sorted(charging, key=lambda m: (m.report.session_wh if m.report else 0,
                                                 -(now - (m.waiting_since or now)), m.id))
        if due and len(current) == k:
            # Rotate: the active members that had their turn make room.
            stay = [m for m in ranked if m.id in current and now - m.active_since < self.group.rotate_s]
            waiting = [m for m in ranked if m.id not in current]
            done = [m for m in ranked if m.id in current and m not in stay]
            chosen = (stay + waiting + done)[:k]
        else:
            chosen = ranked[:k]
        return {m.id for m in chosen}

    def plan(self, now: float) -> dict[str, tuple[float, str]]:
        """Targets: member id -> (setpoint A, binding constraint). Idle members
        get their start current (C2). Pure apart from the taper and rotation
        bookkeeping on the members."""
        g = self.group
        plan: dict[str, tuple[float, str]] = {}
        budget = g.limit_a
        charging: list[Member] = []
        for m in self.members.values():
            if m.removed_at is not None:
                plan[m.id] = (0.0, REMOVED)
                budget -= self.worst_a(m, now)
            elif self.silent(m, now):
                plan[m.id] = (0.0, OFFLINE)
                budget -= _offline_possible(m)
            elif m.reported_at is not None and now - m.reported_at > STALE_S:
                # Gone quiet, not yet silent: step() sends it nothing, so its
                # setpoint stays in force until its lease runs out. Budget
                # that, not a share it will never be told (the fault suite,
                # 30 % loss: a share of 13 A planned while 14 A stayed in
                # force, and the others raised: 41 A on the 40 A limit).
                plan[m.id] = (0.0, OFFLINE)
                budget -= self.worst_a(m, now)
            elif m.report is not None and m.report.fault:
                plan[m.id] = (0.0, FAULT)
                budget -= self.worst_a(m, now)
            elif _connected(m):
                charging.append(m)
            else:
                m.active_since = None
                m.waiting_since = None
        caps = {}
        whys = {}
        for m in charging:
            caps[m.id], whys[m.id] = self._demand(m, now)
        k = min(len(charging), int(max(budget, 0) // MIN_A))
        active = self._active_set(charging, k, now) if k < len(charging) else {m.id for m in charging}
        for m in charging:
            if m.id in active:
                if m.active_since is None:
                    m.active_since = now
                m.waiting_since = None
            else:
                m.active_since = None
                if m.waiting_since is None:
                    m.waiting_since = now
                plan[m.id] = (0.0, ROTATION if k else MINIMUM_CURRENT)
        shares = water_fill(max(budget, 0.0), {i: caps[i] for i in active})
        for i, a in shares.items():
            why = whys[i] if a >= caps[i] else GROUP_LIMIT
            plan[i] = (a if a >= MIN_A else 0.0, why if a >= MIN_A else MINIMUM_CURRENT)
        # Idle members: their setpoint is their start current (C2); S3 may lower it.
        for m in self.members.values():
            if m.id not in plan:
                plan[m.id] = (-1.0, IDLE)   # filled in by start_currents()
        return plan

    def start_currents(self, plan: dict[str, tuple[float, str]], now: float) -> dict[str, float]:
        """S3: start current per member. Idle members keep 8 A while the breaker
        has room beside everything else's worst case, else 6 A, else 0 ("wait
        for an allocation"); connected members keep what they have, and
        faulted ones get 0, so that a retry waits for the server."""
        out = {}
        idle = sorted((m for m in self.members.values() if plan[m.id][1] == IDLE), key=lambda m: m.id)
        headroom = self.group.breaker_a
        for m in self.members.values():
            if plan[m.id][1] != IDLE:
                headroom -= max(self.worst_a(m, now), plan[m.id][0])
                # A faulted or removed member waits for an allocation after
                # its retry; others keep theirs until they are idle again.
                out[m.id] = 0.0 if plan[m.id][1] in (FAULT, REMOVED) else _start_stored(m)
        for m in idle:
            for want in (DEFAULT_START_A, MIN_A, 0.0):
                if want <= headroom:
                    break
            want = min(want, m.unit_rating_a)
            out[m.id] = want
            headroom -= want
        return out

    def step(self, now: float) -> list[Command]:
        """One allocation round: returns the setpoint messages to publish now.

        Sends decreases at once and increases only within the breaker (S2),
        repeats every member's setpoint at least every T_wd / 3, and holds
        every increase while a restarted server waits for its members (S6).
        """
        g = self.group
        plan = self.plan(now)
        starts = self.start_currents(plan, now)
        offline = offline_currents(g.limit_a, [m for m in self.members.values() if m.removed_at is None],
                                   g.fair_offline, {i for i, (a, _w) in plan.items() if a > 0})
        for i, (_a, why) in plan.items():
            if why == FAULT:
                # With start 0 it counts 0 once it has stored both. Its share
                # stays unused, so nobody's offline current rises meanwhile.
                offline[i] = 0.0
        waiting_restart = self.restarted and now - self.started_at <= g.t_wd_s + MARGIN_S and any(
            m.report is None or not m.online for m in self.members.values())
        if self.restarted and not waiting_restart:
            self.restarted = False
        # Offline currents: decreases first, increases only while the stored
        # values stay within the group limit (S3 contract at every instant).
        off_sum = sum(max(_offline_stored(m), _offline_in_flight(m)) for m in self.members.values())
        desired: dict[str, tuple[float, float, float, str]] = {}
        for m in self.members.values():
            target, why = plan[m.id]
            start = starts[m.id]
            if why == IDLE:
                target = start
            off = offline.get(m.id, 0.0)
            cur_off = max(_offline_stored(m), _offline_in_flight(m))
            if off > cur_off:
                if waiting_restart or off_sum - cur_off + off > g.limit_a:
                    off = cur_off           # wait until the decreases are stored
                else:
                    off_sum += off - cur_off
            desired[m.id] = (target, off, start, why)
        cmds: list[Command] = []
        # Whatever does not raise a member's worst case goes out at once
        # (decreases first, S2); the rest waits for room in the ledger.
        increases = []
        for m in self.members.values():
            target, off, start, why = desired[m.id]
            if m.reported_at is None or now - m.reported_at > STALE_S:
                # Never heard from (a restarted server, S6), or gone quiet:
                # nothing is sent, so that no lease is renewed blindly.
                m.target_a, m.binding = 0.0, RESTART if self.restarted else OFFLINE
                continue
            # An increase: the worst case rises, or the present draw does (a
            # member whose offline current already counts still draws more
            # now, and the others' leases run on).
            if (self._projected(m, target, start, why, now, off) > self.worst_a(m, now) + 1e-9
                    or _effective(target, m) > m.hold_a + 1e-9):
                increases.append(m)
                continue
            m.target_a, m.binding = target, why
            self._maybe_send(m, target, off, start, now, cmds)
        # Increases while the ledger stays within the breaker (S1, S2).
        for m in sorted(increases, key=lambda m: (m.hold_a, m.id)):
            target, off, start, why = desired[m.id]
            if waiting_restart:
                self._hold(m, off, start, RESTART, now, cmds)
                continue
            before = self.worst_a(m, now)
            after = self._projected(m, target, start, why, now, off)
            if self.ledger_a(now) - before + after <= g.breaker_a + 1e-9:
                m.target_a, m.binding = target, why
                self._maybe_send(m, target, off, start, now, cmds)
            else:
                self._hold(m, off, start, BREAKER_TRANSIENT, now, cmds)
        return cmds

    def _projected(self, m: Member, target: float, start: float, why: str, now: float,
                   off: float = 0.0) -> float:
        """Member ``m``'s worst case once ``target`` (and, if idle, ``start``)
        and the offline current ``off`` are sent: an offline current counts in
        the ledger like a setpoint, so raising it needs room too."""
        w = max(self.worst_a(m, now), _effective(target, m), off)
        if why == IDLE:
            w = max(w, start)
        return w

    def _hold(self, m: Member, off: float, start: float, why: str, now: float,
              cmds: list[Command]) -> None:
        """No increase for ``m`` now: keep its current setpoint, but let lower
        offline and start currents through, and refresh its lease."""
        last = m.last_sent()
        r = m.report
        # Nothing sent yet in this epoch (a restarted server): keep what the
        # charger offers now, which its hold already counts; never pause it.
        keep = last.current_a if last is not None else (
            float(math.floor(min(r.pilot_a, m.unit_rating_a))) if r is not None else 0.0)
        keep_start = min(start, _start_stored(m), last.start_a if last else start)
        keep_off = min(off, _offline_stored(m), last.offline_a if last else off)
        m.target_a, m.binding = keep, why
        self._maybe_send(m, keep, keep_off, keep_start, now, cmds)

    def _maybe_send(self, m: Member, current: float, off: float, start: float, now: float,
                    cmds: list[Command]) -> None:
        last = m.last_sent()
        fresh = last is not None and now - last.at < self.group.t_wd_s / 3
        if fresh and last.current_a == current and last.offline_a == off and last.start_a == start:
            return
        self._seq[0] += 1
        seq = self._seq[0]
        s = Sent(seq, current, off, start, now)
        m.sent.append(s)
        if len(m.sent) > 64:
            del m.sent[0]
        if _effective(current, m) > m.hold_a:
            m.hold_a = _effective(current, m)
            m.peak_a = 0.0       # a new, higher level: a later drop must be seen afresh
        cmds.append(Command(m.id, seq, self.epoch, current, off, start))

    # -- reporting ----------------------------------------------------------------

    def group_state(self, now: float) -> dict:
        """The ``loadgroup/<group>/state`` payload (S7: the binding constraint
        of each member)."""
        g = self.group
        members = {}
        for m in sorted(self.members.values(), key=lambda m: m.id):
            r = m.report
            last = m.last_sent()
            members[m.id] = {
                "state": r.state if r else None,
                "online": not self.silent(m, now) and r is not None,
                "setpoint_a": last.current_a if last else None,
                "measured_a": r.measured_a if r else None,
                "worst_a": self.worst_a(m, now),
                "offline_a": m.offline_a,
                "start_a": m.start_a,
                "binding": m.binding,
                "fault": r.fault if r else None,
                "lockout": r.lockout if r else False,
                "relay": r.relay if r else None,
                "session_wh": r.session_wh if r else 0,
            }
        charging = [m for m in self.members.values() if _connected(m) and not self.silent(m, now)]
        return {
            "v": 1, "group": g.name, "breaker_a": g.breaker_a, "limit_a": g.limit_a,
            "epoch": self.epoch, "fair_offline": g.fair_offline,
            "setpoints_charging_a": sum(m.target_a for m in charging),
            "worst_case_a": self.ledger_a(now),
            "measured_a": round(sum(m.report.measured_a for m in self.members.values() if m.report), 1),
            "members": members,
        }


def _effective(amps: float, m: Member) -> float:
    """What a setpoint lets the member draw: clamped to its rating, 0 below 6 A (C3)."""
    a = min(amps, m.unit_rating_a)
    return a if a >= MIN_A else 0.0


def _offline_stored(m: Member) -> float:
    return m.offline_a


def _start_stored(m: Member) -> float:
    return m.start_a


def _offline_possible(m: Member) -> float:
    """The offline current member ``m`` may have stored: what it last
    reported, or any value sent since that it has not acknowledged (its
    reports may be lost while it still receives; the property test found a
    silent member counted at the 0 A it reported, while it had stored the
    8 A sent after), A."""
    return max(_offline_stored(m), _offline_in_flight(m))


def _offline_in_flight(m: Member) -> float:
    a = m.acked
    return max((s.offline_a for s in m.sent if a is None or s.seq > a.seq), default=0.0)
