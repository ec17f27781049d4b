"""Control pilot encoding and reading (DESIGN.md §5, C3, C8, C10)."""
from firmware.core import pilot

# DESIGN.md §5 reference table: A -> (duty %, duty_u16).
DUTY_TABLE = (
    (6, 10.0, 6553), (8, 13.333, 8738), (10, 16.667, 10922), (12, 20.0, 13107),
    (16, 26.667, 17476), (20, 33.333, 21845), (24, 40.0, 26214), (30, 50.0, 32767),
    (32, 53.333, 34952), (40, 66.667, 43690), (48, 80.0, 52428), (50, 83.333, 54612),
    (51, 85.0, 55704), (52, 84.8, 55573), (60, 88.0, 57670), (64, 89.6, 58719),
    (70, 92.0, 60292), (75, 94.0, 61602), (80, 96.0, 62913),
)


def test_duty_u16_matches_all_19_reference_vectors():
    assert len(DUTY_TABLE) == 19
    for amps, pct, u16 in DUTY_TABLE:
        assert pilot.duty_u16(amps) == u16, (amps, pilot.duty_u16(amps), u16)
        assert abs(pilot.duty_percent(amps) - pct) < 0.001, (amps, pilot.duty_percent(amps))


def test_emitted_duty_never_exceeds_ideal_so_ev_never_reads_more_than_offered():
    # Every 0.1 A from 6 to 80 A: truncation only ever rounds down. The ideal
    # is kept as an exact fraction: in single precision (the ESP32's floats)
    # 28 A's ideal 30583 reads 30582.998, and a float comparison would be the
    # test's error, not the pilot's.
    for da in range(60, 801):
        amps = da / 10
        u16 = pilot.duty_u16(amps)
        if da <= 510:       # ideal = da / 6 % = da x 65535 / 600
            num, den = da * 65535, 600
        else:               # ideal = (da / 25 + 64) % = (da + 1600) x 65535 / 2500
            num, den = (da + 1600) * 65535, 2500
        assert u16 * den <= num, (amps, u16, num / den)
        assert num - u16 * den < den, (amps, u16, num / den)
        assert pilot.ev_reads_a(u16) <= amps, (amps, pilot.ev_reads_a(u16))


def test_duty_just_above_51a_is_never_above_ideal():
    # 51 < A < 51.1 truncates to 51.0 A but belongs to the upper range: the
    # lower range's 85 % would exceed the ideal 84.4 % (found by review).
    for hundredths in range(5101, 5110):
        amps = hundredths / 100
        # ideal duty_u16 = (A / 2.5 + 64) x 65535 / 100 = (h + 16000) x 65535 / 25000
        assert pilot.duty_u16(amps) * 25000 <= (hundredths + 16000) * 65535, amps
    assert pilot.duty_u16(51) == 55704 and pilot.duty_u16(51.05) == 55311


def test_fractional_amps_truncate_down_not_up():
    # 8.09 A offers 8.0 A, never 8.1 A.
    assert pilot.duty_u16(8.09) == pilot.duty_u16(8)
    assert pilot.duty_u16(12.35) == 123 * 65535 // 600 == 13434


def test_below_6a_never_runs_pwm_so_no_duty_under_10_percent():
    for amps in (0, 3, 5.9, 5.99, -5):
        assert pilot.duty_u16(amps) == 0, amps
    assert pilot.duty_u16(6) == 6553


def test_above_80a_offers_80a_not_more():
    assert pilot.duty_u16(81) == 62913
    assert pilot.duty_u16(1e9) == 62913


def test_ev_reads_duty_per_iec_table_a8():
    u = 65535
    assert pilot.ev_reads_a(int(0.02 * u)) == 0        # < 3 %: no charge
    assert pilot.ev_reads_a(int(0.05 * u)) == 0        # 3-7 %: digital communication
    assert pilot.ev_reads_a(int(0.075 * u)) == 0       # 7-8 %: no charge
    assert pilot.ev_reads_a(int(0.09 * u)) == 6        # 8-10 %: 6 A
    assert abs(pilot.ev_reads_a(int(0.5 * u) + 1) - 30) < 0.01   # 10-85 %: duty x 0.6
    assert abs(pilot.ev_reads_a(int(0.90 * u) + 1) - 65) < 0.01  # 85-96 %: (duty-64) x 2.5
    assert pilot.ev_reads_a(int(0.965 * u)) == 80      # 96-97 %: 80 A
    assert pilot.ev_reads_a(int(0.98 * u)) == 0        # > 97 %: no charge
    for amps, _pct, u16 in DUTY_TABLE:
        if amps == 52:
            # 84.8 % lies in Table A.8's 10-85 % row: the EV reads 50.88 A.
            assert abs(pilot.ev_reads_a(u16) - 50.88) < 0.01
        else:
            assert abs(pilot.ev_reads_a(u16) - amps) < 0.01, (amps, pilot.ev_reads_a(u16))


def test_offered_a_reports_the_current_the_duty_encodes():
    assert pilot.offered_a(8) == 8
    assert pilot.offered_a(40) == 40
    assert pilot.offered_a(52.09) == 52
    assert pilot.offered_a(12.35) == 12.3
    assert pilot.offered_a(5.9) == 0
    assert pilot.offered_a(100) == 80


def test_nominal_levels_classify_to_their_states():
    for mv, st in ((12000, "A"), (9000, "B"), (6000, "C"), (3000, "D"), (0, "E"), (-12000, "F")):
        assert pilot.classify(mv) == st, (mv, pilot.classify(mv))
    # Window edges of J1772.
    for mv, st in ((11400, "A"), (12600, "A"), (8360, "B"), (9560, "B"), (5480, "C"),
                   (6490, "C"), (2620, "D"), (3250, "D")):
        assert pilot.classify(mv) == st, (mv, pilot.classify(mv))


def test_impossible_levels_classify_invalid():
    for mv in (14000, -5000):
        assert pilot.classify(mv) == pilot.INVALID, mv


def test_level_on_a_threshold_does_not_chatter_between_states():
    # 7.5 V sits just above the B/C threshold (7.42 V): with C accepted the
    # hysteresis keeps it C; with B accepted it stays B. In the middle of the
    # gap between the C and B windows, 6.82-8.02 V, the accepted state holds
    # (issue 13); a level 320 mV short of the other window moves it.
    assert pilot.classify(7500, "C") == "C"
    assert pilot.classify(7500, "B") == "B"
    assert pilot.classify(7500) == "B"                 # no state yet: the midpoint decides
    for mv in (6830, 7000, 7420, 7800, 8010):
        assert pilot.classify(mv, "C") == "C" and pilot.classify(mv, "B") == "B", mv
    assert pilot.classify(8040, "C") == "B" and pilot.classify(6800, "B") == "C"
    assert pilot.classify(8360, "C") == "B" and pilot.classify(6490, "B") == "C"
    assert pilot.classify(11100, "B") == "A" and pilot.classify(9900, "A") == "A"
    assert pilot.classify(4980, "D") == "C" and pilot.classify(3800, "C") == "C"


def test_single_sample_glitch_causes_no_state_change():
    r = pilot.PilotReader()
    for _ in range(pilot.DEBOUNCE):
        r.update(6000, -12000, True)
    assert r.state == "C"
    r.update(12000, -12000, True)   # one sample of state A: noise
    assert r.state == "C"
    r.update(6000, -12000, True)
    r.update(-12000, -12000, True)  # one sample of -12 V: noise
    r.update(0, 0, True)            # one sample of 0 V: noise (different)
    assert r.state == "C"


def test_real_transition_is_accepted_after_debounce():
    r = pilot.PilotReader()
    for _ in range(pilot.DEBOUNCE):
        r.update(6000, -12000, True)
    r.update(9000, -12000, True)
    r.update(9000, -12000, True)
    assert r.state == "C"
    r.update(9000, -12000, True)
    assert r.state == "B"


def test_diode_check_needs_minus_12v_low_level_while_pwm_runs():
    r = pilot.PilotReader()
    for _ in range(5):
        r.update(9000, -9000, True)    # EV without diode: low level -9 V
    assert not r.diode_ok
    for _ in range(5):
        r.update(9000, 9000, False)    # no PWM: nothing to check
    assert not r.diode_ok
    r.update(9000, -12000, True)
    r.update(9000, -12000, True)
    assert not r.diode_ok
    r.update(9000, -12000, True)
    assert r.diode_ok
    r.update(9000, 9000, False)
    assert not r.diode_ok
