"""Notifications out: one module per channel (slack, pagerduty, smtp), the event and its text
(event.py), and the one activity that delivers an event to one channel (activities.py)."""
