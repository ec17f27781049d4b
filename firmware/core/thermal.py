"""Over-temperature derating with hysteresis (C9). Pure logic.

=====  ===========  ==========  ====================================
level  engages at   releases    effect
=====  ===========  ==========  ====================================
1      65 degrees   62 degrees  half the current in force
2      68 degrees   65 degrees  a quarter of it, never below 6 A
3      71 degrees   68 degrees  stop: over-temperature fault
=====  ===========  ==========  ====================================

Each step releases 3 degrees C below where it engaged. Temperatures are
compared in tenths of a degree, as integers, so that 32-bit floats cannot
flip a step at its threshold.
"""

HALF = 1
QUARTER = 2
STOP = 3

_ENGAGE = (650, 680, 710)     # tenths of a degree C, for levels 1, 2, 3
_RELEASE = (620, 650, 680)
_INF = float("inf")
_NINF = float("-inf")


class Derate:
    """Tracks the derating level; :meth:`update` takes each new reading."""

    def __init__(self):
        self.level = 0
        self._last = None

    def update(self, temp_c):
        """Take a reading (degrees C); return the level 0..3. A reading that is
        not a finite number (a broken sensor) counts as the stop level. Called
        every control tick: a reading equal to the last one costs no float
        arithmetic (each float result is a heap allocation on the ESP32)."""
        if temp_c != temp_c or temp_c == _INF or temp_c == _NINF:
            self.level = STOP
            self._last = None
            return STOP
        if temp_c == self._last:
            return self.level
        self._last = temp_c
        t = int(temp_c * 10)
        level = self.level
        while level < STOP and t >= _ENGAGE[level]:
            level += 1
        while level > 0 and t <= _RELEASE[level - 1]:
            level -= 1
        self.level = level
        return level


def cap(amps, level):
    """The current allowed at derating ``level`` when ``amps`` (A) would be in
    force: ``amps`` at 0, half at 1, a quarter at 2 (never below 6 A, and never
    above ``amps``), 0 at 3."""
    if level <= 0:
        return amps
    if level >= STOP:
        return 0
    derated = amps / 2 if level == HALF else amps / 4
    return min(amps, max(6, derated))
