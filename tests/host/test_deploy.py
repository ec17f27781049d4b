"""``evse-deploy`` (tools/evse_tools/deploy.py): flashing, deploying and
provisioning a real charger.

Two kinds of tests. Most run the command line with the tool runner replaced,
and check the exact esptool/mpremote commands, the errors, and the files that
provisioning builds. The ``fake_esp32`` tests run the real mpremote over a pty
against a stand-in board whose code runs on the real MicroPython unix port
(raw REPL protocol, ``machine.reset``, a watchdog that the running application
has armed), and check what ends up on the board's filesystem.
"""
import contextlib
import io
import json
import os
import select
import shlex
import stat
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

from evse_tools import deploy
from evse_tools.charger_sim import micropython_cmd
from firmware.core import settings as fw_settings

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
MP = [PY, "-m", "mpremote"]
SECRET_WIFI = "hunter2-wifi-Pa55"
SECRET_MQTT = "s3cret-mqtt-Pa55"


class Runner:
    """Stands in for ``deploy._run``: records every command; ``results`` maps
    a predicate on the argv to ``(returncode, stdout)``."""

    def __init__(self, results=()):
        self.calls = []
        self.results = list(results)

    def __call__(self, argv, capture=False, timeout=None, cwd=None):
        self.calls.append(list(argv))
        code, out = 0, ""
        for match, result in self.results:
            if match(argv):
                code, out = result
                break
        return subprocess.CompletedProcess(argv, code, out, "")


def cli(monkeypatch, *args, runner=None):
    """(exit status, stdout, stderr, runner) of ``evse-deploy ARGS``."""
    runner = runner or Runner()
    monkeypatch.setattr(deploy, "_run", runner)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = deploy.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue(), runner


def commands(out):
    """The ``+ `` lines of an output, split back into argv lists."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


@pytest.fixture(autouse=True)
def quick_reboot(monkeypatch):
    """The stand-in board reboots at once; do not wait 3 s for it."""
    monkeypatch.setattr(deploy, "REBOOT_WAIT_S", 0.3)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "ESP32_GENERIC-20260101-v1.29.0.bin"
    path.write_bytes(b"\xe9" + bytes(2047))
    return path


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    """Keep the compiled firmware out of the repository's build/."""
    path = tmp_path / "build"
    monkeypatch.setattr(deploy, "BUILD", str(path))
    return path


def device_modules():
    root = REPO / "firmware"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))


# --- flash


def test_flash_dry_run_erases_then_writes_the_classic_esp32_image_at_0x1000(monkeypatch, image):
    code, out, err, runner = cli(monkeypatch, "flash", "--dry-run", "--port", "/dev/ttyUSB0",
                                 "--image", image)
    assert (code, err, runner.calls) == (0, "", [])
    base = [PY, "-m", "esptool", "--chip", "esp32", "--port", "/dev/ttyUSB0", "--baud", "460800"]
    assert commands(out) == [base + ["erase-flash"], base + ["write-flash", "0x1000", str(image)]]


@pytest.mark.parametrize("chip", ["esp32s3", "esp32c3"])
def test_flash_writes_s3_and_c3_images_at_0x0_not_0x1000(monkeypatch, image, chip):
    code, out, _, _ = cli(monkeypatch, "flash", "--dry-run", "--port", "/dev/ttyACM0",
                          "--image", image, "--chip", chip, "--baud", "921600")
    assert code == 0
    assert commands(out)[1] == [PY, "-m", "esptool", "--chip", chip, "--port", "/dev/ttyACM0",
                                "--baud", "921600", "write-flash", "0x0", str(image)]


def test_flash_missing_image_is_a_clear_error_and_nothing_runs(monkeypatch, tmp_path):
    missing = tmp_path / "nope.bin"
    code, out, err, runner = cli(monkeypatch, "flash", "--port", "/dev/null", "--image", missing)
    assert (code, out, runner.calls) == (1, "", [])
    assert err.startswith("error: image %s not found" % missing) and err.count("\n") == 1


def test_flash_refuses_a_file_that_is_not_an_esp_image(monkeypatch, tmp_path):
    uf2 = tmp_path / "firmware.uf2"
    uf2.write_bytes(b"UF2\nWQ]\x9e")
    code, _, err, runner = cli(monkeypatch, "flash", "--dry-run", "--image", uf2)
    assert (code, runner.calls) == (1, [])
    assert "is not an ESP32 firmware image (first byte 55, expected 0xe9)" in err


def test_flash_runs_esptool_and_stops_at_the_first_failure_with_its_exit_status(monkeypatch, image):
    runner = Runner([(lambda a: "erase-flash" in a, (2, ""))])
    code, out, err, _ = cli(monkeypatch, "flash", "--port", "/dev/null", "--image", image,
                            runner=runner)
    erase = [PY, "-m", "esptool", "--chip", "esp32", "--port", "/dev/null", "--baud", "460800",
             "erase-flash"]
    assert code == 1
    assert runner.calls == [erase]  # write-flash never ran
    assert err == "error: command failed with exit status 2: %s\n" % shlex.join(erase)
    assert commands(out) == [erase]


def test_bad_arguments_exit_2_without_a_traceback(monkeypatch, image):
    code, _, err, runner = cli(monkeypatch, "flash", "--image", image, "--chip", "esp8266")
    assert (code, runner.calls) == (2, [])
    assert "invalid choice: 'esp8266'" in err and "Traceback" not in err


# --- ports


@pytest.mark.parametrize("sub", [["flash", "--image", "IMAGE"], ["deploy"], ["repl"],
                                 ["provision", "--id", "garage-1"]])
def test_missing_port_is_a_clear_error_with_exit_1_and_nothing_run(monkeypatch, image, tmp_path, sub):
    port = "/dev/ttyUSB9"
    if os.path.exists(port):
        pytest.skip("%s exists on this machine" % port)
    sub = [str(image) if a == "IMAGE" else a for a in sub]
    code, out, err, runner = cli(monkeypatch, *sub, "--port", port)
    assert (code, runner.calls) == (1, [])
    assert err == "error: serial port /dev/ttyUSB9 not found; plug the charger in or pass --port\n"
    assert "+ " not in out


def test_a_regular_file_is_not_taken_for_a_serial_port(monkeypatch, tmp_path):
    not_a_tty = tmp_path / "ttyUSB0"
    not_a_tty.write_text("")
    code, _, err, runner = cli(monkeypatch, "repl", "--port", not_a_tty)
    assert (code, runner.calls) == (1, [])
    assert err == "error: %s is not a serial port (not a character device); pass --port\n" % not_a_tty


def test_port_auto_takes_the_only_port_and_lists_them_when_there_are_several(monkeypatch, tmp_path):
    monkeypatch.setattr(deploy, "PORT_GLOBS", (str(tmp_path / "ttyUSB*"), str(tmp_path / "ttyACM*")))
    code, _, err, runner = cli(monkeypatch, "repl")
    assert (code, runner.calls) == (1, [])
    assert err.startswith("error: no serial port found")
    (tmp_path / "ttyACM0").write_text("")
    code, out, _, runner = cli(monkeypatch, "repl")
    assert code == 0 and runner.calls == [MP + ["connect", str(tmp_path / "ttyACM0"), "repl"]]
    (tmp_path / "ttyUSB1").write_text("")
    code, _, err, runner = cli(monkeypatch, "repl")
    assert (code, runner.calls) == (1, [])
    assert err == "error: several serial ports found: %s, %s; pass --port\n" % (
        tmp_path / "ttyACM0", tmp_path / "ttyUSB1")


def test_repl_dry_run_prints_the_mpremote_command(monkeypatch):
    code, out, _, runner = cli(monkeypatch, "repl", "--dry-run", "--port", "/dev/ttyUSB0")
    assert (code, runner.calls) == (0, [])
    assert commands(out) == [MP + ["connect", "/dev/ttyUSB0", "repl"]]


# --- deploy


def deploy_dry_run(monkeypatch, *extra):
    code, out, err, runner = cli(monkeypatch, "deploy", "--dry-run", "--port", "/dev/ttyUSB0", *extra)
    assert (code, err, runner.calls) == (0, "", [])
    return out, commands(out)


def test_deploy_dry_run_compiles_every_device_module_and_never_the_simulator(monkeypatch):
    _, cmds = deploy_dry_run(monkeypatch)
    assert cmds[0] == ["cd", str(REPO)]
    compiled = [c for c in cmds if c[0] == deploy.MPY_CROSS]
    assert compiled == [[deploy.MPY_CROSS, "-o", "build/deploy/firmware/%s.mpy" % m[:-3],
                         "firmware/" + m] for m in device_modules()]
    names = {c[-1] for c in compiled}
    assert "firmware/__init__.py" in names and "firmware/hal_esp32.py" in names
    assert "firmware/core/charger.py" in names and "firmware/core/__init__.py" in names
    assert not [n for n in names if "simboard" in n] and not names & {"boot.py", "main.py"}


def test_deploy_dry_run_copies_every_mpy_and_keeps_boot_and_main_as_source(monkeypatch):
    out, cmds = deploy_dry_run(monkeypatch)
    dev = MP + ["connect", "/dev/ttyUSB0"]
    device = [c for c in cmds if c[:5] == dev]
    assert device == [
        dev + ["exec", deploy.PARK, "+", "reset"],
        dev + ["exec", "import umqtt.simple"],
        dev + ["exec", deploy.PREP_FIRMWARE],
        dev + ["fs", "cp", "-r", "build/deploy/firmware", ":firmware", "+", "fs", "cp", "boot.py", ":boot.py"],
        dev + ["exec", deploy.PREP_LIB, "+", "fs", "cp", "lib/umqtt/simple.py", ":lib/umqtt/simple.py"],
        dev + ["fs", "cp", "main.py", ":main.py", "+", "exec", deploy.FINISH, "+", "reset"],
    ]
    assert not [a for c in device for a in c if "simboard" in a]
    # main.py goes back last, after everything it imports is in place
    assert out.index("exec 'import umqtt.simple'") < out.index("cp -r build/deploy/firmware") < out.index(":main.py")


def test_deploy_dry_run_copies_umqtt_only_in_the_missing_branch(monkeypatch):
    out, _ = deploy_dry_run(monkeypatch)
    lines = out.splitlines()
    umqtt = [i for i, line in enumerate(lines) if "lib/umqtt/simple.py" in line]
    assert len(umqtt) == 1
    assert lines[umqtt[0] - 1] == "# only if the probe ended in ImportError (no umqtt.simple on the device):"


def test_deploy_dry_run_copies_the_ota_public_key_as_ota_key_json(monkeypatch, tmp_path):
    key = tmp_path / "ota_pub.json"
    key.write_text('{"n": "c0ffee", "e": 65537}')
    _, cmds = deploy_dry_run(monkeypatch, "--ota-key", key)
    copy = [c for c in cmds if "build/deploy/firmware" in c][0]
    assert copy[-5:] == ["+", "fs", "cp", str(key), ":ota_key.json"]


def test_deploy_refuses_to_copy_a_private_signing_key_to_the_charger(monkeypatch, tmp_path):
    key = tmp_path / "ota_priv.json"
    key.write_text('{"n": "c0ffee", "e": 65537, "d": "5ec4e7"}')
    code, out, err, runner = cli(monkeypatch, "deploy", "--dry-run", "--ota-key", key)
    assert (code, out, runner.calls) == (1, "", [])
    assert err == "error: OTA key %s holds private-key fields (d): pass the public key\n" % key


def probe_says(code, output):
    return (lambda a: "import umqtt.simple" in a, (code, output))


@pytest.mark.parametrize("probe, copied", [
    (probe_says(0, ""), False),
    (probe_says(1, "Traceback (most recent call last):\r\nImportError: no module named 'umqtt'\r\n"), True),
])
def test_deploy_copies_umqtt_only_when_the_device_firmware_lacks_it(monkeypatch, build_dir, probe, copied):
    runner = Runner([probe])
    code, out, err, _ = cli(monkeypatch, "deploy", "--port", "/dev/null", runner=runner)
    assert (code, err) == (0, "")
    ran_umqtt = [c for c in runner.calls if ":lib/umqtt/simple.py" in c]
    assert bool(ran_umqtt) is copied
    assert runner.calls[-1][-3:] == [deploy.FINISH, "+", "reset"]
    assert commands(out)[1:] == runner.calls  # what ran is what was printed
    assert (build_dir / "firmware").is_dir()


def test_deploy_probe_that_cannot_reach_the_board_is_a_failure_not_a_missing_umqtt(monkeypatch, build_dir):
    runner = Runner([probe_says(1, "mpremote: could not enter raw repl\n")])
    code, _, err, _ = cli(monkeypatch, "deploy", "--port", "/dev/null", runner=runner)
    error, note = err.splitlines()[-2:]
    assert code == 1
    assert error.startswith("error: command failed with exit status 1: ") and "import umqtt.simple" in error
    # the technician learns why the charger does not start, and what to do
    assert note == "note: " + deploy.PARKED_HINT
    assert not [c for c in runner.calls if "fs" in c]


def test_a_port_that_does_not_come_back_after_the_reset_is_a_clear_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(deploy, "PORT_RETURN_S", 0.2)
    gone = tmp_path / "ttyACM0"
    with pytest.raises(deploy.ToolError) as info:
        deploy.await_reboot(str(gone), False)
    assert str(info.value) == "serial port %s did not come back within 0.5 s of the reset" % gone


# --- provision


def provision(monkeypatch, tmp_path, *args, env=None, runner=None):
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    keep = tmp_path / "keep"
    code, out, err, runner = cli(monkeypatch, "provision", "--dry-run", "--port", "/dev/ttyUSB0",
                                 "--keep", keep, *args, runner=runner)
    return code, out, err, keep


def validator_message(schema, key, value):
    with pytest.raises(ValueError) as info:
        schema[key][1](value, key)
    return str(info.value)


@pytest.mark.parametrize("args, key, value", [
    (["--id", "Garage_1"], "charger_id", "Garage_1"),
    (["--id", "x" * 33], "charger_id", "x" * 33),
    (["--id", "g1", "--offline", "5"], "offline_a", 5),
    (["--id", "g1", "--start", "3.5"], "start_a", 3.5),
    (["--id", "g1", "--unit-rating", "81"], "unit_rating_a", 81),
    (["--id", "g1", "--installer-max", "abc"], "installer_max_a", "abc"),
    (["--id", "g1", "--installer-max", "nan"], "installer_max_a", float("nan")),
    (["--id", "g1", "--t-wd", "30.5"], "t_wd_s", 30.5),
    (["--id", "g1", "--t-wd", "5"], "t_wd_s", 5),
])
def test_provision_refuses_a_bad_id_or_current_with_the_validators_message_and_writes_nothing(
        monkeypatch, tmp_path, args, key, value):
    code, out, err, keep = provision(monkeypatch, tmp_path, *args)
    option = deploy.SETTING_OPTIONS[key]
    assert (code, out) == (1, "")
    assert err == "error: %s: %s\n" % (option, validator_message(fw_settings.SCHEMA, key, value))
    assert not keep.exists()


def real_ca(tmp_path, name="ca"):
    """A CA certificate made as broker-setup makes it (PEM file)."""
    from evse_tools.server import secure

    secure.make_ca(tmp_path / name)
    return tmp_path / name / "ca.pem"


def test_provision_builds_settings_and_secrets_that_the_firmware_loads(monkeypatch, tmp_path):
    ca = real_ca(tmp_path)
    code, out, err, keep = provision(
        monkeypatch, tmp_path, "--id", "garage-1", "--broker", "mqtts://broker.example:8884",
        "--wifi-ssid", "Garage WiFi", "--wifi-password-env", "WIFI_PW", "--mqtt-user", "garage-1",
        "--mqtt-password-env", "MQTT_PW", "--ca", ca, "--unit-rating", "40", "--installer-max", "32",
        "--offline", "6", "--start", "0", "--t-wd", "60",
        env={"WIFI_PW": SECRET_WIFI, "MQTT_PW": SECRET_MQTT})
    assert (code, err) == (0, "")
    cfg = json.loads((keep / "settings.json").read_text())
    sec = json.loads((keep / "secrets.json").read_text())
    assert set(cfg) == set(fw_settings.SCHEMA) and set(sec) == set(fw_settings.SECRETS)
    assert {k: cfg[k] for k in ("charger_id", "mqtt_host", "mqtt_port", "mqtt_tls", "unit_rating_a",
                                "installer_max_a", "offline_a", "start_a", "t_wd_s")} == {
        "charger_id": "garage-1", "mqtt_host": "broker.example", "mqtt_port": 8884, "mqtt_tls": True,
        "unit_rating_a": 40, "installer_max_a": 32, "offline_a": 6, "start_a": 0, "t_wd_s": 60}
    assert cfg["keepalive_s"] == fw_settings.SCHEMA["keepalive_s"][0]  # untouched: the default
    assert sec == {"wifi_ssid": "Garage WiFi", "wifi_password": SECRET_WIFI, "mqtt_user": "garage-1",
                   "mqtt_password": SECRET_MQTT, "ca_cert": ca.read_text()}
    for name in ("settings.json", "secrets.json"):
        assert stat.S_IMODE((keep / name).stat().st_mode) == 0o600
    loaded_cfg, loaded_sec = fw_settings.load(str(keep))
    assert (loaded_cfg.problems, loaded_sec.problems) == ([], [])
    assert loaded_cfg.values == cfg and loaded_sec.values == sec
    # the dry run shows the settings and hides every secret
    assert "# settings.json: " + json.dumps(cfg) in out
    assert '# secrets.json: {"wifi_ssid": "****", "wifi_password": "****", "mqtt_user": "****", ' \
           '"mqtt_password": "****", "ca_cert": "****"}' in out


@pytest.mark.parametrize("url, host, port, tls", [
    ("mqtt://10.0.0.5", "10.0.0.5", 1883, False),
    ("mqtts://broker.example", "broker.example", 8883, True),
    ("mqtt://broker.example:1884", "broker.example", 1884, False),
])
def test_provision_broker_url_sets_host_port_and_tls_with_the_right_default_port(
        monkeypatch, tmp_path, url, host, port, tls):
    ca = ("--ca", real_ca(tmp_path)) if tls else ()
    code, _, _, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", url, *ca)
    cfg = json.loads((keep / "settings.json").read_text())
    assert code == 0 and (cfg["mqtt_host"], cfg["mqtt_port"], cfg["mqtt_tls"]) == (host, port, tls)


@pytest.mark.parametrize("url, message", [
    ("http://broker:1883", "--broker http://broker:1883: use mqtt://host:port or mqtts://host:port"),
    ("mqtt://user:pw@broker", "--broker: no credentials in the URL; use --mqtt-user and --mqtt-password-env"),
    ("mqtt://broker:99999", "--broker mqtt://broker:99999: the port must be 1..65535"),
])
def test_provision_refuses_a_bad_broker_url_and_credentials_in_it(monkeypatch, tmp_path, url, message):
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", url)
    assert (code, err) == (1, "error: %s\n" % message)
    assert "pw" not in err.replace("password", "") and not keep.exists()


def test_provision_refuses_a_ca_certificate_over_4096_characters(monkeypatch, tmp_path):
    ca = tmp_path / "big.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n" + "A" * 4096 + "\n-----END CERTIFICATE-----\n")
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--ca", ca)
    assert (code, err) == (1, "error: --ca: %s\n" % validator_message(
        fw_settings.SECRETS, "ca_cert", ca.read_text()))
    assert "0..4096 characters" in err and not keep.exists()


def test_provision_secret_from_a_missing_environment_variable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--wifi-password-env", "NO_SUCH_PW")
    assert (code, err) == (1, "error: environment variable NO_SUCH_PW (wifi_password) is not set\n")
    assert not keep.exists()


def test_provision_has_no_option_that_takes_a_secret_on_the_command_line(monkeypatch, tmp_path):
    for option in ("--wifi-password", "--mqtt-password"):
        code, _, err, _ = provision(monkeypatch, tmp_path, "--id", "g1", option, SECRET_WIFI)
        assert code == 2 and "unrecognized arguments" in err


def test_provision_secrets_never_appear_in_output_or_in_any_commands_argv(monkeypatch, tmp_path):
    monkeypatch.setenv("WIFI_PW", SECRET_WIFI)
    pw_file = tmp_path / "mqtt.pw"
    pw_file.write_text(SECRET_MQTT + "\n")
    args = ["provision", "--id", "g1", "--wifi-ssid", "Garage", "--wifi-password-env", "WIFI_PW",
            "--mqtt-password-file", pw_file, "--broker", "mqtt://broker"]
    for extra in (["--dry-run", "--port", "/dev/ttyUSB0"], ["--port", "/dev/null"]):
        code, out, err, runner = cli(monkeypatch, *args, *extra)
        assert code == 0
        for secret in (SECRET_WIFI, SECRET_MQTT):
            assert secret not in out + err
            assert not [a for c in runner.calls for a in c if secret in a]
    dev = MP + ["connect", "/dev/null"]
    assert len(runner.calls) == 3
    assert runner.calls[0] == dev + ["exec", deploy.PARK, "+", "reset"]
    assert runner.calls[1][len(dev):len(dev) + 2] == ["fs", "cp"]
    assert runner.calls[1][-1] == ":secrets.json.tmp"
    assert runner.calls[2] == dev + ["exec", deploy.INSTALL_SETTINGS, "+", "reset"]
    tmp = Path([a for a in runner.calls[1] if a.endswith("/settings.json")][0]).parent
    assert tmp.name.startswith("evse-provision-")
    assert not tmp.exists()  # the private temp dir holding the secrets is gone


# --- against a stand-in board: real mpremote over a pty, code run by MicroPython

CHILD = r'''
import sys
log_path, armed = sys.argv[1], sys.argv[2]

class _Reset(Exception):
    pass

class machine:
    @staticmethod
    def reset():
        raise _Reset()

sys.modules["machine"] = machine
_open = open

def _open_logged(path, mode="r", *rest):
    if "w" in mode or "a" in mode:
        f = _open(log_path, "a")
        f.write("%s %s\n" % (armed, path))
        f.close()
    return _open(path, mode, *rest)

ns = {"__name__": "__main__", "open": _open_logged}
inp, out = sys.stdin.buffer, sys.stdout
while True:
    line = inp.readline()
    if not line:
        break
    n = int(line)
    code = b""
    while len(code) < n:
        code += inp.read(n - len(code))
    try:
        exec(code.decode(), ns)
        out.write("\x04\x04>")
    except _Reset:
        sys.exit(99)
    except BaseException as e:
        out.write("\x04")
        sys.print_exception(e, out)
        out.write("\x04>")
'''

BANNER = b"raw REPL; CTRL-B to exit\r\n>"


class FakeEsp32:
    """A board on a pty that speaks MicroPython's raw REPL; the code it is sent
    runs in a MicroPython unix-port process whose cwd is the board's root.

    ``machine.reset()`` restarts that process (a hard reset); once ``main.py``
    is there after a hard reset, the application runs and has armed the
    hardware watchdog, which a soft reset or Ctrl-C does not disarm
    (DESIGN.md §6). Every file opened for writing is logged with the
    watchdog's state: ``writes_while_armed()``.
    """

    def __init__(self, root, tmp, frozen_umqtt):
        self.root, self.log = Path(root), Path(tmp) / "writes.log"
        self.script = Path(tmp) / "fake_board.py"
        self.script.write_text(CHILD)
        # The device runtime's .frozen holds umqtt.simple as the release image
        # does; without it the board plays an image that lacks umqtt (and its
        # frozen firmware): the deploy must then copy lib/umqtt.
        path = [".frozen"] if frozen_umqtt else []
        self.env = dict(os.environ, MICROPYPATH=":".join(path + ["lib"]))
        self.armed = (self.root / "main.py").exists()  # an application is running
        self.hard_resets = 0
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.stopping = False
        self._start()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _start(self):
        self.child = subprocess.Popen([micropython_cmd(), str(self.script), str(self.log),
                                       "armed" if self.armed else "safe"],
                                      cwd=self.root, env=self.env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)

    def _restart(self):
        self.child.kill()
        self.child.wait()
        self._start()

    def writes_while_armed(self):
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line.split(" ", 1)[1] for line in lines if line.startswith("armed ")]

    def settle(self, hard_resets, timeout=5.0):
        """Wait until the board has had ``hard_resets`` (the last ``reset`` is
        sent without waiting for it); returns the count."""
        deadline = time.monotonic() + timeout
        while self.hard_resets < hard_resets and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.hard_resets

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.child.kill()
        self.child.wait()
        os.close(self.master)
        os.close(self.slave)

    def _send(self, data):
        os.write(self.master, data)

    def _serve(self):
        raw, code, esc = False, b"", 0
        while not self.stopping:
            out = self.child.stdout
            ready, _, _ = select.select([self.master, out], [], [], 0.05)
            if out in ready:
                data = os.read(out.fileno(), 4096)
                if data:
                    self._send(data)
                else:  # the process ended: machine.reset()
                    if self.child.wait() == 99:
                        self.hard_resets += 1
                        self.armed = (self.root / "main.py").exists()
                    raw, code = False, b""
                    self._start()
                    self._send(b"\r\nboot.py: outputs safe\r\n>>> ")
                continue
            if self.master not in ready:
                continue
            for byte in os.read(self.master, 4096):
                c = bytes([byte])
                if esc:  # raw-paste request \x05 A \x01: decline
                    esc = esc + 1 if esc < 2 else 0
                    if not esc:
                        self._send(b"R\x00")
                elif not raw:
                    if c == b"\x01":
                        raw, code = True, b""
                        self._send(BANNER)
                    elif c == b"\x03":
                        self._send(b"\r\nKeyboardInterrupt\r\n>>> ")
                elif c == b"\x05":
                    esc = 1
                elif c == b"\x01":
                    code = b""
                    self._send(BANNER)
                elif c == b"\x02":
                    raw = False
                    self._send(b"\r\n>>> ")
                elif c == b"\x03":
                    code = b""
                elif c == b"\x04":
                    if code:
                        self._send(b"OK")
                        self.child.stdin.write(b"%d\n" % len(code) + code)
                        self.child.stdin.flush()
                        code = b""
                    else:  # soft reset: a fresh interpreter, the watchdog still armed
                        self._restart()
                        self._send(b"OK\r\nMPY: soft reboot\r\n" + BANNER)
                else:
                    code += c


@pytest.fixture
def old_board(tmp_path):
    """A board running an old deployment: main.py (so its watchdog is armed),
    a stale source module that would shadow its new .mpy, a module since
    removed, and an OTA state that names a slot."""
    root = tmp_path / "board"
    (root / "firmware").mkdir(parents=True)
    (root / "main.py").write_text("raise SystemExit('old firmware')\n")
    (root / "boot.py").write_text("# old boot\n")
    (root / "firmware" / "settings.py").write_text("STALE = True\n")
    (root / "firmware" / "removed.mpy").write_bytes(b"M\x06")
    (root / "ota.json").write_text('{"active": "a"}')
    return root


def mpy_import(root, *modules):
    # No .frozen: what must import is what the deploy wrote, not the image.
    env = dict(os.environ, MICROPYPATH="%s:%s/lib" % (root, root))
    return subprocess.run([micropython_cmd(), "-c", "import %s; print('imported')" % ", ".join(modules)],
                          env=env, capture_output=True, text=True, timeout=30, cwd=root)


@pytest.mark.parametrize("frozen_umqtt", [True, False])
def test_fake_esp32_deploy_replaces_the_firmware_and_never_writes_while_the_watchdog_can_fire(
        monkeypatch, tmp_path, build_dir, old_board, frozen_umqtt):
    board = FakeEsp32(old_board, tmp_path, frozen_umqtt)
    try:
        code = deploy.main(["deploy", "--port", board.port])
        board.settle(2)
    finally:
        board.close()
    assert code == 0
    assert board.writes_while_armed() == []
    assert board.hard_resets == 2  # parked, then started
    root = old_board / "firmware"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == \
        sorted(m[:-3] + ".mpy" for m in device_modules())
    assert (old_board / "main.py").read_text() == (REPO / "main.py").read_text()
    assert (old_board / "boot.py").read_text() == (REPO / "boot.py").read_text()
    assert not (old_board / "main.off").exists() and not (old_board / "ota.json").exists()
    assert (old_board / "lib" / "umqtt" / "simple.py").exists() is not frozen_umqtt
    proc = mpy_import(old_board, "firmware.start", "firmware.core.settings", "firmware.ota.boot")
    assert proc.stdout == "imported\n", proc.stderr


def test_fake_esp32_provision_installs_both_files_and_restarts_the_application(
        monkeypatch, tmp_path, old_board):
    board = FakeEsp32(old_board, tmp_path, True)
    monkeypatch.setenv("WIFI_PW", SECRET_WIFI)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = deploy.main(["provision", "--port", board.port, "--id", "garage-2",
                                "--wifi-ssid", "Garage", "--wifi-password-env", "WIFI_PW",
                                "--broker", "mqtt://192.168.1.10", "--offline", "6"])
        board.settle(2)
    finally:
        board.close()
    assert code == 0 and SECRET_WIFI not in out.getvalue()
    assert board.writes_while_armed() == []
    assert board.hard_resets == 2
    cfg, sec = fw_settings.load(str(old_board))
    assert (cfg.problems, sec.problems) == ([], [])
    assert (cfg["charger_id"], cfg["mqtt_host"], cfg["offline_a"]) == ("garage-2", "192.168.1.10", 6)
    assert (sec["wifi_ssid"], sec["wifi_password"]) == ("Garage", SECRET_WIFI)
    assert (old_board / "main.py").exists() and not (old_board / "main.off").exists()
    assert not list(old_board.glob("*.tmp"))


def test_fake_esp32_catches_a_copy_made_while_the_watchdog_is_armed(monkeypatch, tmp_path, old_board):
    """The stand-in is not vacuous: without parking, the copy happens on a board
    whose watchdog will reset it mid-copy, and the board's log says so."""
    monkeypatch.setattr(deploy, "PARK", "import os")
    monkeypatch.setenv("WIFI_PW", SECRET_WIFI)
    board = FakeEsp32(old_board, tmp_path, True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = deploy.main(["provision", "--port", board.port, "--id", "garage-2"])
        board.settle(2)
    finally:
        board.close()
    assert code == 0
    assert board.writes_while_armed() == ["settings.json.tmp", "secrets.json.tmp"]


def test_provision_refuses_a_ca_with_plain_mqtt_which_would_leave_the_charger_offline(
        monkeypatch, tmp_path):
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", "mqtt://b.lan",
                                   "--ca", real_ca(tmp_path))
    assert (code, err) == (1, "error: --ca with a plain mqtt:// broker: use mqtts://HOST:8883 for TLS\n")
    assert not keep.exists()


def test_provision_refuses_tls_without_a_ca_to_verify_the_broker(monkeypatch, tmp_path):
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", "mqtts://b.lan")
    assert code == 1 and "mqtts:// broker needs --ca" in err and not keep.exists()


def test_provision_refuses_a_ca_file_that_is_no_certificate(monkeypatch, tmp_path):
    ca = tmp_path / "fake.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", "mqtts://b.lan",
                                   "--ca", ca)
    assert code == 1 and "not a valid PEM certificate" in err and not keep.exists()


def test_provision_takes_two_cas_for_a_change_of_ca(monkeypatch, tmp_path):
    both = tmp_path / "both.pem"
    both.write_text(real_ca(tmp_path, "old").read_text() + real_ca(tmp_path, "new").read_text())
    code, _, err, keep = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", "mqtts://b.lan",
                                   "--ca", both)
    assert (code, err) == (0, "")
    assert json.loads((keep / "secrets.json").read_text())["ca_cert"] == both.read_text()


def test_provision_warns_that_plain_mqtt_sends_the_password_in_the_clear(monkeypatch, tmp_path):
    code, _, err, _ = provision(monkeypatch, tmp_path, "--id", "g1", "--broker", "mqtt://b.lan",
                                "--mqtt-user", "g1")
    assert code == 0 and "in the clear" in err


def test_frozen_deploy_dry_run_copies_only_boot_and_main_and_removes_the_shadowing_firmware(monkeypatch):
    # '' comes before .frozen on the ESP32's sys.path: a /firmware folder left
    # by an earlier deploy would silently run instead of the image's firmware.
    out, cmds = deploy_dry_run(monkeypatch, "--frozen")
    dev = MP + ["connect", "/dev/ttyUSB0"]
    assert not [c for c in cmds if c[0] == deploy.MPY_CROSS]          # nothing compiled
    execs = [c for c in cmds if c[:len(dev) + 1] == dev + ["exec"]]
    probe = next(i for i, c in enumerate(cmds) if deploy.PROBE_FROZEN in c)
    prep = next(i for i, c in enumerate(cmds) if deploy.PREP_FROZEN in c)
    assert probe < prep                                  # a failed probe changes nothing
    assert 'sys.path[:] = [".frozen"]' in deploy.PROBE_FROZEN
    assert 'r("firmware")' in deploy.PREP_FROZEN and "ota.json" in deploy.PREP_FROZEN
    copied = [a for c in cmds for a in c if a.startswith(":")]
    assert copied == [":boot.py", ":main.py"] and execs
