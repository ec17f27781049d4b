"""SQLite storage of load groups and their member chargers.

Currents are in amperes (A), times in seconds (s); ``last_sent_at`` is unix
time. Every mutating method runs as one transaction: input is validated first,
and anything refused raises :class:`StoreError` (a ``ValueError``) and leaves the
database unchanged.

Rules enforced here (DESIGN.md §1, §3, §4):

* group limit = 80 % of the breaker at most (NEC 625.41, the 125 % continuous-load
  rule), and at least the 6 A J1772 minimum current, or 0: every member paused;
* group names and charger ids follow the wire contract's id rule ``[a-z0-9-]{1,32}``;
* a charger belongs to exactly one group;
* offline and start currents are 0 or 6 A..unit rating (S3, S4: never 0 < x < 6);
* the watchdog timeout ``t_wd_s`` is 10..600 s (C4).

The store is safe to share between threads (one connection behind a lock), and
several processes may open the same file (WAL journal, busy timeout), e.g. the
installer's CLI while the service runs.
"""
import math
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

SEED_LIMITS = {20: 16, 30: 24, 40: 32, 50: 40, 100: 75}
MIN_CURRENT_A = 6          # J1772 minimum offered current
MAX_CURRENT_A = 80         # J1772 maximum offered current (duty 96 %)
SEED_CURRENT_A = 8         # seed's default start and offline current
BREAKER_RANGE_A = (6, 400)
T_WD_RANGE_S = (10, 600)
_ID_RE = re.compile(r"[a-z0-9-]{1,32}")

SCHEMA_VERSION = 2
"""1: the first; 2: a group limit of 0 (everyone paused) is allowed, and each
member's worst case (S1) is kept with its last setpoint."""
_GROUPS = """
CREATE TABLE IF NOT EXISTS %s (
    name         TEXT PRIMARY KEY,
    breaker_a    INTEGER NOT NULL,
    limit_a      INTEGER NOT NULL CHECK ((limit_a = 0 OR limit_a >= 6) AND limit_a * 5 <= breaker_a * 4),
    fair_offline INTEGER NOT NULL DEFAULT 0 CHECK (fair_offline IN (0, 1)),
    t_wd_s       INTEGER NOT NULL DEFAULT 30,
    created      REAL NOT NULL,
    updated      REAL NOT NULL
)"""
_SCHEMA = (_GROUPS % "groups") + """;
CREATE TABLE IF NOT EXISTS members (
    id              TEXT PRIMARY KEY,
    group_name      TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    unit_rating_a   REAL NOT NULL,
    offline_a       REAL NOT NULL DEFAULT 8,
    start_a         REAL NOT NULL DEFAULT 8,
    last_setpoint_a REAL,
    last_seq        INTEGER,
    last_epoch      INTEGER,
    last_sent_at    REAL,
    worst_a         REAL
);
CREATE INDEX IF NOT EXISTS members_by_group ON members(group_name);
"""


class StoreError(ValueError):
    """A refused operation; the message is meant for the installer."""


def default_limit(breaker_a: int) -> int:
    """Default group limit in A for a breaker of ``breaker_a`` A.

    The seed's chart (20->16, 30->24, 40->32, 50->40, 100->75 A); any other
    breaker gets floor(0.8 x breaker): NEC 625.41 sizes EV charging as a
    continuous load, so the breaker must be 125 % of it, i.e. the load at most
    80 % of the breaker.
    """
    if type(breaker_a) is not int or breaker_a <= 0:
        raise StoreError("breaker must be a positive whole number of amperes, got %r" % (breaker_a,))
    return SEED_LIMITS.get(breaker_a, breaker_a * 4 // 5)


def max_limit(breaker_a: int) -> int:
    """Largest group limit in A allowed on a ``breaker_a`` A breaker (80 %, NEC 625.41)."""
    return breaker_a * 4 // 5


@dataclass
class Member:
    """A charger in a group. Currents in A; ``last_sent_at`` in unix seconds.

    ``offline_a`` and ``start_a`` are the values the server last assigned (S3);
    ``last_*`` describe the last setpoint sent, and ``worst_a`` the ledger's
    worst case for it then (an EV may still follow a higher setpoint sent
    just before), kept so that a restarted server can assume the worst (S6).
    """
    id: str
    group: str
    unit_rating_a: float
    offline_a: float = SEED_CURRENT_A
    start_a: float = SEED_CURRENT_A
    last_setpoint_a: float | None = None
    last_seq: int | None = None
    last_epoch: int | None = None
    last_sent_at: float | None = None
    worst_a: float | None = None


@dataclass
class Group:
    """A load group: chargers sharing one breaker (``breaker_a``, A) under a
    shared limit (``limit_a``, A, at most 80 % of the breaker). ``fair_offline``
    selects floor(limit / members) as the offline current instead of the seed's
    8 A (S3); ``t_wd_s`` is the chargers' connectivity-watchdog timeout, s (C4).
    """
    name: str
    breaker_a: int
    limit_a: int
    fair_offline: bool = False
    t_wd_s: int = 30
    members: list[Member] = field(default_factory=list)


# -- validation ---------------------------------------------------------------

def _check_id(value, what):
    if type(value) is not str or not _ID_RE.fullmatch(value):
        raise StoreError("%s %r is not valid: use 1 to 32 characters of a-z, 0-9 and '-'"
                         % (what, value))
    return value


def _check_int(value, lo, hi, what, unit):
    if type(value) is not int:
        raise StoreError("%s must be a whole number (%s), got %r" % (what, unit, value))
    if not lo <= value <= hi:
        raise StoreError("%s %d %s is out of range (%d..%d %s)" % (what, value, unit, lo, hi, unit))
    return value


def _check_amps(value, lo, hi, what, allow_zero=False):
    if type(value) not in (int, float) or not math.isfinite(value):
        raise StoreError("%s must be a finite number of amperes, got %r" % (what, value))
    if allow_zero and value == 0:
        return 0.0
    if not lo <= value <= hi:
        span = "0 or %g..%g A" % (lo, hi) if allow_zero else "%g..%g A" % (lo, hi)
        raise StoreError("%s %g A is out of range (%s)" % (what, value, span))
    return float(value)


def _check_limit(limit_a, breaker_a):
    """A group limit: 0 (everyone paused) or 6 A to 80 % of the breaker, whole amps."""
    below = ("limit %s A is below the %d A minimum charging current (J1772); 0 pauses the group"
             % ("%g" % limit_a if type(limit_a) in (int, float) else "?", MIN_CURRENT_A))
    if type(limit_a) is float and math.isfinite(limit_a) and 0 < limit_a < MIN_CURRENT_A:
        raise StoreError(below)
    if type(limit_a) is not int:
        raise StoreError("limit must be a whole number of amperes, got %r" % (limit_a,))
    if limit_a == 0:
        return 0
    top = max_limit(breaker_a)
    if top < MIN_CURRENT_A:
        raise StoreError("a %d A breaker allows at most %d A (80 %%, NEC 625.41), below the %d A "
                         "minimum charging current" % (breaker_a, top, MIN_CURRENT_A))
    if limit_a < 0:
        raise StoreError("limit %d A is negative" % limit_a)
    if limit_a < MIN_CURRENT_A:
        raise StoreError(below)
    if limit_a > top:
        raise StoreError("limit %d A exceeds 80 %% of the %d A breaker (%d A max, NEC 625.41)"
                         % (limit_a, breaker_a, top))
    return limit_a


def _check_breaker(breaker_a):
    return _check_int(breaker_a, BREAKER_RANGE_A[0], BREAKER_RANGE_A[1], "breaker", "A")


def _member(row):
    return Member(id=row["id"], group=row["group_name"], unit_rating_a=row["unit_rating_a"],
                  offline_a=row["offline_a"], start_a=row["start_a"],
                  last_setpoint_a=row["last_setpoint_a"], last_seq=row["last_seq"],
                  last_epoch=row["last_epoch"], last_sent_at=row["last_sent_at"],
                  worst_a=row["worst_a"])


# -- the store ----------------------------------------------------------------

class GroupStore:
    """Groups and members in one SQLite file at ``path`` (``":memory:"`` works too)."""

    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            with self._tx() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError("database %s has schema version %d; this server knows up to %d"
                                     % (self.path, version, SCHEMA_VERSION))
            if version == 1:
                self._migrate_1_to_2()
            with self._tx() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
        except BaseException:
            self._db.close()
            raise

    def _migrate_1_to_2(self):
        """Schema 1 refused a limit of 0. SQLite cannot change a CHECK, so the
        groups table is copied into one with the new rule, in one
        transaction, with foreign keys off so that no member is cascaded
        away (SQLite's documented procedure for a table change)."""
        self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            with self._tx() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] != 1:
                    return          # another process migrated it meanwhile
                db.execute(_GROUPS % "groups_v2")
                db.execute("INSERT INTO groups_v2 SELECT name, breaker_a, limit_a, fair_offline,"
                           " t_wd_s, created, updated FROM groups")
                db.execute("DROP TABLE groups")
                db.execute("ALTER TABLE groups_v2 RENAME TO groups")
                db.execute("ALTER TABLE members ADD COLUMN worst_a REAL")
                if db.execute("PRAGMA foreign_key_check").fetchall():
                    raise StoreError("database %s: members without a group after migration"
                                     % self.path)
                db.execute("PRAGMA user_version = 2")
        finally:
            self._db.execute("PRAGMA foreign_keys = ON")

    def close(self):
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _tx(self):
        """One write transaction: commit on success, roll back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reading --

    def _group_row(self, db, name):
        row = db.execute("SELECT * FROM groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError("unknown group %r" % (name,))
        return row

    def _load(self, db, row):
        members = [_member(m) for m in db.execute(
            "SELECT * FROM members WHERE group_name = ? ORDER BY id", (row["name"],))]
        return Group(name=row["name"], breaker_a=row["breaker_a"], limit_a=row["limit_a"],
                     fair_offline=bool(row["fair_offline"]), t_wd_s=row["t_wd_s"],
                     members=members)

    def get_group(self, name) -> Group:
        """The group ``name`` with its members (sorted by id); StoreError if unknown."""
        with self._lock:
            return self._load(self._db, self._group_row(self._db, name))

    def list_groups(self) -> list[Group]:
        """Every group with its members, sorted by name."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM groups ORDER BY name").fetchall()
            return [self._load(self._db, row) for row in rows]

    def group_of(self, member_id) -> Group | None:
        """The group that charger ``member_id`` belongs to, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT g.* FROM groups g JOIN members m ON m.group_name = g.name WHERE m.id = ?",
                (member_id,)).fetchone()
            return None if row is None else self._load(self._db, row)

    # -- groups --

    def create_group(self, name, breaker_a, limit_a=None, fair_offline=False, t_wd_s=30) -> Group:
        """Create a group on a ``breaker_a`` A breaker. ``limit_a`` (A) defaults to the
        seed chart (:func:`default_limit`); ``t_wd_s`` is the watchdog timeout, 10..600 s."""
        _check_id(name, "group name")
        _check_breaker(breaker_a)
        limit_a = _check_limit(default_limit(breaker_a) if limit_a is None else limit_a, breaker_a)
        _check_int(t_wd_s, T_WD_RANGE_S[0], T_WD_RANGE_S[1], "watchdog timeout", "s")
        if type(fair_offline) is not bool:
            raise StoreError("fair_offline must be true or false, got %r" % (fair_offline,))
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise StoreError("group %r already exists" % (name,))
            db.execute("INSERT INTO groups (name, breaker_a, limit_a, fair_offline, t_wd_s,"
                       " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, breaker_a, limit_a, int(fair_offline), t_wd_s, now, now))
            return self._load(db, self._group_row(db, name))

    def delete_group(self, name):
        """Delete group ``name`` and its members."""
        with self._tx() as db:
            self._group_row(db, name)
            db.execute("DELETE FROM members WHERE group_name = ?", (name,))
            db.execute("DELETE FROM groups WHERE name = ?", (name,))

    def _update_group(self, name, check=None, **values):
        with self._tx() as db:
            row = self._group_row(db, name)
            if check:
                check(row)
            cols = ", ".join("%s = ?" % k for k in values)
            db.execute("UPDATE groups SET %s, updated = ? WHERE name = ?" % cols,
                       (*values.values(), time.time(), name))
            return self._load(db, self._group_row(db, name))

    def set_breaker(self, name, breaker_a, limit_a=None) -> Group:
        """Change the breaker (A). The limit (A) becomes ``limit_a`` or, when None,
        the chart default for the new breaker (never the old limit)."""
        _check_breaker(breaker_a)
        limit_a = _check_limit(default_limit(breaker_a) if limit_a is None else limit_a, breaker_a)
        return self._update_group(name, breaker_a=breaker_a, limit_a=limit_a)

    def set_limit(self, name, limit_a) -> Group:
        """Change the group limit (A): 0 pauses every member, else 6 A up to
        80 % of the breaker; anything else is refused (StoreError)."""
        return self._update_group(name, lambda row: _check_limit(limit_a, row["breaker_a"]),
                                  limit_a=limit_a)

    def set_fair_offline(self, name, on) -> Group:
        """Choose floor(limit / members) (True) or the seed's 8 A (False) offline current (S3)."""
        if type(on) is not bool:
            raise StoreError("fair_offline must be true or false, got %r" % (on,))
        return self._update_group(name, fair_offline=int(on))

    # -- members --

    def add_member(self, group, member_id, unit_rating_a) -> Member:
        """Add charger ``member_id`` (unit rating 6..80 A) to ``group``. Its offline and
        start currents begin at the seed's 8 A (capped at the unit rating)."""
        _check_id(member_id, "charger id")
        rating = _check_amps(unit_rating_a, MIN_CURRENT_A, MAX_CURRENT_A, "unit rating")
        seed = min(float(SEED_CURRENT_A), rating)
        with self._tx() as db:
            self._group_row(db, group)
            row = db.execute("SELECT group_name FROM members WHERE id = ?", (member_id,)).fetchone()
            if row is not None:
                if row["group_name"] == group:
                    raise StoreError("charger %r is already a member of group %r" % (member_id, group))
                raise StoreError("charger %r already belongs to group %r; a charger is in one "
                                 "group only (remove it there first)" % (member_id, row["group_name"]))
            db.execute("INSERT INTO members (id, group_name, unit_rating_a, offline_a, start_a)"
                       " VALUES (?, ?, ?, ?, ?)", (member_id, group, rating, seed, seed))
            db.execute("UPDATE groups SET updated = ? WHERE name = ?", (time.time(), group))
            return _member(self._member_row(db, member_id))

    def _member_row(self, db, member_id):
        row = db.execute("SELECT * FROM members WHERE id = ?", (member_id,)).fetchone()
        if row is None:
            raise StoreError("unknown charger %r (not a member of any group)" % (member_id,))
        return row

    def remove_member(self, member_id):
        """Remove charger ``member_id`` from its group."""
        with self._tx() as db:
            row = self._member_row(db, member_id)
            db.execute("DELETE FROM members WHERE id = ?", (member_id,))
            db.execute("UPDATE groups SET updated = ? WHERE name = ?", (time.time(), row["group_name"]))

    def record_setpoint(self, member_id, amps, seq, epoch, sent_at):
        """Remember the setpoint just sent: ``amps`` (A, 0..80), ``seq`` and ``epoch``
        (integers >= 0) and ``sent_at`` (unix time, s). Kept for S6 after a restart."""
        amps = _check_amps(amps, 0, MAX_CURRENT_A, "setpoint")
        for value, what in ((seq, "seq"), (epoch, "epoch")):
            if type(value) is not int or value < 0:
                raise StoreError("%s must be an integer >= 0, got %r" % (what, value))
        if type(sent_at) not in (int, float) or not math.isfinite(sent_at):
            raise StoreError("sent_at must be a finite unix time in seconds, got %r" % (sent_at,))
        with self._tx() as db:
            self._member_row(db, member_id)
            db.execute("UPDATE members SET last_setpoint_a = ?, last_seq = ?, last_epoch = ?,"
                       " last_sent_at = ? WHERE id = ?", (amps, seq, epoch, float(sent_at), member_id))

    def record_sent(self, rows) -> list:
        """Remember a whole round of setpoints in one transaction (a round may
        send thousands). ``rows``: ``(member_id, amps, seq, epoch, sent_at,
        offline_a, start_a[, worst_a])`` with the units of :meth:`record_setpoint`
        and :meth:`record_member_currents`; ``worst_a`` (A) is the ledger's
        worst case for the member (S1), None if unknown. A row for a member no
        longer in the database, or with a bad value, is skipped; returns the
        skipped ids."""
        skipped = []
        with self._tx() as db:
            for member_id, amps, seq, epoch, sent_at, offline_a, start_a, *more in rows:
                worst = more[0] if more else None
                row = db.execute("SELECT unit_rating_a FROM members WHERE id = ?", (member_id,)).fetchone()
                try:
                    if row is None:
                        raise StoreError("unknown charger %r" % (member_id,))
                    rating = row["unit_rating_a"]
                    amps = _check_amps(amps, 0, MAX_CURRENT_A, "setpoint")
                    off = _check_amps(offline_a, MIN_CURRENT_A, rating, "offline current", True)
                    start = _check_amps(start_a, MIN_CURRENT_A, rating, "start current", True)
                    if type(seq) is not int or type(epoch) is not int or seq < 0 or epoch < 0:
                        raise StoreError("seq and epoch must be integers >= 0")
                    if worst is not None:
                        worst = _check_amps(worst, 0, 1000, "worst case")
                except StoreError:
                    skipped.append(member_id)
                    continue
                db.execute("UPDATE members SET last_setpoint_a = ?, last_seq = ?, last_epoch = ?,"
                           " last_sent_at = ?, offline_a = ?, start_a = ?, worst_a = ? WHERE id = ?",
                           (amps, seq, epoch, float(sent_at), off, start, worst, member_id))
        return skipped

    def record_member_currents(self, member_id, offline_a=None, start_a=None) -> Member:
        """Remember the offline and/or start current (A) assigned to a charger (S3).
        Each is 0 or 6 A..the unit rating; None leaves it unchanged."""
        with self._tx() as db:
            row = self._member_row(db, member_id)
            rating = row["unit_rating_a"]
            new = {}
            if offline_a is not None:
                new["offline_a"] = _check_amps(offline_a, MIN_CURRENT_A, rating, "offline current", True)
            if start_a is not None:
                new["start_a"] = _check_amps(start_a, MIN_CURRENT_A, rating, "start current", True)
            if new:
                cols = ", ".join("%s = ?" % k for k in new)
                db.execute("UPDATE members SET %s WHERE id = ?" % cols, (*new.values(), member_id))
            return _member(self._member_row(db, member_id))
