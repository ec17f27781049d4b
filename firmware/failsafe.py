"""The fail-safe: run the control loop, and force the safe state on any unhandled error.

Pure: the hardware and the reaction to a crash are parameters, so that host
tests can prove that an exception escaping the control loop leaves the
contactor open and the pilot at static +12 V (DESIGN.md §2).
"""


def run_failsafe(run, board, on_crash):
    """Call ``run()``. If anything escapes it (an error, ``KeyboardInterrupt``
    at the REPL, ``SystemExit``), first put ``board`` in its safe state
    (:meth:`firmware.hal.Board.safe_state`: contactor open, pilot static
    +12 V), then call ``on_crash(exc)`` and return its result. Returns None
    when ``run()`` returns normally; the board is made safe then as well."""
    try:
        run()
    except BaseException as exc:  # noqa: B036 - every exit path must be safe
        board.safe_state()
        return on_crash(exc)
    board.safe_state()
    return None
