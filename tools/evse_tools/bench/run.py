"""``make bench``: every benchmark of issue 7, printed as tables and saved as JSON.

    evse-bench [--quick] [--only firmware,server,capacity] [--out out/bench.json]

Timing claims are measured here, never asserted in tests. The machine and the
method are printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evse_tools.bench import machine_info

PARTS = ("firmware", "memory", "server", "capacity")


def machine() -> str:
    m = machine_info()
    return f"{m['cpu']}, {m['cpus']} cores, Python {m['python']}, {m['os']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks and print their figures.")
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts (default: all)")
    ap.add_argument("--out", default="out/bench.json", help="where the JSON goes")
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s): {', '.join(bad)}; choose from {', '.join(PARTS)}")
    out = Path(args.out)
    results = {}
    if out.exists() and len(parts) < len(PARTS):
        try:      # a partial run updates the parts it ran
            results = json.loads(out.read_text())
        except ValueError:
            results = {}
    results.update({"machine": machine(), "quick": args.quick,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"machine: {results['machine']}")
    for part in parts:
        mod = __import__(f"evse_tools.bench.{part}", fromlist=["run", "table"])
        t0 = time.monotonic()
        print(f"\n== {part} ({'quick' if args.quick else 'full'} run) ...", flush=True)
        res = mod.run(quick=args.quick)
        results[part] = res
        print(mod.table(res))
        print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfigures saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
