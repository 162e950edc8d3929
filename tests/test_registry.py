"""What the workers register: every activity a workflow schedules exists on some worker.

A worker whose registry raises (a method lost in a merge, say) dies at start, and the
runbooks then fail only minutes later with a schedule-to-start timeout: caught here at once."""

from __future__ import annotations

from temporalio import activity

from eagle_dr.config import load_config
from workers.registry import WORKFLOWS, control_activities, regional_activities


def test_every_registered_activity_is_an_activity_and_names_are_unique():
    cfg = load_config()
    for acts in (regional_activities(cfg), control_activities(cfg)):
        names = [activity._Definition.must_from_callable(a).name for a in acts]
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len({w.__name__ for w in WORKFLOWS}) == len(WORKFLOWS)
