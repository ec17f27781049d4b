"""Benchmarks (issue 7, DESIGN.md §7). Separate from the tests: they measure,
they never assert timing.

Each part is a module with ``run(quick: bool) -> dict`` (JSON-able figures)
and ``table(results) -> str`` (a plain-text table that states the machine and
the method); :mod:`evse_tools.bench.run` runs them all (``make bench``):

- :mod:`evse_tools.bench.firmware`: the charger's latencies, watchdog and memory;
- :mod:`evse_tools.bench.server`: allocation time against group size, and the
  real service's throughput and setpoint latency over mosquitto;
- :mod:`evse_tools.bench.capacity`: the share of the circuit's capacity that
  the project's allocator turns into charging, against two baselines, with
  the overload it causes (virtual time).
"""
import os
import platform


def machine_info() -> dict:
    """The machine the figures come from: CPU model, CPU count, OS, Python."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count() or 1, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}
