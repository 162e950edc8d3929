"""Alerts in: ``eagle-dr alerts serve``, the receiver of Alertmanager's webhook (payload v4).

``payload`` reads a notification (400 naming the field when it cannot), ``plan`` maps its
alerts through the configured rules to incidents, ``dispatch`` hands each incident to
Temporal (signal-with-start of AlertIncidentWorkflow, 503 when Temporal is unreachable), and
``server`` is the HTTP side (bearer token, body cap, status codes, logs).
"""
