"""The charger board: :class:`firmware.hal.Board` on real ESP32 hardware.

Device-only (imports ``machine`` and ``esp32``). Target: classic ESP32
(ESP32-WROOM-32), MicroPython 1.29. Units: mV, A, degrees C, ms.

Assumed board (change the constants below to match the real schematic):

* Pilot driver: GPIO ``_PILOT_OUT`` feeds a non-inverting +/-12 V op-amp
  stage, so GPIO 1 gives +12 V and GPIO 0 gives -12 V on the pilot wire. The
  pin needs an external pull-up so that the pilot sits at +12 V (not offering)
  before ``boot.py`` runs.
* Pilot sense: the pilot wire reaches the ADC through a resistor network
  (100 k from the pilot, 20 k to 3.3 V, 15 k to GND). It maps
  -12..+12 V to about 355..2250 mV, and the +/-13.5 V extremes to about
  237..2369 mV, inside the 150..2450 mV where ``read_uv()`` is linear
  (DESIGN.md §6, 11 dB attenuation).
* Contactor: GPIO ``_RELAY`` drives the coil driver, 1 = closed. The driver
  needs an external pull-down so that the coil stays open during boot.
* GFCI: a CCID20 (20 mA) residual-current module. Its trip output goes to
  ``_GFCI_TRIP`` (1 = tripped; the internal pull-up makes a missing module read
  as tripped). Its self-test winding is driven from ``_GFCI_TEST`` (1 = test
  current on).
* Current transformer: 2000:1 CT with an 18 ohm burden, biased near 1300 mV,
  on an ADC1 pin: 80 A RMS gives +/-1018 mV peak around the bias.
* Temperature: 10 k NTC (Beta 3950) from the ADC pin to GND, 10 k fixed
  resistor from 3.3 V to the ADC pin.

All ADC inputs are on ADC1 (GPIO32-39): ADC2 fails while WiFi is on.
"""
import math
import time

import esp32
import machine
from machine import ADC, PWM, RTC, WDT, Pin, Timer
from micropython import const

from firmware.hal import Board

# --- Pin map (GPIO numbers). boot.py repeats _PILOT_OUT, _RELAY and _GFCI_TEST:
# keep them equal. Strapping pins (0, 2, 5, 12, 15) and flash pins (6-11) are avoided.
_PILOT_OUT = const(25)   # pilot driver input: 1 = +12 V, 0 = -12 V, or 1 kHz PWM
_RELAY = const(26)       # contactor coil driver: 1 = closed
_GFCI_TRIP = const(27)   # CCID20 trip output, input with pull-up: 1 = tripped
_GFCI_TEST = const(13)   # CCID20 self-test winding driver: 1 = test current on
_RELAY_SENSE = const(32) # opto on the contactor's output side: 0 = output live (pulled up)
_GROUND_OK = const(33)   # ground-check circuit (L1 to PE through an opto): 0 = ground present
_PILOT_ADC = const(36)   # ADC1_CH0 (SENSOR_VP): pilot sense
_CT_ADC = const(39)      # ADC1_CH3 (SENSOR_VN): current transformer
_NTC_ADC = const(34)     # ADC1_CH6: board temperature NTC

# --- Pilot output.
_PWM_HZ = const(1000)          # J1772 / IEC 61851-1: 1 kHz (980-1020 Hz)
_DUTY_MIN = const(6553)        # 6 A, 10 % (DESIGN.md §5)
_DUTY_MAX = const(62913)       # 80 A, 96 %; never 100 % (C8)

# --- Pilot sense. V_adc = V_zero + V_pilot / gain with the divider above:
# gain = 12.667 (pilot V per ADC V), V_zero = 1302.6 mV (ADC reading at 0 V pilot).
# Nominal design values: calibrate on each board (apply +12 V and -12 V).
_PILOT_ZERO_UV = const(1302600)  # ADC uV at 0 V pilot
_PILOT_GAIN = const(12667)       # pilot mV per ADC mV, x1000
_PILOT_SAMPLES = const(40)       # ~35 us each: ~1.4 ms > one 1 kHz period

# --- Current transformer. Sampled by a hardware timer, one read every
# _CT_PERIOD_MS, so that the RMS covers whole mains cycles without any call
# blocking: 7 ms is not a divisor of a 50 Hz (20 ms) or 60 Hz (16.67 ms)
# cycle, so successive samples walk through the phase (20 evenly spaced
# phases at 50 Hz, 50 at 60 Hz); a window of 100 samples holds whole sets of both.
_CT_TIMER_ID = const(3)      # hardware timer 3 (0-2 stay free for other code)
_CT_PERIOD_MS = const(7)
_CT_WINDOW = const(100)      # samples per RMS value: 700 ms
_CT_BIAS_MV = const(1300)    # nominal bias; only keeps the sums small, the
                             # actual offset is removed as the window's mean
_CT_TURNS = const(2000)      # CT ratio 2000:1
_CT_BURDEN_OHM = const(18)   # burden resistor
_CT_A_PER_MV = _CT_TURNS / _CT_BURDEN_OHM / 1000  # 0.111 A (primary) per mV across the burden

# --- NTC. Beta model: 1/T = 1/T0 + ln(R/R0)/B (T in K).
_NTC_R0_OHM = const(10000)      # NTC resistance at 25 degrees C
_NTC_BETA = const(3950)         # NTC Beta (25/50), K
_NTC_SERIES_OHM = const(10000)  # fixed resistor from the supply to the ADC pin
_NTC_SUPPLY_MV = const(3300)    # divider supply (the 3.3 V rail)
_NTC_SAMPLES = const(8)         # averaged reads, ~0.3 ms
_NTC_PERIOD_MS = const(250)     # the NTC is read at most this often
_NTC_SHORT_MV = const(100)      # at or below: NTC shorted (~ +130 C or a fault)
_NTC_OPEN_MV = const(3000)      # at or above: NTC open (or colder than ~ -19 C)
_T0_K = 298.15
_T_SHORTED_C = 150.0   # reported for a shorted NTC: reads hot, so charging stops (fail safe)
_T_OPEN_C = -40.0      # reported for an open NTC (cannot be told from deep cold)

# --- Watchdog and reset marker.
_WDT_MS = const(5000)        # hardware watchdog timeout (ESP32 minimum 1000)
_RST_MAGIC = b"evse-rst:"    # prefix that marks a reset reason in RTC memory
_RST_MAX = const(200)        # longest reason kept, characters


def _pilot_mv(uv):
    # ADC uV -> pilot mV, integer math (stays below 2**30: no heap on the ESP32).
    return (uv - _PILOT_ZERO_UV) // 100 * _PILOT_GAIN // 10000


class Esp32Board(Board):
    """The charger board on a classic ESP32. See the module docstring for the
    assumed circuit and :class:`firmware.hal.Board` for the interface.

    Building it puts every output in its safe state (pilot static +12 V,
    contactor open, self-test off) and starts the current-transformer sampler.
    The hardware watchdog starts on the first :meth:`feed_wdt`.
    ``wdt_ms`` is the watchdog timeout in ms.
    """

    def __init__(self, wdt_ms=_WDT_MS):
        self._relay = Pin(_RELAY, Pin.OUT, value=0)
        self._pilot_pin = Pin(_PILOT_OUT, Pin.OUT, value=1)
        self._pwm = None
        self._gfci_test = Pin(_GFCI_TEST, Pin.OUT, value=0)
        self._gfci_in = Pin(_GFCI_TRIP, Pin.IN, Pin.PULL_UP)
        self._relay_sense = Pin(_RELAY_SENSE, Pin.IN, Pin.PULL_UP)
        self._ground = Pin(_GROUND_OK, Pin.IN, Pin.PULL_UP)
        self._gfci_seen = False
        self._gfci_in.irq(handler=self._on_gfci, trigger=Pin.IRQ_RISING)
        self._pilot_adc = ADC(Pin(_PILOT_ADC), atten=ADC.ATTN_11DB)
        self._read_uv = self._pilot_adc.read_uv     # bound once, not every tick
        self.high_mv = self.low_mv = 0
        self._ntc_adc = ADC(Pin(_NTC_ADC), atten=ADC.ATTN_11DB)
        self._ct_adc = ADC(Pin(_CT_ADC), atten=ADC.ATTN_11DB)
        self._ct_n = 0
        self._ct_sum = 0
        self._ct_sq = 0
        self._amps = 0.0
        self._ma = 0
        self._temp = None            # the last NTC reading (degrees C) and when, ms tick
        self._temp_at = 0
        self._wdt_ms = wdt_ms
        self._wdt = None
        self._ct_timer = Timer(_CT_TIMER_ID)
        self._ct_timer.init(mode=Timer.PERIODIC, period=_CT_PERIOD_MS, callback=self._on_ct)

    # --- pilot output (C2, C8)

    def _stop_pwm(self):
        pwm = self._pwm
        if pwm is not None:
            self._pwm = None
            pwm.deinit()

    def pilot_high(self):
        """Static +12 V as a plain GPIO level (not offering current, C8)."""
        self._stop_pwm()
        self._pilot_pin.init(Pin.OUT, value=1)

    def pilot_low(self):
        """Static -12 V as a plain GPIO level (state F, C8)."""
        self._stop_pwm()
        self._pilot_pin.init(Pin.OUT, value=0)

    def pilot_pwm(self, duty_u16):
        """1 kHz PWM at ``duty_u16`` (6553..62913, else ValueError).

        Starting from a static level, the PWM is created with the duty, so the
        first period already has it (C2). While PWM runs, only the duty changes
        (the LEDC applies it at the next period).
        """
        if not _DUTY_MIN <= duty_u16 <= _DUTY_MAX:
            raise ValueError("pilot duty_u16 out of range: %d" % duty_u16)
        pwm = self._pwm
        if pwm is None:
            self._pwm = PWM(self._pilot_pin, freq=_PWM_HZ, duty_u16=duty_u16)
        else:
            pwm.duty_u16(duty_u16)

    # --- inputs

    def read_pilot(self):
        """One burst of 40 ADC reads (~1.4 ms, more than one 1 kHz period).

        Leaves in ``high_mv`` and ``low_mv`` the highest and lowest pilot
        level seen, in pilot mV (ints). Without PWM both are the static level.
        Allocates nothing: the bound ``read_uv`` is made once, at start.
        """
        read = self._read_uv
        hi = 0
        lo = 4000000
        for _ in range(_PILOT_SAMPLES):
            uv = read()
            if uv > hi:
                hi = uv
            if uv < lo:
                lo = uv
        self.high_mv = _pilot_mv(hi)
        self.low_mv = _pilot_mv(lo)

    def _on_ct(self, _timer):
        # Timer callback (soft IRQ, runs between bytecodes). All sums stay
        # below 2**30: 100 * 1300**2 = 1.7e8.
        d = self._ct_adc.read_uv() // 1000 - _CT_BIAS_MV
        self._ct_sum += d
        self._ct_sq += d * d
        self._ct_n += 1
        if self._ct_n >= _CT_WINDOW:
            n = self._ct_n
            mean = self._ct_sum / n
            var = self._ct_sq / n - mean * mean
            self._amps = math.sqrt(var) * _CT_A_PER_MV if var > 0 else 0.0
            self._ma = int(self._amps * 1000)
            self._ct_n = 0
            self._ct_sum = 0
            self._ct_sq = 0

    def measured_a(self):
        """RMS current through the contactor, A (float >= 0).

        The last completed 700 ms window of the CT sampler (DC offset
        removed). Never blocks. The ADC noise gives a floor of a few tenths of
        an ampere; the value lags the real current by up to 1.4 s.
        """
        return self._amps

    def measured_ma(self):
        """The same reading in integer mA: for the energy count, which must
        not allocate a float on the control tick."""
        return self._ma

    def temp_c(self):
        """Board temperature, degrees C, from the NTC (Beta formula), read at
        most every 250 ms (the NTC's own time constant is seconds): in between
        the stored reading is returned, so the 10 ms tick neither waits on 8
        ADC reads nor allocates the formula's floats every time.

        A shorted NTC reads 150.0 (hot: charging stops); an open one reads
        -40.0. Accuracy depends on the 3.3 V rail (1 % is about 0.5 degree).
        """
        now = time.ticks_ms()
        if self._temp is None or time.ticks_diff(now, self._temp_at) >= _NTC_PERIOD_MS:
            self._temp = self._read_ntc()
            self._temp_at = now
        return self._temp

    def _read_ntc(self):
        read = self._ntc_adc.read_uv
        uv = 0
        for _ in range(_NTC_SAMPLES):
            uv += read()
        mv = uv // (_NTC_SAMPLES * 1000)
        if mv <= _NTC_SHORT_MV:
            return _T_SHORTED_C
        if mv >= _NTC_OPEN_MV:
            return _T_OPEN_C
        r = _NTC_SERIES_OHM * mv / (_NTC_SUPPLY_MV - mv)
        return 1.0 / (1.0 / _T0_K + math.log(r / _NTC_R0_OHM) / _NTC_BETA) - 273.15

    def _on_gfci(self, _pin):
        # Pin IRQ (soft): latch a trip edge so that a pulse shorter than a tick is not lost.
        self._gfci_seen = True

    def gfci_tripped(self):
        """True while the CCID reports residual current, or if it pulsed a trip
        since the previous call (the latch is cleared by this call)."""
        seen = self._gfci_seen
        self._gfci_seen = False
        return seen or self._gfci_in.value() == 1

    def relay_sense(self):
        """True while the contactor's output side is live (AC opto); after an
        open this means a welded contact. A broken opto (pulled up) reads
        "not live", so the ground check after the next close catches it."""
        return self._relay_sense.value() == 0

    def ground_ok(self):
        """True while the ground check sees protective earth (checked after
        every close). An unwired input (pulled up) reads "no ground": safe."""
        return self._ground.value() == 0

    def reset_cause(self):
        """Why the board last reset: the reason written before a deliberate
        reset (a crash, an OTA), else ``watchdog``, ``power_on``, ``hard``,
        ``soft`` or ``deepsleep`` from ``machine.reset_cause()``. Clears the
        stored reason, so that the next reset reports afresh."""
        text = self.read_reset_reason()
        self.write_reset_reason("")
        if text:
            return text
        cause = machine.reset_cause()
        for name, label in (("WDT_RESET", "watchdog"), ("PWRON_RESET", "power_on"),
                            ("HARD_RESET", "hard"), ("SOFT_RESET", "soft"),
                            ("DEEPSLEEP_RESET", "deepsleep")):
            if cause == getattr(machine, name, None):
                return label
        return "unknown (%d)" % cause

    # --- outputs

    def set_relay(self, closed):
        """Drive the contactor coil: True = closed."""
        self._relay.value(1 if closed else 0)

    def gfci_test(self, on):
        """Drive the CCID self-test winding: True = test current on."""
        self._gfci_test.value(1 if on else 0)

    def feed_wdt(self):
        """Feed the hardware watchdog, starting it on the first call.

        ``machine.WDT`` cannot be stopped and survives a soft reset (DESIGN.md
        §6), so it is only started once the control loop runs.
        """
        wdt = self._wdt
        if wdt is None:
            wdt = self._wdt = WDT(timeout=self._wdt_ms)
        wdt.feed()

    # --- OTA and reset bookkeeping

    def mark_app_valid(self):
        """Tell the bootloader this firmware image booted well (cancels the
        automatic rollback of a new OTA image). Returns False when the firmware
        was built without rollback support (``OSError``), else True."""
        try:
            esp32.Partition.mark_app_valid_cancel_rollback()
        except OSError:
            return False
        return True

    @staticmethod
    def write_reset_reason(text):
        """Keep ``text`` (str, up to 200 characters kept) in RTC memory, which
        survives ``machine.reset()``, soft resets and watchdog resets but not a
        power cycle. ``machine.reset_cause()`` cannot tell a crash from a
        deliberate reset (DESIGN.md §6): write the reason just before
        resetting. An empty ``text`` clears the marker."""
        RTC().memory(_RST_MAGIC + text[:_RST_MAX].encode() if text else b"")

    @staticmethod
    def read_reset_reason():
        """The text last stored by :meth:`write_reset_reason`, or None when
        there is none (power-on, cleared, or unreadable)."""
        try:
            mem = RTC().memory()
            if mem.startswith(_RST_MAGIC):
                return mem[len(_RST_MAGIC):].decode()
        except Exception:  # garbage after power-on: treat as "no marker"
            pass
        return None


class ImageUpdate:
    """A full MicroPython image update into the next OTA partition
    (``esp32.Partition``, DESIGN.md §6). Feed it the image in order with
    :meth:`write` (any chunk sizes), then :meth:`finish` makes it the next
    boot. The bootloader rolls the image back unless the new firmware calls
    :meth:`Esp32Board.mark_app_valid`, which the firmware does only after its
    health check (:class:`firmware.ota.update.Health`). Raises OSError on a flash
    error and ValueError when the image does not fit the partition."""

    BLOCK = 4096

    def __init__(self, size):
        running = esp32.Partition(esp32.Partition.RUNNING)  # type: ignore[arg-type]  # an int id is documented
        self.part = running.get_next_update()
        blocks = int(self.part.ioctl(4, 0) or 0)  # number of blocks in the partition
        if size > blocks * self.BLOCK:
            raise ValueError("image of %d bytes does not fit the %d-byte partition"
                             % (size, blocks * self.BLOCK))
        self.size = size
        self.block = 0
        self.buf = bytearray()

    def write(self, chunk):
        """Append ``chunk`` (bytes) of the image; full 4 KB blocks go to flash."""
        self.buf.extend(chunk)
        while len(self.buf) >= self.BLOCK:
            self.part.writeblocks(self.block, self.buf[:self.BLOCK])
            self.buf = self.buf[self.BLOCK:]
            self.block += 1

    def finish(self):
        """Write the last block (padded with 0xFF) and boot the new image next."""
        if self.buf:
            pad = bytearray(self.buf) + b"\xff" * (self.BLOCK - len(self.buf))
            self.part.writeblocks(self.block, pad)
            self.block += 1
            self.buf = bytearray()
        self.part.set_boot()
