"""``evse-deploy``: put MicroPython and the charger firmware onto a real ESP32
charger, open its REPL, and provision it.

Subcommands (each takes ``--dry-run``, which prints the exact commands, one a
line, shell-quoted and prefixed ``+ ``, and touches no device):

* ``flash``: esptool erases the flash and writes a MicroPython image.
* ``deploy``: mpy-cross compiles ``firmware/*.py`` (minus the simulator-only
  files) into ``build/deploy/firmware/*.mpy``; mpremote copies them, ``boot.py``
  and ``main.py`` (kept as source), ``lib/umqtt/simple.py`` only when the
  device's firmware lacks ``umqtt.simple``, and optionally the OTA public key.
* ``repl``: mpremote's serial REPL.
* ``provision``: writes ``settings.json`` and ``secrets.json`` (validated by
  the firmware's own :mod:`firmware.core.settings`) to the device root.

Why deploy and provision first *park* the application. A running charger has
started ``machine.WDT`` (5 s), which cannot be stopped and survives a soft
reset (DESIGN.md §6): once mpremote interrupts the control loop, the board
resets within 5 s, in the middle of a long copy. So the first device step
renames ``/main.py`` to ``/main.off`` and hard-resets: the board comes back
with ``boot.py``'s safe outputs (pilot static +12 V, contactor open), no
control loop and no watchdog. ``main.py`` comes back last, then a hard reset
starts the charger (a soft reset under mpremote would not run ``main.py``).
If a step fails or the cable is pulled, the board stays parked: it boots safe
and idle until ``deploy`` or ``provision`` is run again. ``deploy`` also empties
``/firmware`` first (a stale ``.py`` would shadow its new ``.mpy``) and removes
``/ota.json``, so that the deployed (factory) firmware is what boots, not an
OTA slot (see firmware/ota/boot.py).

Errors: a user error (missing port or file, bad value) prints one ``error:``
line and exits 1; a failing esptool or mpremote step prints the command and
its exit status and exits 1; bad arguments exit 2 (argparse).
"""
import argparse
import glob
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
"""The repository root; ``deploy`` runs its commands there (relative paths)."""

# Where the image goes in flash, bytes. The classic ESP32's ROM loads the
# second-stage bootloader from 0x1000, and MicroPython's esp32 .bin starts with
# it; the ESP32-S3 and -C3 ROMs load it from 0x0.
FLASH_OFFSETS = {"esp32": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0}
ESP_IMAGE_MAGIC = 0xE9
"""First byte of an ESP bootloader/application image."""

BUILD = "build/deploy"
"""Where ``deploy`` puts the compiled firmware, relative to :data:`REPO`."""
UMQTT = "lib/umqtt/simple.py"

PORT_GLOBS = ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/cu.usbserial*", "/dev/cu.usbmodem*",
              "/dev/cu.SLAB_USBtoUART*", "/dev/cu.wchusbserial*")
"""Serial ports that ``--port auto`` considers (USB-UART bridges, native USB)."""

REBOOT_WAIT_S = 3
"""Pause after the park step's hard reset, s: the board reboots (about 1 s),
and a native-USB port (ttyACM) disappears and comes back meanwhile."""
PORT_RETURN_S = 10
"""How long to wait for the port to come back after that, s."""
PROBE_TIMEOUT_S = 60
STEP_TIMEOUT_S = 600
"""Upper bounds for one non-interactive mpremote step, s."""

# Device-side one-liners (run by `mpremote exec`; the device's cwd is /).
PARK = 'import os; "main.py" in os.listdir() and os.rename("main.py", "main.off")'
UNPARK = 'import os; "main.off" in os.listdir() and os.rename("main.off", "main.py")'
PROBE_UMQTT = "import umqtt.simple"
# Empty /firmware (a stale .py there would shadow the new .mpy: MicroPython
# prefers .py), and drop ota.json so that the deployed (factory) firmware is
# the one that boots, not an older OTA slot.
_WIPE_FIRMWARE = ('import os; r = lambda p: [r(p + "/" + e[0]) if e[1] == 0x4000 else '
                  'os.remove(p + "/" + e[0]) for e in os.ilistdir(p)] and 0 or os.rmdir(p); '
                  '"firmware" in os.listdir() and r("firmware"); ')
"""MicroPython (one line) that removes ``/firmware`` with its subpackages."""
PREP_FIRMWARE = _WIPE_FIRMWARE + '"ota.json" in os.listdir() and os.remove("ota.json")'
"""Before a copy: no old module may survive in ``/firmware``, and no
``ota.json`` (the factory firmware boots); ``fs cp -r`` makes the folder."""
# For an image with the firmware frozen in (make image): no /firmware at
# all, since '' comes before .frozen on the ESP32's sys.path and a folder
# there would shadow the frozen firmware; and no ota.json, so the frozen
# factory firmware boots.
PREP_FROZEN = PREP_FIRMWARE
PROBE_FROZEN = 'import sys; sys.path[:] = [".frozen"]; import firmware.start'
PREP_LIB = ('import os; "lib" in os.listdir() or os.mkdir("lib"); '
            '"umqtt" in os.listdir("lib") or os.mkdir("lib/umqtt")')
FINISH = 'import os; "main.off" in os.listdir() and os.remove("main.off")'
INSTALL_SETTINGS = ('import os; os.rename("settings.json.tmp", "settings.json"); '
                    'os.rename("secrets.json.tmp", "secrets.json"); ' + UNPARK[len("import os; "):])

PARKED_HINT = ("the charger application is parked (/main.off): the board boots with its outputs "
               "safe and does not charge until deploy or provision completes")


class UserError(Exception):
    """A mistake of the user's (port, file, value): one ``error:`` line, exit 1."""


class ToolError(Exception):
    """An esptool or mpremote step failed: exit 1. ``note``, when set, is
    printed after the error (what state the board was left in)."""

    note = None


def _tool(module):
    return [sys.executable, "-m", module]


def _show(argv):
    print("+ " + shlex.join(str(a) for a in argv), flush=True)


def _run(argv, capture=False, timeout=None, cwd=None):
    """Run one command (tests replace this). Returns subprocess.CompletedProcess."""
    return subprocess.run(argv, capture_output=capture, text=True, timeout=timeout, cwd=cwd)


def _step(argv, dry_run, timeout=STEP_TIMEOUT_S, cwd=None):
    """Print ``argv``; unless ``dry_run``, run it. Raises ToolError when it
    cannot start, times out (``timeout`` s) or exits non-zero."""
    _show(argv)
    if dry_run:
        return
    try:
        proc = _run(argv, timeout=timeout, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError("%s: %s" % (shlex.join(argv), exc))
    if proc.returncode != 0:
        raise ToolError("command failed with exit status %d: %s" % (proc.returncode, shlex.join(argv)))


# --- ports


def resolve_port(port, dry_run):
    """Return the serial device to use for ``port``.

    ``auto`` picks the only :data:`PORT_GLOBS` match. Anything else must exist
    and be a character device (not checked on Windows, where ports are COMn).
    Raises UserError; with ``dry_run`` nothing is checked and an unresolved
    ``auto`` is returned as is.
    """
    if port == "auto":
        found = sorted({p for pattern in PORT_GLOBS for p in glob.glob(pattern)})
        if len(found) == 1:
            return found[0]
        if dry_run:
            return port
        if not found:
            raise UserError("no serial port found (looked for /dev/ttyUSB*, /dev/ttyACM*); "
                            "plug the charger in or pass --port")
        raise UserError("several serial ports found: %s; pass --port" % ", ".join(found))
    if dry_run or os.name == "nt":
        return port
    try:
        mode = os.stat(port).st_mode
    except OSError:
        raise UserError("serial port %s not found; plug the charger in or pass --port" % port)
    if not stat.S_ISCHR(mode):
        raise UserError("%s is not a serial port (not a character device); pass --port" % port)
    if not os.access(port, os.R_OK | os.W_OK):
        raise UserError("no permission to open %s; add yourself to its group "
                        "(sudo usermod -aG dialout $USER) and log in again" % port)
    return port


def await_reboot(port, dry_run):
    """After a hard reset: wait :data:`REBOOT_WAIT_S`, then up to
    :data:`PORT_RETURN_S` for ``port`` to exist again. Raises ToolError."""
    print("# wait %g s for the board to reboot" % REBOOT_WAIT_S)
    if dry_run:
        return
    time.sleep(REBOOT_WAIT_S)
    deadline = time.monotonic() + PORT_RETURN_S
    while os.name != "nt" and not os.path.exists(port):
        if time.monotonic() > deadline:
            raise ToolError("serial port %s did not come back within %g s of the reset"
                            % (port, REBOOT_WAIT_S + PORT_RETURN_S))
        time.sleep(0.2)


def _mpremote(port):
    return _tool("mpremote") + ["connect", port]


# --- flash


def flash_commands(port, image, chip="esp32", baud=460800):
    """The esptool commands that erase the flash and write ``image`` at the
    chip's offset (:data:`FLASH_OFFSETS`); ``baud`` in bit/s."""
    base = _tool("esptool") + ["--chip", chip, "--port", port, "--baud", str(baud)]
    return [base + ["erase-flash"], base + ["write-flash", "0x%x" % FLASH_OFFSETS[chip], image]]


def check_image(path):
    """Return the absolute path of a MicroPython image file. Raises UserError
    when it is missing, unreadable or not an ESP image (first byte 0xE9)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except IsADirectoryError:
        raise UserError("image %s is a directory, not a .bin file" % path)
    except OSError as exc:
        raise UserError("image %s not found or unreadable (%s); download the ESP32 .bin from "
                        "https://micropython.org/download/ and pass --image" % (path, exc.strerror))
    if head != bytes([ESP_IMAGE_MAGIC]):
        raise UserError("%s is not an ESP32 firmware image (first byte %s, expected 0xe9); "
                        "use the .bin, not a .uf2/.elf/.hex" % (path, head.hex() or "none"))
    return os.path.abspath(path)


def cmd_flash(args):
    image = check_image(args.image)
    port = resolve_port(args.port, args.dry_run)
    for argv in flash_commands(port, image, args.chip, args.baud):
        _step(argv, args.dry_run, timeout=None)
    if not args.dry_run:
        print("flashed %s; next: make deploy PORT=%s" % (image, port))
    return 0


# --- deploy


def device_modules(repo=REPO):
    """Paths of the firmware package's ``.py`` files below ``firmware/``
    (``core/charger.py``, ...), sorted: all deployed as .mpy. The simulated
    board is not in the package (``tools/simboard``)."""
    root = Path(repo) / "firmware"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))


MPY_CROSS = "build/device-runtime/mpy-cross"
"""mpy-cross v1.28.0 (``make runtime``), relative to :data:`REPO`: the
bytecode version the v1.28.0 image loads."""


def compile_commands(modules):
    """mpy-cross commands, run in :data:`REPO`: ``firmware/X.py`` to
    ``build/deploy/firmware/X.mpy``."""
    return [[MPY_CROSS, "-o", "%s/firmware/%s.mpy" % (BUILD, m[:-3]), "firmware/" + m]
            for m in modules]


def read_ota_key(path):
    """Return the absolute path of the OTA public key (a JSON object). Raises
    UserError when it is missing, not JSON, or holds private-key fields (the
    signing key must never leave the build machine)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(4097).decode("utf-8"))
    except OSError as exc:
        raise UserError("OTA key %s not found or unreadable (%s)" % (path, exc.strerror))
    except ValueError:
        raise UserError("OTA key %s is not a JSON file of at most 4 KB" % path)
    if type(data) is not dict:
        raise UserError("OTA key %s is not a JSON object" % path)
    private = sorted(k for k in data if k in ("d", "p", "q", "dp", "dq", "qi", "private", "private_key"))
    if private:
        raise UserError("OTA key %s holds private-key fields (%s): pass the public key" %
                        (path, ", ".join(private)))
    return os.path.abspath(path)


def frozen_deploy_plan(port, ota_key=None):
    """The mpremote steps of a deploy onto an image with the firmware frozen
    in (``make image``), as ``[(name, argv)]``: the probe (frozen modules
    only) fails unless the image holds the firmware, and then nothing is
    changed; otherwise ``/firmware`` and ``ota.json`` go, and only
    ``boot.py``, ``main.py`` (and the OTA key) are copied."""
    mp = _mpremote(port)
    copy = mp + ["fs", "cp", "boot.py", ":boot.py"]
    if ota_key:
        copy += ["+", "fs", "cp", ota_key, ":ota_key.json"]
    return [
        ("park", mp + ["exec", PARK, "+", "reset"]),
        ("probe-frozen", mp + ["exec", PROBE_FROZEN]),
        ("prepare", mp + ["exec", PREP_FROZEN]),
        ("copy", copy),
        ("start", mp + ["fs", "cp", "main.py", ":main.py", "+", "exec", FINISH, "+", "reset"]),
    ]


def deploy_plan(port, modules, ota_key=None):
    """The mpremote steps of a deploy, as ``[(name, argv)]``; ``umqtt`` runs
    only when the ``probe`` says the device firmware has no umqtt.simple."""
    mp = _mpremote(port)
    # The prepare step removed /firmware: "cp -r" makes it, with the subfolders.
    copy = mp + ["fs", "cp", "-r", "%s/firmware" % BUILD, ":firmware", "+", "fs", "cp", "boot.py", ":boot.py"]
    if ota_key:
        copy += ["+", "fs", "cp", ota_key, ":ota_key.json"]
    return [
        ("park", mp + ["exec", PARK, "+", "reset"]),
        ("probe", mp + ["exec", PROBE_UMQTT]),
        ("prepare", mp + ["exec", PREP_FIRMWARE]),
        ("copy", copy),
        ("umqtt", mp + ["exec", PREP_LIB, "+", "fs", "cp", UMQTT, ":" + UMQTT]),
        ("start", mp + ["fs", "cp", "main.py", ":main.py", "+", "exec", FINISH, "+", "reset"]),
    ]


def _probe_umqtt(argv):
    """Run the probe; True when the device firmware has umqtt.simple."""
    _show(argv)
    try:
        proc = _run(argv, capture=True, timeout=PROBE_TIMEOUT_S, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError("%s: %s" % (shlex.join(argv), exc))
    if proc.returncode == 0:
        return True
    output = (proc.stdout or "") + (proc.stderr or "")
    if "ImportError" in output:
        return False
    sys.stderr.write(output)
    raise ToolError("command failed with exit status %d: %s" % (proc.returncode, shlex.join(argv)))


def _run_plan(steps, port, dry, before):
    """Run mpremote ``steps`` (``[(name, argv)]``) in order. ``before(name,
    argv)`` prints what the step does and returns False to skip it. The park
    step is followed by the wait for the reboot; a failure after it raises
    the ToolError with :data:`PARKED_HINT` as its note."""
    parked = False
    try:
        for name, argv in steps:
            if before(name, argv) is False:
                continue
            _step(argv, dry, cwd=REPO)
            if name == "park":
                parked = True
                await_reboot(port, dry)
    except ToolError as exc:
        exc.note = PARKED_HINT if parked else None
        raise


_FROZEN_NOTES = {
    "park": "# park the application (main.py -> main.off) and hard-reset",
    "probe-frozen": "# is the firmware frozen into this image? exit 0: yes; ImportError: no, and "
                    "nothing is changed (use a make-image build, or deploy without --frozen)",
    "prepare": "# remove /firmware (it would shadow the frozen firmware) and ota.json",
    "start": "# main.py last, then a hard reset starts the frozen firmware",
}


def cmd_deploy_frozen(args, ota_key, port):
    dry = args.dry_run
    _show(["cd", str(REPO)])
    print("# the image holds the firmware (make image): copy boot.py and main.py only")

    def before(name, argv):
        if name in _FROZEN_NOTES:
            print(_FROZEN_NOTES[name])

    _run_plan(frozen_deploy_plan(port, ota_key), port, dry, before)
    if not dry:
        print("deployed boot.py and main.py to %s; the charger restarts on the frozen firmware" % port)
    return 0


def cmd_deploy(args):
    ota_key = read_ota_key(args.ota_key) if args.ota_key else None
    port = resolve_port(args.port, args.dry_run)
    if args.frozen:
        return cmd_deploy_frozen(args, ota_key, port)
    modules = device_modules()
    dry = args.dry_run
    if not dry and not (REPO / UMQTT).is_file():
        raise UserError("%s is missing; run `make lib` first" % UMQTT)
    if not dry and not (REPO / MPY_CROSS).is_file():
        raise UserError("%s is missing; run `make runtime` first" % MPY_CROSS)
    _show(["cd", str(REPO)])
    print("# compile the %d modules of the firmware package" % len(modules))
    if not dry:
        shutil.rmtree(REPO / BUILD, ignore_errors=True)
        for m in modules:
            (REPO / BUILD / "firmware" / m).parent.mkdir(parents=True, exist_ok=True)
    for argv in compile_commands(modules):
        _step(argv, dry, cwd=REPO)
    skip_umqtt = [False]

    def before(name, argv):
        if name == "park":
            print("# park the application (main.py -> main.off) and hard-reset: "
                  "no control loop, no watchdog while copying")
        elif name == "probe":
            print("# is umqtt.simple in the device firmware? exit 0: yes; ImportError: no")
            if dry:
                _show(argv)
                return False
            if _probe_umqtt(argv):
                print("# umqtt.simple is in the device firmware (frozen): not copied")
                skip_umqtt[0] = True
            else:
                print("# umqtt.simple is missing on the device: copying %s" % UMQTT)
                skip_umqtt[0] = False
            return False
        elif name == "umqtt":
            if dry:
                print("# only if the probe ended in ImportError (no umqtt.simple on the device):")
            elif skip_umqtt[0]:
                return False
        elif name == "start":
            print("# main.py last, then a hard reset starts the new firmware")

    _run_plan(deploy_plan(port, modules, ota_key), port, dry, before)
    if not dry:
        print("deployed %d modules to %s; the charger restarts" % (len(modules), port))
    return 0


# --- repl


def cmd_repl(args):
    port = resolve_port(args.port, args.dry_run)
    _step(_mpremote(port) + ["repl"], args.dry_run, timeout=None)
    return 0


# --- provision


class _ReadOnlyFs:
    """Files held in memory (name -> text), for :class:`firmware.core.settings.Settings`
    to load exactly as it loads them on the device."""

    def __init__(self, files):
        self.files = files

    def open(self, path, mode):
        if path not in self.files:
            raise OSError(2, "ENOENT")
        return io.StringIO(self.files[path])


def _fw_settings():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from firmware.core import settings

    return settings


def build_file(schema, name, values, options=None):
    """Return the JSON text of a settings file (``name``, e.g. ``settings.json``)
    holding ``values`` over the schema's defaults.

    Each value goes through the schema's validator, then the text is read back
    by :class:`firmware.core.settings.Settings` exactly as the device reads it.
    Raises UserError naming the option (``options``: key -> option) and
    quoting the validator's message.
    """
    settings = _fw_settings()
    st = settings.Settings(name, schema, _ReadOnlyFs({}))  # no file: every default
    result = dict(st.values)
    for key, value in values.items():
        try:
            result[key] = st.check(key, value)
        except ValueError as exc:
            option = (options or {}).get(key)
            raise UserError("%s%s" % (option + ": " if option else "", exc))
    text = json.dumps(result)
    back = settings.Settings(name, schema, _ReadOnlyFs({name: text}))
    if back.problems or back.values != result:
        raise UserError("%s would not load on the device: %s" % (name, "; ".join(back.problems)))
    return text


def parse_broker(url):
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` to settings
    ``{"mqtt_host", "mqtt_port", "mqtt_tls"}`` (default port 1883, 8883 for
    TLS). Raises UserError for anything else, including credentials in the
    URL (they belong in the secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:   # "mqtt://[::1": urllib's "Invalid IPv6 URL"
        raise UserError("--broker %s: %s; use mqtt://host:port or mqtts://host:port" % (url, exc))
    if parts.scheme not in ("mqtt", "mqtts"):
        raise UserError("--broker %s: use mqtt://host:port or mqtts://host:port" % url)
    if parts.username is not None or parts.password is not None:
        raise UserError("--broker: no credentials in the URL; use --mqtt-user and --mqtt-password-env")
    if parts.path not in ("", "/") or parts.query or parts.fragment or not parts.hostname:
        raise UserError("--broker %s: use mqtt://host:port or mqtts://host:port" % url)
    try:
        port = parts.port
    except ValueError:
        raise UserError("--broker %s: the port must be 1..65535" % url)
    tls = parts.scheme == "mqtts"
    return {"mqtt_host": parts.hostname, "mqtt_port": port or (8883 if tls else 1883), "mqtt_tls": tls}


def _number(text):
    """A current or time from the command line: int, float, or the text itself
    (so that the validator reports it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _secret(env, path, what):
    """A secret from environment variable ``env`` or file ``path`` (first line), or None."""
    if env:
        if env not in os.environ:
            raise UserError("environment variable %s (%s) is not set" % (env, what))
        return os.environ[env]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except (OSError, UnicodeError) as exc:
            raise UserError("cannot read %s from %s: %s" % (what, path, exc))
    return None


def _read_ca(path):
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeError) as exc:
        raise UserError("--ca %s: cannot read a PEM certificate (%s)" % (path, exc))
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UserError("--ca %s: not a PEM certificate (no BEGIN CERTIFICATE line)" % path)
    if len(text) <= 4096:     # longer: the firmware's own validator says so below
        from cryptography import x509

        try:
            certs = x509.load_pem_x509_certificates(text.encode("ascii"))
        except ValueError as exc:
            raise UserError("--ca %s: not a valid PEM certificate (%s)" % (path, exc))
        if len(certs) > 4:
            raise UserError("--ca %s: %d certificates; the charger trusts at most 4" % (path, len(certs)))
    return text


SETTING_OPTIONS = {"charger_id": "--id", "unit_rating_a": "--unit-rating",
                   "installer_max_a": "--installer-max", "offline_a": "--offline",
                   "start_a": "--start", "t_wd_s": "--t-wd"}
SECRET_OPTIONS = {"wifi_ssid": "--wifi-ssid", "wifi_password": "--wifi-password-env/-file",
                  "mqtt_user": "--mqtt-user", "mqtt_password": "--mqtt-password-env/-file",
                  "ca_cert": "--ca"}


def provision_files(args):
    """Return ``(settings_text, secrets_text)`` for the provision arguments,
    both validated as the device validates them. Raises UserError."""
    settings = _fw_settings()
    values = {"charger_id": args.id}
    for key, attr in (("unit_rating_a", "unit_rating"), ("installer_max_a", "installer_max"),
                      ("offline_a", "offline"), ("start_a", "start"), ("t_wd_s", "t_wd")):
        if getattr(args, attr) is not None:
            values[key] = _number(getattr(args, attr))
    if args.broker:
        values.update(parse_broker(args.broker))
    secrets = {}
    if args.wifi_ssid is not None:
        secrets["wifi_ssid"] = args.wifi_ssid
    if args.mqtt_user is not None:
        secrets["mqtt_user"] = args.mqtt_user
    for key, env, path in (("wifi_password", args.wifi_password_env, args.wifi_password_file),
                           ("mqtt_password", args.mqtt_password_env, args.mqtt_password_file)):
        value = _secret(env, path, key)
        if value is not None:
            secrets[key] = value
    if args.ca:
        if args.broker and not values.get("mqtt_tls"):
            # The charger would refuse to run plain MQTT with a CA (it means TLS was meant).
            raise UserError("--ca with a plain mqtt:// broker: use mqtts://HOST:8883 for TLS")
        secrets["ca_cert"] = _read_ca(args.ca)
    elif values.get("mqtt_tls"):
        raise UserError("an mqtts:// broker needs --ca (the CA from evse-server broker-setup): "
                        "the charger verifies the broker and never connects unverified")
    if args.broker and not values.get("mqtt_tls") and args.mqtt_user is not None:
        print("warning: with mqtt:// the broker password crosses the network in the clear; "
              "use mqtts:// and --ca", file=sys.stderr)
    return (build_file(settings.SCHEMA, "settings.json", values, SETTING_OPTIONS),
            build_file(settings.SECRETS, "secrets.json", secrets, SECRET_OPTIONS))


def masked(text):
    """A secrets file's JSON with every non-empty value replaced by ``****``."""
    return json.dumps({k: ("****" if v else v) for k, v in json.loads(text).items()})


def _write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    os.chmod(path, 0o600)


def provision_plan(port, directory):
    """The mpremote steps that install ``directory``'s two files on the device:
    copy to ``*.tmp``, then rename both (atomic on littlefs) and restart."""
    mp = _mpremote(port)
    return [
        mp + ["exec", PARK, "+", "reset"],
        mp + ["fs", "cp", os.path.join(directory, "settings.json"),
              ":settings.json.tmp", "+", "fs", "cp", os.path.join(directory, "secrets.json"),
              ":secrets.json.tmp"],
        mp + ["exec", INSTALL_SETTINGS, "+", "reset"],
    ]


def cmd_provision(args):
    settings_text, secrets_text = provision_files(args)
    port = resolve_port(args.port, args.dry_run)
    print("# settings.json: " + settings_text)
    print("# secrets.json: " + masked(secrets_text))
    if args.keep:
        directory = os.path.abspath(args.keep)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UserError("--keep %s: cannot make the folder (%s)" % (args.keep, exc.strerror or exc))
    else:
        directory = tempfile.mkdtemp(prefix="evse-provision-")  # mode 0700
    try:
        try:
            _write_private(os.path.join(directory, "settings.json"), settings_text)
            _write_private(os.path.join(directory, "secrets.json"), secrets_text)
        except OSError as exc:
            raise UserError("cannot write the settings into %s (%s)" % (directory, exc.strerror or exc))
        for i, argv in enumerate(provision_plan(port, directory)):
            try:
                _step(argv, args.dry_run)
                if i == 0:
                    await_reboot(port, args.dry_run)
            except ToolError as exc:
                exc.note = PARKED_HINT if i else None
                raise
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if not args.dry_run:
        print("provisioned %s on %s; the charger restarts" % (args.id, port))
    return 0


# --- command line


def _baud(text):
    try:
        baud = int(text)
    except ValueError:
        baud = 0
    if not 9600 <= baud <= 5000000:
        raise argparse.ArgumentTypeError("baud rate must be a whole number 9600..5000000, not %r" % text)
    return baud


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--port", default="auto",
                        help="serial port, e.g. /dev/ttyUSB0 (default: auto, the only one present)")
    common.add_argument("--dry-run", action="store_true",
                        help="print the exact commands and touch no device")
    ap = argparse.ArgumentParser(
        prog="evse-deploy", allow_abbrev=False,
        description="Flash MicroPython onto a real ESP32 charger, deploy the firmware, open its "
                    "REPL, provision it. Every subcommand takes --dry-run: print the exact "
                    "commands and touch no device.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flash", parents=[common], allow_abbrev=False,
                       help="erase the flash and write a MicroPython image")
    p.add_argument("--image", required=True, help="MicroPython .bin for the chip")
    p.add_argument("--chip", choices=sorted(FLASH_OFFSETS), default="esp32",
                   help="esp32 (image at 0x1000, default), esp32s3 or esp32c3 (at 0x0)")
    p.add_argument("--baud", type=_baud, default=460800, help="bit/s while writing (default 460800)")
    p.set_defaults(func=cmd_flash)

    p = sub.add_parser("deploy", parents=[common], allow_abbrev=False,
                       help="compile and copy the firmware, then restart")
    p.add_argument("--ota-key", help="OTA public key (JSON), copied to /ota_key.json")
    p.add_argument("--frozen", action="store_true",
                   help="the image has the firmware frozen in (make image): copy only boot.py "
                        "and main.py, and remove /firmware, which would shadow it")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("repl", parents=[common], allow_abbrev=False,
                       help="open the serial REPL (Ctrl-] leaves)")
    p.set_defaults(func=cmd_repl)

    p = sub.add_parser("provision", parents=[common], allow_abbrev=False,
                       help="write settings.json and secrets.json to the device",
                       description="Builds settings.json and secrets.json, validated by the "
                                   "firmware's own schema, and replaces both on the device: a "
                                   "setting not given gets its default. Secrets come from "
                                   "environment variables or files, never from the command line, "
                                   "and are never printed.")
    p.add_argument("--id", required=True, help="charger id, [a-z0-9-]{1,32}")
    p.add_argument("--wifi-ssid")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wifi-password-env", metavar="VAR", help="environment variable holding it")
    g.add_argument("--wifi-password-file", metavar="FILE", help="file holding it (first line)")
    p.add_argument("--broker", help="mqtt://host[:1883] or mqtts://host[:8883]")
    p.add_argument("--mqtt-user")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mqtt-password-env", metavar="VAR")
    g.add_argument("--mqtt-password-file", metavar="FILE")
    p.add_argument("--ca", metavar="FILE", help="broker CA certificate, PEM, at most 4096 characters")
    p.add_argument("--unit-rating", metavar="A", help="unit rating, 6..80 A")
    p.add_argument("--installer-max", metavar="A", help="installer max (80%% of the breaker), 6..80 A")
    p.add_argument("--offline", metavar="A", help="offline current, 0 or 6..80 A")
    p.add_argument("--start", metavar="A", help="start current, 0 or 6..80 A")
    p.add_argument("--t-wd", metavar="S", help="connectivity watchdog T_wd, 10..600 s")
    p.add_argument("--keep", metavar="DIR",
                   help="write the two files into DIR and keep them (they hold the secrets)")
    p.set_defaults(func=cmd_provision)
    return ap


def main(argv=None):
    """Entry point of ``evse-deploy``. Returns the exit status: 0 done, 1 an
    error (reported on one line), 2 bad arguments."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (UserError, ToolError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        if getattr(exc, "note", None):
            print("note: %s" % exc.note, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
