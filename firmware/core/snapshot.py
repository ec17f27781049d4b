"""The core's state as the rest of the firmware sees it: one fixed-slot record.

The control loop refreshes it at the end of every tick
(:meth:`firmware.core.charger.Charger.tick`), in place: the record is made
once at boot, so that a tick allocates nothing for it. Every edge (the
uplink, OTA, diagnostics, the simulator's control channel) reads the core
only through it, and never writes it.

Within the control thread a read is always consistent. Another thread (the
REPL's diagnostics) uses :meth:`Snapshot.copy`, which retries until it saw
no tick in between.
"""

FIELDS = ("state", "pilot_a", "duty_u16", "relay", "output_live", "measured_a", "limit_a",
          "limit_by", "ack_seq", "epoch", "lease_age_ms", "online", "offline_a", "start_a",
          "t_wd_s", "fault", "lockout", "temp_c", "reset_reason", "high_mv", "low_mv",
          "diode_ok", "uptime_s", "session_wh", "rejected", "last_error", "stopping")
"""The record's fields, in report order."""


class Snapshot:
    """The fixed-slot record. Fields (units):

    ``state`` (``A``..``F``: ``F`` while a fault is latched), ``pilot_a`` (A
    the PWM offers now, 0 without PWM), ``duty_u16``, ``relay`` (contactor
    driven closed), ``output_live`` (contactor output sensed live),
    ``measured_a`` (A), ``limit_a``/``limit_by`` (the limit in force and why,
    DESIGN.md §4), ``ack_seq``/``epoch`` (last setpoint applied, None before
    one), ``lease_age_ms`` (ms since it), ``online`` (watchdog lease holds),
    ``offline_a``/``start_a`` (A), ``t_wd_s`` (s), ``fault`` (code or None),
    ``lockout`` (True only once the lockout record is on flash: a lockout is
    never reported before it would survive a reset), ``temp_c`` (degrees C,
    NaN when unusable), ``reset_reason``, ``high_mv``/``low_mv`` (pilot
    levels, mV), ``diode_ok``, ``uptime_s`` (s), ``session_wh`` (Wh, int),
    ``rejected`` (setpoints refused so far), ``last_error`` (why the latest
    was refused), ``stopping`` (None, ``stop`` or ``reboot``), ``ticks``
    (control ticks so far: the core's heartbeat).
    """

    def __init__(self):
        self.state = "A"
        self.pilot_a = 0  # type: int | float
        self.duty_u16 = 0
        self.relay = False
        self.output_live = False
        self.measured_a = 0.0
        self.limit_a = 0  # type: int | float
        self.limit_by = "start"
        self.ack_seq = None  # type: int | None
        self.epoch = None  # type: int | None
        self.lease_age_ms = 0
        self.online = True
        self.offline_a = 0
        self.start_a = 0
        self.t_wd_s = 0
        self.fault = None  # type: str | None
        self.lockout = False
        self.temp_c = 0.0
        self.reset_reason = ""
        self.high_mv = 0
        self.low_mv = 0
        self.diode_ok = False
        self.uptime_s = 0
        self.session_wh = 0
        self.rejected = 0
        self.last_error = None  # type: str | None
        self.stopping = None  # type: str | None
        self.ticks = 0
        self.writing = False      # True while the core refreshes the record
        # References set once by the core, for reading only: the settings in
        # force (a dict replaced whole on every change), the event log (a
        # list of (tick_ms, text)) and the persisted fault log's entries.
        self.settings = {}  # type: dict
        self.events = []  # type: list
        self.fault_entries = []  # type: list

    def as_dict(self):
        """The fields as a new dict (allocates: for reports and diagnostics,
        never on the control tick)."""
        out = {}
        for name in FIELDS:
            out[name] = getattr(self, name)
        return out

    def copy(self, tries=5):
        """A consistent dict of the fields, from any thread: retried while the
        core was refreshing the record during the read (``writing`` set, or
        ``ticks`` moved). After ``tries`` torn reads it returns the last one."""
        out = self.as_dict()
        for _ in range(tries):
            before = self.ticks
            if self.writing:
                continue
            out = self.as_dict()
            if self.ticks == before and not self.writing:
                break
        return out
