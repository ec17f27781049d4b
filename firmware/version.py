FW = "0.4.0"
"""Firmware version, reported as ``fw`` in the state message."""
