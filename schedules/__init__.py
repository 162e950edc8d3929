"""Temporal Schedules from the config: ``specs`` (what the config asks for), ``apply`` (make
the namespace match, idempotently), ``control`` (list, pause, unpause, trigger)."""
