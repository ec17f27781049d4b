"""The firmware as its own process on the device runtime, driven
over UDP like the simulator drives it (issue 2: one charger, no server)."""
import json

from evse_tools import charger_sim


def test_unix_port_charger_without_server_starts_at_8a_then_falls_back_to_offline(tmp_path):
    lines = []
    samples = charger_sim.run(t_wd_s=10, offline_a=6, plug_at=1.0, unplug_at=14.0,
                              ev=charger_sim.BOLT_EV, out=lines.append)
    s = charger_sim.summary(samples, 10)
    assert s["first_offer_a"] == 8 and s["first_offer_by"] == "start"
    assert s["offline_a"] == 6
    # The fallback is driven by the firmware's own clock: it comes at T_wd
    # after boot; telemetry arrives on loopback, so the reading is close to it.
    assert 9.9 <= s["fallback_at_s"] <= 11.0
    # Nothing ever offered or drew more than the start current.
    assert max(x["pilot_a"] for x in samples) == 8
    assert s["peak_measured_a"] <= 8
    # After the fallback the EV follows to 6 A within its 2 s response delay.
    after = [x for x in samples
             if x["t_ms"] >= s["fallback_at_s"] * 1000 + 2500 and x["relay"] and x["ev"]]
    assert after and all(x["measured_a"] == 6 for x in after)
    assert any("plug in" in line for line in lines)


def test_sim_board_refuses_a_bad_control_command_and_keeps_running(tmp_path):
    with charger_sim.SimCharger({"charger_id": "t-1"}, tmp_path) as ch:
        ch.wait_ready()
        ch.sock.sendto(b"not json", ("127.0.0.1", ch.port))
        ch.sock.settimeout(2)
        reply = json.loads(ch.sock.recvfrom(65536)[0])
        while "error" not in reply:
            reply = json.loads(ch.sock.recvfrom(65536)[0])
        assert "error" in reply
        assert ch.proc.poll() is None
    assert ch.proc.returncode == 0
