"""The planner: what each member of a load group should get (S3, S4, S5, S7).

Policy only: fair shares under the group limit, taper, rotation in a
shortage, offline and start currents. It says what it wants; whether and when
a raise may go out is the ledger's word (:mod:`evse_tools.server.ledger`),
applied by :class:`evse_tools.server.allocator.Allocator`. Units: A, s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from evse_tools.server.ledger import (DEFAULT_OFFLINE_A, DEFAULT_START_A, MIN_A, STALE_S, GroupConfig,
                                      Ledger, Member, connected)

TAPER_MARGIN_A = 2.0
"""S5: a tapering member's setpoint follows its measured current plus this, A."""
TAPER_HOLD_S = 10.0
"""S5: measured current must stay below the setpoint this long before it counts as taper, s."""
CONFIRM_TOL_A = 1.0
"""A tapered member whose draw climbs to within this of its setpoint gets current back, A."""

# Binding constraints (S7): why a member has the setpoint it has.
GROUP_LIMIT = "group_limit"
UNIT_RATING = "unit_rating"
EV_DRAW = "ev_draw"
MINIMUM_CURRENT = "minimum_current"
ROTATION = "rotation"
BREAKER_TRANSIENT = "breaker_transient"
EV_RESPONSE = "ev_response"
IDLE = "idle"
OFFLINE = "offline"
RESTART = "restart"
FAULT = "fault"
REMOVED = "removed"


@dataclass
class _Turn:
    """A charging member's place in a shortage (S4): ``active`` (given
    current) since ``since``; ``changed`` when it was last paused or resumed."""

    active: bool
    since: float
    changed: float


@dataclass
class _Taper:
    """S5 bookkeeping: measured below the setpoint since ``low_since`` (by
    reports); ``demand_a`` what it draws plus the margin (None: no taper);
    ``level_a`` the acknowledged setpoint that was judged."""

    low_since: float | None = None
    demand_a: float | None = None
    level_a: float | None = None


@dataclass
class Plan:
    """One round's wishes: ``targets`` id -> (setpoint A, binding), and the
    ``start`` and ``offline`` currents per id (A)."""

    targets: dict
    start: dict
    offline: dict


def offline_currents(limit_a: float, members: list[Member], fair: bool,
                     charging: set | None = None) -> dict[str, float]:
    """S3: the offline current of each member; they sum to at most ``limit_a``.

    Default: the seed's 8 A each. When 8 A x members exceeds the limit, as many
    members as fit get the same lower value, never below 6 A, and the rest 0
    (they cannot charge offline); members being given current now
    (``charging``, ids) come first, then members with a car, then by id, so
    that a member paused in a shortage cannot start on its own when its link
    fails. ``fair`` (Tesla's rule): floor(limit / members), capped at the unit
    rating, when that is at least 6 A. A limit of 0 gives everyone 0. Whole amps.
    """
    n = len(members)
    if n == 0:
        return {}
    charging = charging or set()
    order = sorted(members, key=lambda m: (m.id not in charging, not connected(m), m.id))

    def rating(m):
        return float(math.floor(m.unit_rating_a))

    if fair and limit_a // n >= MIN_A:
        return {m.id: float(min(limit_a // n, rating(m))) for m in members}
    if DEFAULT_OFFLINE_A * n <= limit_a:
        return {m.id: float(min(DEFAULT_OFFLINE_A, rating(m))) for m in members}
    k = min(n, int(limit_a // MIN_A))
    each = float(min(DEFAULT_OFFLINE_A, limit_a // k)) if k else 0.0
    return {m.id: (min(each, rating(m)) if i < k else 0.0) for i, m in enumerate(order)}


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


class Planner:
    """Policy for one group (S3-S5, S7). Holds only its own bookkeeping
    (taper and rotation); everything about what may be drawn is the ledger's.

    ``turns``: the latest pauses and resumes in a shortage, as (time s,
    member id, active bool, cause), cause one of ``shortage`` (fewer can
    charge), ``room`` (more can) and ``rotation`` (a hand-over, S4); the
    last ``TURNS_KEPT``, for tests and diagnosis."""

    TURNS_KEPT = 256

    def __init__(self, group: GroupConfig):
        self.group = group
        self._turns: dict[str, _Turn] = {}
        self._taper: dict[str, _Taper] = {}
        self._last_swap: float | None = None
        self._changed: dict[str, float] = {}   # last pause or resume per member, across sessions
        self.turns: list[tuple[float, str, bool, str]] = []

    def forget(self, member_id: str) -> None:
        """The member left the group."""
        self._turns.pop(member_id, None)
        self._taper.pop(member_id, None)
        self._changed.pop(member_id, None)

    # -- S5: taper ----------------------------------------------------------------

    def _demand(self, m: Member) -> tuple[float, str]:
        """S5: what a connected member can use, and the constraint that says so."""
        cap, why = float(math.floor(m.unit_rating_a)), UNIT_RATING
        r = m.report
        a = m.acked
        t = self._taper.setdefault(m.id, _Taper())
        if r is None or a is None or a.current_a < MIN_A:
            return cap, why
        if t.level_a != a.current_a:
            t.level_a = a.current_a       # a new level: judge the draw afresh
            t.low_since = None
        if r.measured_a < a.current_a - TAPER_MARGIN_A:
            # "Stays below" is judged from reports, not from the clock: only
            # a report received TAPER_HOLD_S after the first low one proves
            # it (the fault suite, 30 % loss: one report taken while the EV
            # was still ramping, then none, and 10 s later it was "tapering"
            # at 6 A while it drew 13 A).
            seen = m.reported_at
            if t.low_since is None:
                t.low_since = seen
            if seen - t.low_since >= TAPER_HOLD_S:
                t.demand_a = max(MIN_A, float(math.ceil(r.measured_a + TAPER_MARGIN_A)))
        else:
            t.low_since = None
            if t.demand_a is not None and r.measured_a >= t.demand_a - CONFIRM_TOL_A:
                t.demand_a = None      # its draw climbs back: it gets current back
        if t.demand_a is not None and t.demand_a < cap:
            return t.demand_a, EV_DRAW
        return cap, why

    def resumed(self, member_id: str, now: float) -> None:
        """The allocator sent an active member its first current after a
        pause (a hand-over waits for the outgoing EV's window first): its
        turn runs from now, so that it gets a whole rotation period."""
        t = self._turns.get(member_id)
        if t is not None and t.active:
            t.since = t.changed = now
            self._changed[member_id] = now

    def session_changed(self, member_id: str) -> None:
        """A session began or ended: forget its taper and its place in a shortage."""
        self._taper.pop(member_id, None)
        self._turns.pop(member_id, None)

    # -- S4: who charges in a shortage ----------------------------------------------

    def _active_set(self, charging: list[Member], k: int, now: float) -> set[str]:
        """S4: which ``k`` of the ``charging`` members get current.

        Members keep their turn; a shortage that grows pauses the members
        with the most session energy; room resumes the ones that waited
        longest. While some wait, one hand-over (the longest-active member
        with the most energy makes room for the one that waited longest)
        happens at most every ``rotate_s``, and only between a member that
        has been active and one that has waited for ``rotate_s`` each: no
        member is paused and resumed by rotation within a rotation period."""
        rot = self.group.rotate_s
        turns = self._turns
        for m in charging:
            if m.id not in turns:
                # A newcomer waits its turn in a shortage (it was told its
                # start current; nothing here is a pause of a running car).
                turns[m.id] = _Turn(False, now, self._changed.get(m.id, -1e18))
        ids = {m.id for m in charging}
        for mid in list(turns):
            if mid not in ids:
                del turns[mid]

        def wh(m):
            return m.report.session_wh if m.report else 0

        active = [m for m in charging if turns[m.id].active]
        waiting = [m for m in charging if not turns[m.id].active]

        def set_turn(m, on, cause):
            turns[m.id] = _Turn(on, now, now)
            self._changed[m.id] = now
            self.turns.append((now, m.id, on, cause))
            del self.turns[:-self.TURNS_KEPT]

        if len(active) > k:
            # Fewer can charge: the ones with the most energy pause first.
            for m in sorted(active, key=lambda m: (-wh(m), -turns[m.id].since, m.id))[:len(active) - k]:
                set_turn(m, False, "shortage")
        elif len(active) < k:
            # Room: the ones that waited longest (then least energy) resume.
            for m in sorted(waiting, key=lambda m: (turns[m.id].since, wh(m), m.id))[:k - len(active)]:
                set_turn(m, True, "room")
        waiting = [m for m in charging if not turns[m.id].active]
        if not waiting:
            self._last_swap = None
        elif self._last_swap is None:
            self._last_swap = now        # a shortage began: the first hand-over in rotate_s
        elif now - self._last_swap >= rot:
            outs = [m for m in charging if turns[m.id].active and now - turns[m.id].since >= rot]
            ins = [m for m in waiting if now - turns[m.id].changed >= rot]
            if outs and ins:
                out = max(outs, key=lambda m: (wh(m), now - turns[m.id].since, m.id))
                inn = min(ins, key=lambda m: (turns[m.id].since, wh(m), m.id))
                set_turn(out, False, ROTATION)
                set_turn(inn, True, ROTATION)
                self._last_swap = now
        return {m.id for m in charging if turns[m.id].active}

    # -- the plan -----------------------------------------------------------------

    def plan(self, ledger: Ledger, now: float) -> Plan:
        """This round's targets, start and offline currents (see :class:`Plan`).

        Members the server cannot steer (removed, silent, gone quiet,
        faulted) are budgeted at what the ledger says they may draw; the
        rest of the limit is shared max-min fairly among the charging
        members (S5 caps), a shortage rotates (S4), idle members get their
        start current (C2). A limit of 0 pauses everyone and gives every
        member start and offline 0."""
        g = self.group
        targets: dict[str, tuple[float, str]] = {}
        budget = g.limit_a
        charging: list[Member] = []
        for m in ledger.members.values():
            if m.removed_at is not None:
                targets[m.id] = (0.0, REMOVED)
                budget -= ledger.worst_a(m, now)
            elif ledger.silent(m, now):
                targets[m.id] = (0.0, OFFLINE)
                budget -= ledger.worst_a(m, now)
            elif m.reported_at is not None and now - m.reported_at > STALE_S:
                # Gone quiet, not yet silent: nothing is sent to it, so its
                # setpoint stays in force until its lease runs out. Budget
                # that, not a share it will never be told (the fault suite,
                # 30 % loss: 41 A on the 40 A limit).
                targets[m.id] = (0.0, OFFLINE)
                budget -= ledger.worst_a(m, now)
            elif m.report is not None and m.report.fault:
                targets[m.id] = (0.0, FAULT)
                budget -= ledger.worst_a(m, now)
            elif connected(m):
                charging.append(m)
        caps, whys = {}, {}
        for m in charging:
            caps[m.id], whys[m.id] = self._demand(m)
        budget = max(budget, 0.0)
        k = min(len(charging), int(budget // MIN_A))
        active = self._active_set(charging, k, now)
        for m in charging:
            if m.id not in active:
                why = GROUP_LIMIT if g.limit_a == 0 else ROTATION if k else MINIMUM_CURRENT
                targets[m.id] = (0.0, why)
        shares = water_fill(budget, {i: caps[i] for i in active})
        for i, a in shares.items():
            if a >= MIN_A:
                targets[i] = (a, whys[i] if a >= caps[i] else GROUP_LIMIT)
            else:
                targets[i] = (0.0, MINIMUM_CURRENT)
        live = [m for m in ledger.members.values() if m.removed_at is None]
        offline = offline_currents(g.limit_a, live, g.fair_offline,
                                   {i for i, (a, _w) in targets.items() if a > 0})
        for i, (_a, why) in targets.items():
            if why in (FAULT, REMOVED):
                # It counts 0 once it has stored both; its share stays
                # unused, so nobody's offline current rises meanwhile.
                offline[i] = 0.0
        start = self._start_currents(ledger, targets, offline, now)
        for m in ledger.members.values():
            if m.id not in targets:
                targets[m.id] = (start[m.id], IDLE)       # C2: an idle member's setpoint
        return Plan(targets, start, offline)

    def _start_currents(self, ledger: Ledger, targets: dict, offline: dict,
                        now: float) -> dict[str, float]:
        """S3: the start current of every member.

        Every member's start current counts against the breaker (a car may
        plug in, or be plugged in again, at any moment). This is planned for
        the steady state the plan aims at, not for the transients on the way
        (the ledger's room check holds those): each member's reserve is the
        larger of its planned setpoint and its planned offline current, and
        the breaker's headroom beside all reserves is handed out as start
        currents, idle members first (a car is likeliest to arrive there):
        8 A where it fits, else 6 A, else 0 ("wait for an allocation"). A
        start current at or below a member's reserve costs nothing and is
        never lowered. Planning on transients would flip a start current
        between 8 and 0 as windows open and close, and every lowering opens
        a new window. Faulted and removed members get 0, so that a retry
        waits for the server; a limit of 0 gives everyone 0."""
        g = self.group
        reserve = {}
        for m in ledger.members.values():
            a = targets.get(m.id, (0.0, IDLE))[0]
            reserve[m.id] = max(min(a, m.unit_rating_a), offline.get(m.id, 0.0))
        headroom = g.breaker_a - sum(reserve.values())
        out: dict[str, float] = {}
        order = sorted(ledger.members.values(), key=lambda m: (m.id in targets, m.id))
        for m in order:
            why = targets.get(m.id, (0.0, IDLE))[1]
            want = 0.0
            if g.limit_a > 0 and why not in (FAULT, REMOVED):
                for want in (DEFAULT_START_A, MIN_A, 0.0):
                    if want <= reserve[m.id] or want - reserve[m.id] <= headroom:
                        break
            want = min(want, float(math.floor(m.unit_rating_a)))
            if want < MIN_A:
                want = 0.0
            out[m.id] = want
            headroom -= max(0.0, want - reserve[m.id])
        return out
