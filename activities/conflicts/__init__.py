"""Resolving what the loser of a split brain wrote after the fork against the survivor.

``engine`` decides (pure, deterministic); ``apply`` carries the same decisions out in SQL
on the survivor, set-based, with an audit row per decision.
"""
