"""The REPL diagnostics on a running simulated charger, driven through a pty
in the real MicroPython unix-port REPL (issue 5): they run beside the live
control loop; a bad value is refused clearly; a good one persists."""
import json
import os
import pty
import select
import subprocess
import time

from evse_tools.charger_sim import (HEAP, SimCharger, device_env, free_udp_port, install_main,
                                    micropython_cmd)


class Repl:
    def __init__(self, argv, env, cwd=None):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, cwd=cwd)
        os.close(slave)
        self.seen = ""

    def expect(self, text, timeout=10.0):
        end = time.monotonic() + timeout
        while text not in self.seen:
            left = end - time.monotonic()
            assert left > 0, "%r not seen; got:\n%s" % (text, self.seen[-2000:])
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        out, self.seen = self.seen.split(text, 1)[0] + text, self.seen.split(text, 1)[1]
        return out

    def run(self, line, timeout=10.0):
        os.write(self.master, (line + "\r").encode())
        return self.expect(">>> ", timeout)

    def close(self):
        os.write(self.master, b"\x04")          # Ctrl-D: leave the REPL
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_repl_diagnostics_see_the_live_charger_refuse_bad_values_and_persist_good_ones(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "settings.json").write_text(json.dumps({"charger_id": "repl-1", "t_wd_s": 10}))
    port = free_udp_port()
    install_main(dev)
    repl = Repl([micropython_cmd(), "-X", f"heapsize={HEAP}", "-i", "main.py", "--dir", str(dev),
                 "--ctl-port", str(port), "--repl"], device_env(), cwd=dev)
    try:
        repl.expect(">>> ", 15)
        repl.run("from firmware import diag")
        out = repl.run("diag.status()")
        assert "state A" in out and "limit 8 A (start)" in out
        # Plug an EV in from outside: the loop runs on, and status() sees it.
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(json.dumps({"cmd": "plug", "ev": {"max_a": 32, "delay_ms": 1000}}).encode(),
                 ("127.0.0.1", port))
        time.sleep(2.5)
        out = repl.run("diag.status()")
        assert "state C" in out and "pilot 8.0 A" in out and "contactor closed" in out
        out = repl.run("diag.pilot()")
        assert "-> state C" in out and "diode ok" in out
        out = repl.run("diag.set('offline_a', 'abc')")
        assert "refused: offline_a must be a number" in out
        out = repl.run("diag.set('offline_a', 10)")
        assert "offline_a = 10" in out
        out = repl.run("diag.selftest()")
        assert "refused: only with the contactor open" in out     # a car is charging
        out = repl.run("diag.log(5)")
        assert "contactor closed" in out
        out = repl.run("diag.stop()")
        time.sleep(0.5)
        s.sendto(b'{"cmd": "quit"}', ("127.0.0.1", port))
        s.close()
    finally:
        repl.close()
    # The setting survived a restart: the charger boots again on its own files.
    with SimCharger(None, dev) as ch:
        first = ch.wait_ready()
        assert first["offline_a"] == 10
