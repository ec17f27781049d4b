"""Simulated electric vehicle for the simulated board (never deployed to a charger).

The EV reads the pilot the way IEC 61851-1 Table A.8 says
(:func:`firmware.core.pilot.ev_reads_a`), charges up to its onboard charger's
maximum, follows pilot changes after a configurable response delay (1-5 s,
DESIGN.md §5; IEC Table A.6 lets an EV take up to 5 s), and tapers like the
two-stage battery model of Caltech's ACN-Sim: constant current up to
``taper_soc`` (about 80 %), then a linear decline to 0 at 100 %.

Pilot states it presents: ``A`` unplugged, ``B`` connected and not asking for
energy (no PWM offer, full, or told to wait), ``C`` asking for energy.
"""
from firmware.core.pilot import ev_reads_a

VOLTS = 240
"""Nominal single-phase supply, V (North American Level 2)."""


def check_number(name, value, lo, hi):
    """Raise ValueError unless ``value`` is a number (not a bool) in ``lo``..``hi``."""
    # bool is an int on CPython but not on MicroPython: reject it on both.
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise ValueError("%s must be a number %s..%s, got %r" % (name, lo, hi, value))


class SimEv:
    """One EV. Parameters: ``max_a`` onboard-charger maximum (A), ``battery_wh``
    usable capacity (Wh), ``soc`` state of charge 0..1, ``delay_ms`` response
    delay to pilot changes (1000..5000 ms), ``taper_soc`` start of taper (0..1),
    ``diode`` False to model a missing pilot diode, ``name`` for reports.

    State: ``plugged`` (bool), ``wants`` (False to hold in B), ``drawn_a`` (A),
    ``energy_wh`` (float, delivered this plug-in), ``soc``, ``overdraw_a``
    (None, or the current a faulty EV draws whatever it is offered, A).
    """

    def __init__(self, max_a=32, battery_wh=75000, soc=0.2, delay_ms=2000,
                 taper_soc=0.8, diode=True, name="ev"):
        check_number("max_a", max_a, 1, 80)
        check_number("battery_wh", battery_wh, 1000, 500000)
        check_number("soc", soc, 0, 1)
        check_number("delay_ms", delay_ms, 1000, 5000)
        check_number("taper_soc", taper_soc, 0.05, 0.99)
        if type(diode) is not bool:
            raise ValueError("diode must be true or false")
        if type(name) is not str or not 0 < len(name) <= 32:
            raise ValueError("name must be a string of 1..32 characters")
        self.max_a = max_a
        self.battery_wh = battery_wh
        self.soc = soc
        self.delay_ms = delay_ms
        self.taper_soc = taper_soc
        self.diode = diode
        self.name = name
        self.plugged = True
        self.wants = True
        self.overdraw_a = None    # a faulty EV: draws this whatever it is offered
        self.drawn_a = 0.0
        self.energy_wh = 0.0
        self._seen_a = 0.0        # what the EV reads from the pilot now
        self._target_a = 0.0      # what it has settled on after the delay
        self._pending = []        # [(due_ms_elapsed, amps)] not yet followed
        self._elapsed = 0         # ms since plug-in (EV-local time)

    def taper_a(self):
        """Most the battery accepts at the present SoC, A (two-stage model)."""
        if self.soc >= 1:
            return 0.0
        if self.soc <= self.taper_soc:
            return float(self.max_a)
        return self.max_a * (1 - self.soc) / (1 - self.taper_soc)

    def pilot_state(self):
        """``A``, ``B`` or ``C`` as presented through the EV's pilot resistors."""
        if not self.plugged:
            return "A"
        if self.wants and self.soc < 1 and (self._target_a > 0 or self.drawn_a > 0):
            return "C"
        return "B"

    def step(self, dt_ms, duty, powered):
        """Advance ``dt_ms`` ms with the pilot at ``duty`` (``duty_u16``; 0 = no
        PWM) and the contactor closed when ``powered``."""
        self._elapsed += dt_ms
        seen = ev_reads_a(duty) if duty else 0.0
        seen = int(seen * 10 + 0.05) / 10   # the onboard charger's 0.1 A resolution
        if seen != self._seen_a:
            self._seen_a = seen
            self._pending.append((self._elapsed + self.delay_ms, seen))
        while self._pending and self._pending[0][0] <= self._elapsed:
            self._target_a = self._pending.pop(0)[1]
        if powered and self.plugged and self.overdraw_a is not None:
            a = float(self.overdraw_a)
        elif powered and self.plugged and self.wants:
            a = min(self._target_a, self.max_a, self.taper_a())
        else:
            a = 0.0
        self.drawn_a = a
        if a > 0:
            wh = VOLTS * a * dt_ms / 3600000
            self.energy_wh += wh
            self.soc = min(1.0, self.soc + wh / self.battery_wh)
