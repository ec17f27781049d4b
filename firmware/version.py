FW = "0.3.0"
"""Firmware version, reported as ``fw`` in the state message."""
