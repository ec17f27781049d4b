"""Run the firmware logic tests on the real MicroPython unix port.

pytest does not exist there, so this runner imports every ``tests/fw/test_*.py``
module, calls each ``test_*`` function, and ends with the same closing line
pytest prints ("N passed, N failed"). Exit status 1 on any failure, and also
when no test ran (as pytest's exit 5 is for us). MICROPYPATH must hold
``.frozen`` and ``tests/fw``; run it from ``tests/`` so that the firmware
comes from the frozen modules (``''`` is first on ``sys.path``).
"""
import gc
import os
import sys

here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
folder = here + "/fw"
passed = 0
failed = []
only = sys.argv[1:]
for fname in sorted(os.listdir(folder)):
    if not (fname.startswith("test_") and fname.endswith(".py")):
        continue
    modname = fname[:-3]
    if only and modname not in only:
        continue
    gc.collect()
    mod = __import__(modname)
    for name in sorted(dir(mod)):
        if not name.startswith("test_"):
            continue
        fn = getattr(mod, name)
        try:
            fn()
            passed += 1
        except Exception as exc:
            failed.append("%s::%s" % (modname, name))
            print("FAILED %s::%s" % (modname, name))
            sys.print_exception(exc)
    # A test module's bytecode lives in RAM (the firmware's is frozen): let it
    # go before the next one, so that the heap cap bounds one module's tests.
    mod = fn = None
    sys.modules.pop(modname, None)
    gc.collect()
print("MicroPython %s, %d-bit, %s floats, threads %s (%s): firmware logic tests" % (
    ".".join(str(x) for x in sys.implementation.version[:3]),
    32 if sys.maxsize < (1 << 32) else 64,
    "single-precision" if str(1 / 3) == "0.33333334" else "double-precision",
    getattr(sys.implementation, "_thread", "?"), getattr(sys.implementation, "_build", "?")))
for f in failed:
    print("FAILED", f)
print("%d passed, %d failed" % (passed, len(failed)))
sys.exit(1 if failed or not passed else 0)
