"""Smoke run of the firmware benchmarks (issue 7): they complete and return
their figures. No timing is asserted here; `make bench` prints the figures."""
from evse_tools.bench import firmware


def test_firmware_benchmarks_complete(mosquitto, tmp_path):
    lat = firmware.setpoint_latency(mosquitto, tmp_path, 10)
    assert lat["n"] + lat["lost"] == 10 and lat["n"] >= 1
    relay = firmware.relay_latency_virtual()
    assert set(relay) == {"c_to_b", "gfci"} and all(v["ticks"] >= 1 for v in relay.values())
    wd = firmware.fallback_accuracy(mosquitto, tmp_path)
    assert set(wd) == {"reachable", "blackholed"}
