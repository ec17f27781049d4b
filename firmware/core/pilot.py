"""SAE J1772 / IEC 61851-1 control pilot: duty-cycle encoding and state reading.

Pure logic: no hardware, no clock. Runs unchanged on MicroPython and CPython.

Units: currents in A (int or float), voltages in mV (int), duty as the 16-bit
``duty_u16`` of ``machine.PWM`` (0..65535) or as a percentage for reports.
"""
try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

# Encoding works in deciamps (0.1 A) with integer arithmetic, so that the
# 32-bit floats of the ESP32 can never round a duty above its ideal value.
_MIN_DA = const(60)      # 6 A: J1772 minimum offer
_MAX_DA = const(800)     # 80 A: top of the J1772 duty range
_U16 = const(65535)

MIN_A = 6
"""Smallest current a pilot may offer (A). Below it the EVSE pauses (C3)."""
MAX_A = 80
"""Largest current the J1772 duty range encodes (A)."""


def duty_u16(amps):
    """Return the ``duty_u16`` that offers ``amps``, or 0 when nothing is offered.

    Rule (DESIGN.md §5, SAE J1772 / IEC 61851-1 Table A.7):
    6-51 A -> duty % = A / 0.6; 51-80 A -> duty % = A / 2.5 + 64;
    ``duty_u16 = floor(duty% * 65535 / 100)``. The amps are first truncated to
    0.1 A, so the emitted duty never exceeds the ideal one. Above 80 A the offer
    is 80 A. Below 6 A (including 0 and negatives) the result is 0, meaning
    "do not run PWM: drive a static +12 V" (C3, C8); 0 is never a PWM duty here.
    """
    if amps >= MAX_A:
        da = _MAX_DA
    elif amps >= MIN_A:
        da = int(amps * 10)
    else:
        return 0
    if amps <= 51:   # the range follows the amps, not the truncated value
        return da * _U16 // 600
    return (da + 1600) * _U16 // 2500


def duty_percent(amps):
    """Ideal duty cycle in % for ``amps`` (A), before truncation; 0.0 below 6 A.

    Same ranges as :func:`duty_u16`. For reports and tests.
    """
    if amps >= MAX_A:
        amps = MAX_A
    elif amps < MIN_A:
        return 0.0
    if amps <= 51:
        return amps / 0.6
    return amps / 2.5 + 64


def offered_a(amps):
    """Current (A) that :func:`duty_u16` actually encodes for ``amps``: 0 below
    6 A, 80 above 80 A, otherwise truncated to 0.1 A. This is the ``pilot_a``
    of reports. (The duty cannot be inverted instead: 51 A is 85.0 % and 52 A
    is 84.8 %, so one duty range overlaps the other.)"""
    if amps >= MAX_A:
        return MAX_A
    if amps < MIN_A:
        return 0
    return int(amps * 10) / 10


def ev_reads_a(duty):
    """What an EV reads from ``duty`` (``duty_u16``), per IEC 61851-1 Table A.8.

    Returns the current in A (float), or 0 for "no charge allowed" and for
    "digital communication" (3-7 %):

    ======== ==========================
    duty     EV reads
    ======== ==========================
    < 3 %    no charge
    3-7 %    digital communication
    7-8 %    no charge
    8-10 %   6 A
    10-85 %  duty * 0.6
    85-96 %  (duty - 64) * 2.5
    96-97 %  80 A
    > 97 %   no charge
    ======== ==========================
    """
    # Integers, then one division: with the ESP32's single-precision floats
    # a percentage first and a product after read 28.000002 A from 28 A's
    # duty. One correctly rounded division of exact integers never reads more
    # than the duty encodes.
    pct100 = duty * 100      # duty % x 65535
    if pct100 < 8 * _U16:
        return 0.0
    if pct100 < 10 * _U16:
        return 6.0
    if pct100 <= 85 * _U16:
        return duty * 60 / _U16                       # duty % x 0.6
    if pct100 <= 96 * _U16:
        return (duty * 250 - 160 * _U16) / _U16       # (duty % - 64) x 2.5
    if pct100 <= 97 * _U16:
        return 80.0
    return 0.0


# Pilot high level -> state. Thresholds sit between the J1772 windows
# (A 11.40-12.60, B 8.36-9.56, C 5.48-6.49, D 2.62-3.25 V; E 0 V; F -12 V).
# Each threshold moves away from the accepted state: by _GAP_HYST_MV across
# A/B, B/C and C/D, so that a pilot wandering in the middle of the gap between
# two windows (7.0-7.8 V between C and B, say) keeps the accepted state and
# never cycles the contactor (issue 13), while a level 320 mV or more short of
# the neighbour's window edge still moves it; by _HYST_MV across D/E. From no
# state the threshold sits in the middle of the gap.
_AB_MV = const(10480)
_BC_MV = const(7420)
_CD_MV = const(4365)
_DE_MV = const(1310)
_E_LOW_MV = const(-1310)
_F_MV = const(-10000)     # high level at or below: pilot held at -12 V
_TOP_MV = const(13500)    # above: impossible level
_HYST_MV = const(200)
_GAP_HYST_MV = const(600)  # half the band held: B/C 6.82-8.02 V (windows end at 6.49 and 8.36 V)
_DIODE_MV = const(-10800)  # low level at or below: diode present (J1772 -12 +/- 0.6 V, margin)
DEBOUNCE = 3
"""Samples out of the last :data:`WINDOW` that must agree on a new state
before it is accepted (C10). At a 10 ms control tick a clean transition is
accepted after 30 ms, inside the 100 ms of C7; a noisy one, with single
outliers in between, still within 50 ms."""
WINDOW = 5
_KEEP = WINDOW - DEBOUNCE      # the accepted state needs 2 of the last 5 samples to hold

INVALID = "?"
"""Classification of a level that lies in no state window (a fault, not a state)."""

# (upper state, lower state, threshold from no state, hysteresis), mV.
_STEPS = (("A", "B", _AB_MV, _GAP_HYST_MV), ("B", "C", _BC_MV, _GAP_HYST_MV),
          ("C", "D", _CD_MV, _GAP_HYST_MV), ("D", "E", _DE_MV, _HYST_MV))


def classify(high_mv, prev=None):
    """Map the pilot's high level (mV) to a state letter ``A``..``F`` or :data:`INVALID`.

    ``prev`` is the state currently accepted; the threshold next to it moves
    away from it, by 600 mV across A/B, B/C and C/D (from C, B needs 8.02 V;
    from B, C needs 6.82 V or less: the J1772 windows end at 8.36 and 6.49 V)
    and by 200 mV across D/E. A level wandering in the gap between two windows
    therefore keeps the accepted state and cannot chatter.
    """
    if high_mv > _TOP_MV:
        return INVALID
    for upper, lower, mv, hyst in _STEPS:
        if prev == upper:
            mv -= hyst
        elif prev == lower:
            mv += hyst
        if high_mv >= mv:
            return upper
    if high_mv >= _E_LOW_MV:
        return "E"
    if high_mv <= _F_MV:
        return "F"
    return INVALID


class PilotReader:
    """Debounced pilot state and diode check, fed one burst reading per control tick.

    ``state`` is ``None`` until :data:`DEBOUNCE` of the last :data:`WINDOW`
    samples agree, then one of ``A``..``F`` or :data:`INVALID`; it changes when
    :data:`DEBOUNCE` of the last :data:`WINDOW` samples agree on another one. A
    single deviating sample never changes it, and isolated outliers cannot hold
    off a real transition (C10). A pilot that jumps between states, so that
    the accepted state has fewer than 2 of the last 5 samples and no other
    state has 3, becomes :data:`INVALID` (a fault): the accepted state is no
    longer true, and a contactor must not stay closed on it. ``diode_ok`` is True once :data:`DEBOUNCE` consecutive
    samples taken while PWM runs show a low level at or below -10.8 V
    (J1772 diode check); it is False while no PWM runs.
    """

    def __init__(self):
        self.state = None
        self.diode_ok = False
        self.high_mv = 0
        self.low_mv = 0
        self._recent = [""] * WINDOW   # "": no sample yet (never a classification)
        self._pos = 0
        self._seen = 0                 # samples in the window, up to WINDOW
        self._diode_count = 0

    def update(self, high_mv, low_mv, pwm_on):
        """Take one sample (high and low level in mV; ``pwm_on`` True while the
        pilot oscillates) and return the accepted state."""
        self.high_mv = high_mv
        self.low_mv = low_mv
        cand = classify(high_mv, self.state)
        recent = self._recent
        recent[self._pos] = cand
        self._pos = (self._pos + 1) % WINDOW
        if cand != self.state and recent.count(cand) >= DEBOUNCE:
            self.state = cand
        elif self._seen < WINDOW:
            self._seen += 1
        elif self.state is not None and self.state != INVALID \
                and recent.count(self.state) < _KEEP:
            # Four of the last five samples disagree with the accepted state
            # and no other state has three: the pilot jumps between states.
            # It is not in the accepted one, whatever it is in: a pilot level
            # fault, so that no contactor stays closed on it (C7).
            self.state = INVALID
        if pwm_on and low_mv <= _DIODE_MV:
            if self._diode_count < DEBOUNCE:
                self._diode_count += 1
        else:
            self._diode_count = 0
        self.diode_ok = self._diode_count >= DEBOUNCE
        return self.state
