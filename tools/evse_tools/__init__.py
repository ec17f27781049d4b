"""PC-side tools for the load-sharing EV charger (CPython only)."""
