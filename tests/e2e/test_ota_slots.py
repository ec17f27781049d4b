"""OTA slots on the device runtime (issue 12): the factory firmware is frozen
into the image, an installed slot's ``.mpy`` shadows it, and a rollback
returns to the frozen code. A slot's bytecode lives in RAM (frozen bytecode
does not), so a charger running one needs a larger heap:
:data:`evse_tools.charger_sim.SLOT_HEAP`."""
import json
import shutil

from evse_tools import ota
from evse_tools.charger_sim import SLOT_HEAP, SimCharger


def install_slot(root, tmp_path, version="9.0.0"):
    """Put a complete bundle into slot a as the installer leaves it, pending."""
    keys = tmp_path / "keys"
    ota.keygen(keys)
    files = ota.default_files()
    vfile = tmp_path / "version.py"
    vfile.write_text('FW = "%s"\n' % version)
    files["firmware/version.py"] = vfile
    bundle = ota.build(keys / "ota_private.pem", version, files, tmp_path / "bundle")
    slot = root / "ota" / "a"
    shutil.copytree(bundle / "files", slot)
    (slot / "complete").write_text(version)
    (root / "ota.json").write_text(json.dumps({"active": "a", "previous": "factory", "pending": True,
                                               "boots": 0, "version": version, "rolled_back": None}))
    return slot


def code(ch):
    return ch.ask({"cmd": "code"}, "code")


def test_installed_slot_shadows_the_frozen_firmware_and_rollback_returns_to_it(tmp_path):
    root = tmp_path / "dev"
    root.mkdir()
    slot = install_slot(root, tmp_path)
    files = [p for p in (slot / "firmware").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".mpy"}    # bytecode, never source
    assert (slot / "firmware" / "core" / "charger.mpy").is_file()
    with SimCharger({"charger_id": "slot-1"}, root, heap=SLOT_HEAP, restart_on_exit=False) as ch:
        ch.wait_ready()
        assert code(ch) == str(slot / "firmware" / "core" / "charger.mpy")   # the slot, not the image
        # Never confirmed (no server): the power is cut during the trial.
        ch.power_cut()
        assert code(ch) == "frozen"                             # rolled back to the factory code
    state = json.loads((root / "ota.json").read_text())
    assert state["active"] == "factory" and state["rolled_back"] == "a"
