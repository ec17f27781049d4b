"""Run the firmware logic tests on the real MicroPython unix port.

pytest does not exist there, so this runner imports every ``tests/fw/test_*.py``
module, calls each ``test_*`` function, and ends with the same closing line
pytest prints ("N passed, N failed"). Exit status 1 on any failure, and also
when no test ran (as pytest's exit 5 is for us). MICROPYPATH must hold
``.frozen``, the repository root and ``tests/fw``.
"""
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
print("micropython %s: firmware logic tests" % ".".join(str(x) for x in sys.implementation.version[:3]))
for f in failed:
    print("FAILED", f)
print("%d passed, %d failed" % (passed, len(failed)))
sys.exit(1 if failed or not passed else 0)
