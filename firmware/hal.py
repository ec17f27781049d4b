"""The hardware-abstraction layer: the one interface the application drives.

Two implementations: :mod:`firmware.hal_esp32` (the charger board) and
:mod:`simboard.board` (a simulated board carrying a simulated EV). The
application only ever calls the methods below; none of them may block for
more than a pilot burst (about 2 ms on the ESP32).

This class documents the interface and gives the shared safe-state sequence;
it holds no hardware.
"""


class Board:
    """Interface of a charger board. Units: mV, A, degrees C.

    Pilot output (exactly one mode at a time):

    * ``pilot_high()``: static +12 V driven as a plain GPIO level, no PWM
      (not offering current, C8).
    * ``pilot_pwm(duty_u16)``: 1 kHz PWM; the very first period already has
      this duty (C2). ``duty_u16`` is 6553..62913 (6..80 A, DESIGN.md §5).
    * ``pilot_low()``: static -12 V (state F, fault, C8).

    Inputs:

    * ``read_pilot()``: sample one burst and leave its top and bottom pilot
      levels in ``high_mv`` and ``low_mv`` (int mV, +12 V is about 12000).
      Attributes rather than a returned tuple: the 10 ms control tick then
      allocates nothing (issue 12).
    * ``measured_a()`` -> current drawn through the contactor, A (float >= 0).
    * ``measured_ma()`` -> the same reading in mA (int >= 0): the energy count
      uses it, so that the tick does no float arithmetic (each float result
      is a heap allocation on the ESP32).
    * ``temp_c()`` -> board temperature, degrees C.
    * ``gfci_tripped()`` -> True while the CCID reports residual current.
    * ``relay_sense()`` -> True while the contactor's output side is live
      (after an open: a welded contact).
    * ``ground_ok()`` -> True while the ground check sees protective earth.
    * ``reset_cause()`` -> why the board last reset (``power_on``,
      ``watchdog``, ``crash: ...``), read once at boot.

    Outputs:

    * ``set_relay(closed)``: drive the contactor coil (True = closed).
    * ``gfci_test(on)``: drive the CCID self-test winding.
    * ``feed_wdt()``: feed the hardware watchdog; only the control loop calls it.
    """

    def pilot_high(self):
        raise NotImplementedError

    def pilot_pwm(self, duty_u16):
        raise NotImplementedError

    def pilot_low(self):
        raise NotImplementedError

    def read_pilot(self):
        raise NotImplementedError

    def set_relay(self, closed):
        raise NotImplementedError

    def measured_a(self):
        raise NotImplementedError

    def measured_ma(self):
        raise NotImplementedError

    def temp_c(self):
        raise NotImplementedError

    def gfci_tripped(self):
        raise NotImplementedError

    def gfci_test(self, on):
        raise NotImplementedError

    def relay_sense(self):
        raise NotImplementedError

    def ground_ok(self):
        raise NotImplementedError

    def reset_cause(self):
        raise NotImplementedError

    def mark_app_valid(self):
        """Keep the running firmware image (cancel the bootloader's rollback).
        Called only once a new version has passed its health check."""
        raise NotImplementedError

    def feed_wdt(self):
        raise NotImplementedError

    def safe_state(self):
        """Contactor open, then pilot static +12 V. Never raises: it is what the
        supervisor calls after an unhandled error."""
        try:
            self.set_relay(False)
        except Exception:  # keep going: the pilot must still stop offering
            pass
        try:
            self.pilot_high()
        except Exception:
            pass
