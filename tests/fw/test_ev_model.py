"""The simulated EV must behave like the reference (DESIGN.md §5)."""
from harness import raises

from firmware.core import pilot
from simboard.ev import SimEv


def test_ev_draws_what_it_reads_after_its_response_delay():
    ev = SimEv(max_a=48, delay_ms=3000)
    duty = pilot.duty_u16(40)
    ev.step(10, duty, True)
    assert ev.pilot_state() == "B"       # has not reacted yet
    for _ in range(299):
        ev.step(10, duty, True)
    assert ev.drawn_a == 0               # 3.0 s after it first saw 40 A: still waiting
    ev.step(10, duty, True)
    assert ev.drawn_a == 40
    assert ev.pilot_state() == "C"


def test_ev_never_draws_above_its_onboard_maximum():
    ev = SimEv(max_a=32, delay_ms=1000)
    for _ in range(200):
        ev.step(10, pilot.duty_u16(40), True)
    assert ev.drawn_a == 32


def test_ev_tapers_linearly_above_80_percent_soc():
    ev = SimEv(max_a=40, soc=0.9, delay_ms=1000)
    # 20 A to within single precision (the ESP32's floats: 24-bit mantissa,
    # 0.9 and 0.8 are not exact), far below the 0.1 A a pilot can offer.
    assert abs(ev.taper_a() - 20) < 20 * 2e-6, ev.taper_a()
    ev.soc = 0.85
    assert abs(ev.taper_a() - 30) < 30 * 2e-6, ev.taper_a()
    ev.soc = 0.8
    assert ev.taper_a() == 40
    ev.soc = 1.0
    assert ev.taper_a() == 0


def test_full_ev_returns_to_b():
    ev = SimEv(max_a=40, soc=1.0, delay_ms=1000)
    for _ in range(200):
        ev.step(10, pilot.duty_u16(40), True)
    assert ev.pilot_state() == "B"
    assert ev.drawn_a == 0


def test_ev_without_power_draws_nothing():
    ev = SimEv(max_a=40, delay_ms=1000)
    for _ in range(200):
        ev.step(10, pilot.duty_u16(16), False)
    assert ev.drawn_a == 0


def test_response_delay_outside_1_to_5_s_is_refused():
    raises(ValueError, SimEv, 32, 75000, 0.2, 500)
    raises(ValueError, SimEv, 32, 75000, 0.2, 6000)
