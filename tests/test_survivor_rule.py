"""Which region survives a split brain: the configured rule, its fallbacks, an operator's choice."""

from __future__ import annotations

import pytest

from activities.split_brain import SplitBrainReport, choose_survivor

EAST, WEST = "us-east-1", "us-west-2"
PRIORITY = {EAST: 1, WEST: 2}


def report(primaries=(EAST, WEST), views=None, epochs=None) -> SplitBrainReport:
    return SplitBrainReport(postgres_primaries=list(primaries), redis_masters=[EAST, WEST],
                            active_region_views=views if views is not None else {"lab": WEST},
                            epochs=epochs if epochs is not None else {EAST: 3, WEST: 3})


def test_active_region_rule_follows_routing_even_against_priority():
    c = choose_survivor("active-region", report(), PRIORITY)
    assert (c.survivor, c.loser, c.rule) == (WEST, EAST, "active-region")


def test_disagreeing_routing_falls_back_to_the_highest_epoch_then_priority():
    split_views = {"configmap@us-east-1": EAST, "configmap@us-west-2": WEST}
    c = choose_survivor("active-region", report(views=split_views, epochs={EAST: 4, WEST: 7}), PRIORITY)
    assert (c.survivor, c.rule) == (WEST, "highest-epoch")
    assert "7" in c.why
    c = choose_survivor("active-region", report(views=split_views), PRIORITY)  # epochs tie
    assert (c.survivor, c.rule) == (EAST, "priority")


def test_highest_epoch_and_priority_rules():
    assert choose_survivor("highest-epoch", report(epochs={EAST: 9, WEST: 2}), PRIORITY).survivor == EAST
    assert choose_survivor("priority", report(epochs={EAST: 1, WEST: 9}), {EAST: 5, WEST: 2}).survivor == WEST


def test_a_single_writable_primary_survives_whatever_the_rule():
    c = choose_survivor("active-region", report(primaries=[EAST]), PRIORITY)
    assert (c.survivor, c.loser, c.rule) == (EAST, WEST, "single-primary")


def test_operator_choice_must_be_a_writable_primary():
    assert choose_survivor("priority", report(), PRIORITY, chosen=WEST).rule == "operator"
    with pytest.raises(ValueError, match="cannot survive"):
        choose_survivor("priority", report(primaries=[EAST]), PRIORITY, chosen=WEST)


def test_the_choice_does_not_depend_on_the_order_regions_are_listed():
    r1 = report(primaries=[EAST, WEST], views={})
    r2 = report(primaries=[WEST, EAST], views={})
    assert choose_survivor("active-region", r1, PRIORITY) == choose_survivor("active-region", r2,
                                                                              dict(reversed(PRIORITY.items())))
