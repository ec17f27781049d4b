"""The ledger: what each member of a load group may draw at worst (S1).

Pure logic: no I/O and no clock of its own. Times are seconds on the
server's monotonic clock (``now``), currents amperes.

The worst-case rule (DESIGN.md §3 S1, issue 11), for every member at every
moment, is the largest of:

- every **offer it may still be following**: a pilot offered within the EV's
  response window before now. The window is ``FOLLOW_S`` (IEC 61851-1
  Table A.6: the EV follows a lower duty within 5 s, plus a margin), and it
  runs from the moment the offer stopped being offered at the latest. An
  offer is a setpoint sent (in force, or in flight, raises included), a pilot
  a report showed, the start current a session began on, or what a restarted
  server assumes (S6). A setpoint stops being offered when the charger
  acknowledges a newer one (``ack_seq`` with this server's ``ack_epoch``),
  at the latest when that acknowledgement is received;
- its **measured current**, from its latest report;
- its **fallback**: the offline current it has stored or may yet store,
  since its link may fail at any moment (C4), and its start current, since
  a car may plug in (or be unplugged and plugged in again) at any moment and
  start a session on it before the server can answer (C2);
- once it has been silent for ``T_wd`` plus a margin: its offline current
  alone, never 0.

So a decrease is confirmed only when the member has acknowledged it **and**
a report received after the response window of every higher offer shows it
at or below the new level. Until then the old level counts. Without a car
(state A) nothing can follow an old offer: a new car starts a new session at
the start current (C2), so the offers it had applied are void.

:class:`Ledger` owns this rule and nothing else. The planner asks it how much
room a member has (:meth:`Ledger.room_for`); it never sums worst cases itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_A = 6
"""Smallest setpoint other than 0 (S4; J1772's 10 % duty), A."""
DEFAULT_OFFLINE_A = 8
"""Seed: offline current 8 A."""
DEFAULT_START_A = 8
"""Seed: every session starts at 8 A."""
EV_RESPONSE_S = 5.0
"""IEC 61851-1 Table A.6: the EV follows a lower duty within 5 s."""
RESPONSE_MARGIN_S = 1.0
"""Added to the EV's 5 s: the charger's control tick, its measurement and
report (every change of 0.5 A, at most every 250 ms), s. Every window is
counted from a server-side time that is already late (the receipt of the
acknowledgement), so clock skew does not enter."""
FOLLOW_S = EV_RESPONSE_S + RESPONSE_MARGIN_S
"""How long after an offer ended the EV may still follow it, s."""
MARGIN_S = 5.0
"""Margin added to T_wd for silence and leases (S1), s."""
STALE_S = 11.0
"""A member silent this long (two 5 s report periods and a margin) gets no
more setpoints, so that its lease can run out (S1), s."""
UNACKED_KEPT = 64
"""Setpoints kept for a member that does not acknowledge them (folded, never dropped)."""
CONNECTED = ("B", "C", "D")
"""States with a car connected (J1772)."""
_VOID = -1e18
"""``ended`` of an offer that no EV can follow any more (its car left)."""


@dataclass
class GroupConfig:
    """A load group: ``breaker_a`` (A), ``limit_a`` (A; 0 pauses everyone,
    else 6 A to 80 % of the breaker), ``t_wd_s`` (the chargers' watchdog
    timeout, s), ``fair_offline`` (Tesla's rule, S3), ``rotate_s`` (S4: the
    shortest time between two rotation hand-overs, and between a member's
    pause and resume by rotation, s)."""

    name: str
    breaker_a: float
    limit_a: float
    t_wd_s: float = 30.0
    fair_offline: bool = False
    rotate_s: float = 300.0


@dataclass
class Report:
    """What a charger said in its latest state message (DESIGN.md §4). A, Wh, s."""

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
    """A setpoint message sent to a member: ``seq``, the currents it carries
    (A) and when it was sent (``at``, s). ``ended`` (s): when it stopped being
    offered at the latest (None: it may be in force or still arrive)."""

    seq: int
    current_a: float
    offline_a: float
    start_a: float
    at: float
    ended: float | None = None


@dataclass
class Offer:
    """A pilot the member's EV may follow that is not a setpoint of this
    server run: one a report showed, the start current a session began on,
    or the restart assumption (S6). ``amps`` (A) is what it lets the EV draw;
    ``ended`` as for :class:`Sent`."""

    amps: float
    since: float
    ended: float | None = None


@dataclass
class Member:
    """The ledger's record of one member. Units: A, s.

    ``assumed_a``: what a restarted server assumes it may draw until it
    reports (S6: max(last setpoint, offline current)). ``offline_a`` and
    ``start_a`` are the values the charger is known to store. ``inherited``:
    what the previous server run may have left in force or in flight (S6),
    until the charger acknowledges a setpoint of this run (its epoch check
    then refuses anything older). ``target_a`` and
    ``binding`` are the allocator's latest decision and the constraint that
    bound it (S7)."""

    id: str
    unit_rating_a: float
    offline_a: float = DEFAULT_OFFLINE_A
    start_a: float = DEFAULT_START_A
    assumed_a: float = 0.0
    report: Report | None = None
    reported_at: float | None = None
    sent: list[Sent] = field(default_factory=list)
    seen: list[Offer] = field(default_factory=list)
    acked: Sent | None = None
    inherited: Sent | None = None
    online: bool = True
    removed_at: float | None = None
    target_a: float = 0.0
    binding: str = "idle"

    def last_sent(self) -> Sent | None:
        """The newest setpoint sent to it in this server run, or None."""
        return self.sent[-1] if self.sent else None


def effective(amps: float, m: Member) -> float:
    """What a pilot of ``amps`` lets member ``m``'s EV draw, A: clamped to
    its unit rating, and 0 below 6 A (C3: such a setpoint pauses)."""
    a = min(amps, m.unit_rating_a)
    return a if a >= MIN_A else 0.0


def connected(m: Member) -> bool:
    """A car is connected and the member is not faulted (its last report)."""
    return m.report is not None and m.report.state in CONNECTED and not m.report.fault


def _unacked(m: Member) -> list[Sent]:
    """Setpoint messages that may still arrive: sent and not yet superseded
    by an acknowledged one, and what a previous server run left in flight."""
    a = m.acked
    out = [s for s in m.sent if a is None or s.seq > a.seq]
    if m.inherited is not None and a is None:
        out.append(m.inherited)
    return out


def offline_possible(m: Member) -> float:
    """The offline current member ``m`` may have stored: what it last
    reported, or any higher value sent since that it has not acknowledged
    (its reports may be lost while it still receives), A."""
    return max([m.offline_a] + [s.offline_a for s in _unacked(m)])


def _start_term(m: Member) -> float:
    """The start current a new session on member ``m`` may begin with, A.
    While its lease has run out (its report says ``offline``), a new session
    starts on min(offline, start) (firmware/core/limit.py), and only a message
    renews the lease, each carrying the start current it stores."""
    r = m.report
    if r is not None and r.limit_by == "offline":
        return max([min(m.start_a, offline_possible(m))] + [x.start_a for x in _unacked(m)])
    return start_possible(m)


def start_possible(m: Member) -> float:
    """The start current member ``m`` may have stored, as
    :func:`offline_possible`, A."""
    return max([m.start_a] + [s.start_a for s in _unacked(m)])


class Ledger:
    """The S1 ledger of one group: ``members`` by id, ``epoch`` of this server
    run (acknowledgements count only when they name it), ``now`` the start
    time (s). ``restarted``: start every member at its ``assumed_a`` (S6)."""

    def __init__(self, group: GroupConfig, members: list[Member], epoch: int, now: float,
                 restarted: bool = True):
        self.group = group
        self.members = {m.id: m for m in members}
        self.epoch = epoch
        self.started_at = now
        for m in members:
            self.admit(m, now, restarted)

    def admit(self, m: Member, now: float, assume: bool = True) -> None:
        """Add member ``m``; with ``assume``, it may draw its ``assumed_a`` (at
        least its offline current), and store the offline and start currents
        it has, until it acknowledges a setpoint of this run and a window has
        passed (S6): messages of the previous run may still be in flight."""
        self.members[m.id] = m
        if assume:
            m.inherited = Sent(0, max(m.assumed_a, m.offline_a), m.offline_a, m.start_a, now)

    # -- what the charger says --------------------------------------------------

    def on_report(self, m: Member, report: Report, now: float) -> None:
        """Take member ``m``'s state message, received at ``now`` (s)."""
        prev = m.report
        start_before = _start_term(m)
        off_before = offline_possible(m)
        back = self.silent(m, now)   # also silent since a restart: its old lease is over
        if back:
            # Back from silence: nothing was sent to it for T_wd + the EV's
            # window + a margin, so its lease ran out and it has been on its
            # offline current, which the report's pilot shows. Its old
            # setpoints are over; counting them again would make a raise back
            # to them look free (the review: 52 A on a 50 A breaker). They
            # are forgotten, in flight or not: sessions are clean, so a
            # message sent before the silence is delivered by then or never.
            m.sent = []
            for o in m.seen:
                o.ended = _VOID
            m.inherited = None
        m.report = report
        m.reported_at = now
        if report.offline_a is not None:
            m.offline_a = report.offline_a
        if report.start_a is not None:
            m.start_a = report.start_a
        # A lower start or offline current now stored may have been in force
        # unseen (a car unplugged and plugged in again between two reports
        # starts on the old start current; a lease that ran out between them
        # offered the old offline current): its EV may follow that for a
        # window (the review: 24 A on a 20 A breaker).
        lost = max(start_before - _start_term(m), off_before - offline_possible(m))
        if lost > 0 and not back:
            m.seen.append(Offer(max(start_before, off_before), now, ended=now))
        was_on = prev is not None and prev.state in CONNECTED and not prev.fault
        if connected(m) and not was_on and not back:
            # A session began on the start current before this report said
            # so; the EV may follow that for a window after it was replaced.
            # (Back from silence, whatever it was offered while its lease
            # held ended at least the EV's window ago; its pilot shows what
            # it offers now.)
            m.seen.append(Offer(max(start_before, start_possible(m)), now, ended=now))
        if report.ack_epoch == self.epoch and report.ack_seq is not None:
            acked = next((s for s in m.sent if s.seq == report.ack_seq), None)
            if acked is not None and (m.acked is None or acked.seq > m.acked.seq):
                m.acked = acked
                for s in m.sent:
                    if s.seq < acked.seq and s.ended is None:
                        s.ended = now      # replaced by the time this report arrived
                for o in m.seen:
                    if o.ended is None:
                        o.ended = now
                if m.inherited is not None and m.inherited.ended is None:
                    m.inherited.ended = now
        # What the pilot offers now is an offer too (an old epoch's setpoint,
        # the offline current after a fallback, the start current).
        pilot = effective(report.pilot_a, m)
        open_seen = [o for o in m.seen if o.ended is None]
        if not any(o.amps == pilot for o in open_seen):
            for o in open_seen:
                o.ended = now
            m.seen.append(Offer(pilot, now))
        if report.state == "A" or (report.fault and report.relay is False):
            # No car, or the contactor open on a fault: nothing can follow
            # what was applied. A new session starts at the start current
            # (C2), which the fallback counts; only what is in flight may
            # still arrive.
            a = m.acked
            for s in m.sent:
                if a is not None and s.seq <= a.seq:
                    s.ended = _VOID
            for o in m.seen:
                o.ended = _VOID
        self._prune(m, now)

    def on_sent(self, m: Member, sent: Sent) -> None:
        """Record a setpoint sent to ``m``: it counts at once. A member that
        never acknowledges keeps at most ``UNACKED_KEPT`` of them: the two
        oldest are folded into one that keeps the higher currents."""
        m.sent.append(sent)
        a = m.acked
        unacked = [s for s in m.sent if a is None or s.seq > a.seq]
        if len(unacked) > UNACKED_KEPT:
            x, y = unacked[0], unacked[1]
            y.current_a = max(x.current_a, y.current_a)
            y.offline_a = max(x.offline_a, y.offline_a)
            y.start_a = max(x.start_a, y.start_a)
            m.sent.remove(x)

    def _prune(self, m: Member, now: float) -> None:
        """Forget offers nobody can follow any more (ended, and a report came
        in after their window)."""
        def gone(ended):
            return ended is not None and self._window_over(m, ended, now)

        a = m.acked
        m.sent = [s for s in m.sent if not (gone(s.ended) and (a is None or s.seq < a.seq))]
        m.seen = [o for o in m.seen if not gone(o.ended)]
        if m.inherited is not None and gone(m.inherited.ended):
            m.inherited = None

    def _window_over(self, m: Member, ended: float, now: float) -> bool:
        """The EV's window after an offer that ended at ``ended`` is over, and
        a report received after it shows what the EV does now."""
        if ended == _VOID:
            return True
        end = ended + FOLLOW_S
        return now >= end and m.reported_at is not None and m.reported_at >= end

    # -- the rule -----------------------------------------------------------------

    def t_wd(self, m: Member) -> float:
        """The watchdog timeout member ``m`` runs with: the longer of the
        group's and the one it reports, s."""
        r = m.report
        return max(self.group.t_wd_s, r.t_wd_s if r is not None and r.t_wd_s else 0)

    def silent(self, m: Member, now: float) -> bool:
        """The charger runs on its offline current: no report for T_wd +
        margin (counted from the start when it never reported), and no
        setpoint sent to it for T_wd + the EV's window + margin, since its
        lease runs from the last setpoint it received."""
        since = m.reported_at if m.reported_at is not None else self.started_at
        last = m.last_sent()
        sent_at = last.at if last is not None else self.started_at
        t_wd = self.t_wd(m)
        return now - since > t_wd + MARGIN_S and now - sent_at > t_wd + FOLLOW_S + MARGIN_S

    def stale(self, m: Member, now: float) -> bool:
        """Never reported in this run, or quiet for ``STALE_S``: nothing is
        sent to it, so that no lease is renewed blindly."""
        return m.reported_at is None or now - m.reported_at > STALE_S

    def followable_a(self, m: Member, now: float) -> float:
        """The highest offer member ``m``'s EV may still be following, A."""
        best = 0.0
        for s in m.sent:
            if s.ended is None or not self._window_over(m, s.ended, now):
                best = max(best, effective(s.current_a, m))
        for o in m.seen:
            if o.ended is None or not self._window_over(m, o.ended, now):
                best = max(best, o.amps)
        h = m.inherited
        if h is not None and (h.ended is None or not self._window_over(m, h.ended, now)):
            best = max(best, effective(h.current_a, m))
        return best

    def base_a(self, m: Member, now: float) -> float:
        """Member ``m``'s worst case without its start current, A: what the
        planner cannot change by lowering that start current."""
        off = offline_possible(m)
        if self.silent(m, now):
            return off
        w = max(off, self.followable_a(m, now))
        r = m.report
        if r is not None:
            w = max(w, r.measured_a)
        return w

    def worst_a(self, m: Member, now: float) -> float:
        """S1: the most member ``m`` may draw at ``now``, A (see the module).

        The start current counts for every member, not only idle ones: a car
        may plug in at an idle member at any moment, a person may unplug and
        plug in again faster than the server can answer (a new session starts
        at the start current, C2), and a fault's retry starts one too (the
        property test found a restarted server's ledger 2 A over a 30 A
        breaker from a charging member's 8 A start current)."""
        if self.silent(m, now):
            return offline_possible(m)
        return max(self.base_a(m, now), _start_term(m))

    def total_a(self, now: float) -> float:
        """Sum of the members' worst cases, A (S1: at most the breaker)."""
        return sum(self.worst_a(m, now) for m in self.members.values())

    def room_for(self, m: Member, now: float, total: float | None = None) -> float:
        """The largest worst case member ``m`` may have while the group stays
        within the breaker, A (``total``: :meth:`total_a`, when known)."""
        if total is None:
            total = self.total_a(now)
        return self.group.breaker_a - (total - self.worst_a(m, now))

    def projected_a(self, m: Member, now: float, current_a: float, offline_a: float,
                    start_a: float) -> float:
        """Member ``m``'s worst case once a setpoint of ``current_a`` with
        ``offline_a`` and ``start_a`` is sent, A. An offline current counts
        like a setpoint, and so does a start current."""
        return max(self.worst_a(m, now), effective(current_a, m), offline_a, start_a)

