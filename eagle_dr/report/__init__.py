"""Drill and runbook evidence: a run's history turned into a report people can read.

``extract`` builds a :class:`~eagle_dr.report.model.RunReport` from a workflow's history
(and, for a run still going, its ``progress`` query); ``html`` renders it as one
self-contained page (inline SVG, no script, no external resource); ``text`` as a terminal
summary. The CLI's ``eagle-dr report`` and the drill command use them.
"""
