"""The pure conflict resolver: property tests for its laws, then a few worked examples."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activities.conflicts.engine import (
    Resolution,
    Version,
    apply_to,
    deletion,
    order,
    resolve,
    resolve_all,
    resolve_changes,
    version_of,
)
from eagle_dr.config import DEFAULT_CONFIG, TableConflictConfig, load_config

EAST, WEST, EU = "us-east-1", "us-west-2", "eu-central-1"
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
FORK = T0 + timedelta(minutes=100)
NOW = T0 + timedelta(minutes=200)
KEY = (7,)

# No example database in the project tree; no deadline, the lab may be busy.
PROPS = settings(database=None, deadline=None, max_examples=300)

# Every table has a creation column; versions without a creation time stand for tables without one.
TABLES = {
    "last-write-wins": TableConflictConfig(strategy="last-write-wins", created_column="created_at"),
    "merge-with-priority": TableConflictConfig(
        strategy="merge-with-priority", field_priority={"a": [EAST, WEST], "b": [WEST, EU, EAST]},
        created_column="created_at"),
    "source-priority": TableConflictConfig(strategy="source-priority", source_region=EAST,
                                           created_column="created_at"),
    "immutable-append-only": TableConflictConfig(strategy="immutable-append-only", created_column="created_at"),
    "freshness-priority": TableConflictConfig(strategy="freshness-priority", ttl=timedelta(minutes=60),
                                              created_column="created_at"),
}
SYMMETRIC = ["last-write-wins", "merge-with-priority", "source-priority", "freshness-priority"]

# Few distinct minutes around the fork and the ttl edge, so ties and equal rows are common.
minutes = st.sampled_from([0, 50, 100, 101, 139, 140, 141, 150, 199])
timestamps = minutes.map(lambda m: T0 + timedelta(minutes=m))
priorities = st.fixed_dictionaries({}, optional={EAST: st.integers(0, 2), WEST: st.integers(0, 2),
                                                 EU: st.integers(0, 2)})


@st.composite
def versions(draw, region: str) -> Version:
    kind = draw(st.sampled_from(["row", "row", "row", "deleted", "absent"]))
    if kind == "absent":
        return Version(region=region)
    if kind == "deleted":
        return deletion(region, draw(st.none() | timestamps))
    ts = draw(timestamps)
    # Unknown (no creation column), or inserted at or before its last update.
    created = draw(st.none() | timestamps.filter(lambda t: t <= ts))
    row = {"id": KEY[0], "a": draw(st.integers(0, 2)), "b": draw(st.integers(0, 2)), "updated_at": ts,
           "created_at": created}
    return Version(region=region, row=row, updated_at=ts, created_at=created)


@st.composite
def pairs(draw) -> tuple[Version, Version]:
    s_region, l_region = draw(st.permutations([EAST, WEST, EU]))[:2]
    return draw(versions(s_region)), draw(versions(l_region))


def _resolve(strategy: str, s: Version, l: Version, prio) -> Resolution:
    return resolve(TABLES[strategy], KEY, s, l, prio, FORK, NOW)


def _changed(v: Version) -> bool:
    return v.deleted or (v.updated_at is not None and v.row is not None and v.updated_at > FORK)


def _inserted_after_fork(v: Version) -> bool:
    return v.created_at is not None and v.created_at > FORK


def _collides(s: Version, l: Version) -> bool:
    """Two different rows inserted under one key after the fork, one on each side."""
    def app(v: Version) -> tuple:
        return (v.row["a"], v.row["b"])
    return (s.row is not None and l.row is not None and _inserted_after_fork(s) and _inserted_after_fork(l)
            and s.created_at != l.created_at and app(s) != app(l))


def _existed_at_fork(v: Version) -> bool:
    return v.created_at is not None and v.created_at <= FORK


def _deleted_and_updated(s: Version, l: Version) -> bool:
    """One side lacks a row that existed at the fork (so it deleted it), the other updated it since."""
    return any(a.row is None and not a.deleted and b.row is not None and _existed_at_fork(b) and _changed(b)
               for a, b in ((s, l), (l, s)))


def _live_conflict(s: Version, l: Version) -> bool:
    """Both sides updated the row, differently (collisions excluded: they are flagged)."""
    return (s.row is not None and l.row is not None and _changed(s) and _changed(l) and s.row != l.row
            and not _collides(s, l))


def _rank(region: str, prio) -> tuple:
    return (prio.get(region, float("inf")), region)


# -- determinism -----------------------------------------------------------------------------


@PROPS
@given(strategy=st.sampled_from(SYMMETRIC), pair=pairs(), prio=priorities)
def test_symmetric_strategies_ignore_which_side_is_the_survivor(strategy, pair, prio):
    s, l = pair
    if _collides(s, l):
        return  # the survivor's row stays, whichever it is: see the collision law
    one, two = _resolve(strategy, s, l, prio), _resolve(strategy, l, s, prio)
    assert (one.result, one.winner_region, one.conflict) == (two.result, two.winner_region, two.conflict)


@PROPS
@given(strategy=st.sampled_from(list(TABLES)), items=st.lists(pairs(), min_size=1, max_size=8),
       prio=priorities, seed=st.integers())
def test_resolve_all_is_order_independent(strategy, items, prio, seed):
    keyed = [((i,), s, l) for i, (s, l) in enumerate(items)]
    shuffled = list(keyed)
    random.Random(seed).shuffle(shuffled)
    table = TABLES[strategy]
    out = resolve_all(table, keyed, prio, FORK, NOW)
    assert out == resolve_all(table, shuffled, prio, FORK, NOW)
    assert [r.key for r in out] == sorted(k for k, _, _ in keyed)


def test_resolve_all_refuses_a_repeated_key():
    v = Version(region=EAST)
    with pytest.raises(ValueError, match="given twice"):
        resolve_all(TABLES["last-write-wins"], [(KEY, v, v), (KEY, v, v)], {}, FORK, NOW)


# -- idempotence -----------------------------------------------------------------------------


@PROPS
@given(strategy=st.sampled_from(list(TABLES)), pair=pairs(), prio=priorities)
def test_applying_twice_changes_nothing(strategy, pair, prio):
    s, l = pair
    first = _resolve(strategy, s, l, prio)
    if first.result is not None:
        after = version_of(s.region, first.result, TABLES[strategy])
    else:
        # The survivor ends without the row; a deletion it had made itself is still its own.
        after = s if s.row is None else Version(region=s.region)
    again = _resolve(strategy, after, l, prio)
    assert again.result == first.result
    assert again.action == ("flag" if first.action == "flag" else "keep_survivor")


# -- each strategy's law ---------------------------------------------------------------------


@PROPS
@given(pair=pairs(), prio=priorities)
def test_lww_picks_the_latest_timestamp_then_region_priority(pair, prio):
    s, l = pair
    r = _resolve("last-write-wins", s, l, prio)
    if not _live_conflict(s, l):
        return
    assert r.conflict
    if s.updated_at != l.updated_at:
        winner = s if s.updated_at > l.updated_at else l
    else:
        winner = min((s, l), key=lambda v: _rank(v.region, prio))
    assert (r.result, r.winner_region) == (winner.row, winner.region)


@PROPS
@given(pair=pairs(), prio=priorities)
def test_source_priority_always_picks_the_source(pair, prio):
    s, l = pair
    r = _resolve("source-priority", s, l, prio)
    if not (_changed(s) and _changed(l) and s.row != l.row) or EAST not in (s.region, l.region) or _collides(s, l):
        return
    source = s if s.region == EAST else l
    # Including its deletions: a deleted source row stays deleted.
    assert (r.result, r.winner_region) == (source.row, EAST)


@PROPS
@given(pair=pairs(), prio=priorities)
def test_immutable_never_changes_an_existing_row_and_keeps_inserts(pair, prio):
    s, l = pair
    r = _resolve("immutable-append-only", s, l, prio)
    assert r.action in ("keep_survivor", "insert_loser", "flag")
    if s.row is not None:
        assert r.result == s.row
    if s.row is None and not s.deleted and l.row is not None and _changed(l) and not _existed_at_fork(l):
        assert (r.action, r.result) == ("insert_loser", l.row)
    if _live_conflict(s, l) or _collides(s, l):
        assert r.action == "flag" and r.conflict
    if s.row is not None and not _changed(s) and (_changed(l) or l.row is None) and l.row != s.row:
        # The loser updated or deleted a row that existed before the fork.
        assert r.action == "flag"


@PROPS
@given(pair=pairs(), prio=priorities, ttl=st.sampled_from([30, 60, 61, 500]))
def test_freshness_never_lets_a_stale_version_beat_a_fresh_one(pair, prio, ttl):
    s, l = pair
    table = TableConflictConfig(strategy="freshness-priority", ttl=timedelta(minutes=ttl), created_column="created_at")
    r = resolve(table, KEY, s, l, prio, FORK, NOW)
    if not _live_conflict(s, l):
        return
    # Exactly ttl old is still fresh.
    stale = {v.region: v.updated_at < NOW - table.ttl for v in (s, l)}
    if stale[s.region] != stale[l.region]:
        fresh = s if not stale[s.region] else l
        assert (r.result, r.winner_region) == (fresh.row, fresh.region)
    else:
        assert r.result == order(s, l, prio)[0].row


@PROPS
@given(pair=pairs(), prio=priorities)
def test_merge_takes_each_prioritized_field_from_its_preferred_region(pair, prio):
    s, l = pair
    table = TABLES["merge-with-priority"]
    r = _resolve("merge-with-priority", s, l, prio)
    if not _live_conflict(s, l):
        return
    by_region = {s.region: s, l.region: l}
    newer = order(s, l, prio)[0]
    for field in ("id", "updated_at"):
        assert r.result[field] == newer.row[field]
    for field, regions in table.field_priority.items():
        preferred = next((by_region[reg] for reg in regions if reg in by_region), newer)
        assert r.result[field] == preferred.row[field], field
    assert r.winner_region == newer.region


@PROPS
@given(strategy=st.sampled_from(list(TABLES)), pair=pairs(), prio=priorities)
def test_only_the_loser_changed_is_applied_as_is(strategy, pair, prio):
    s, l = pair
    # The loser changed the key after the fork, the survivor did not (and has no row to protect
    # under append-only, nor lacks one that existed at the fork): the loser's change stands
    # whatever the strategy.
    if not (_changed(l) and s.row is None and not s.deleted) or _deleted_and_updated(s, l):
        return
    r = _resolve(strategy, s, l, prio)
    assert not r.conflict
    assert r.result == l.row


@PROPS
@given(strategy=st.sampled_from(list(TABLES)), pair=pairs(), prio=priorities)
def test_an_insert_insert_collision_is_flagged_and_nothing_overwritten(strategy, pair, prio):
    s, l = pair
    r = _resolve(strategy, s, l, prio)
    if _collides(s, l):
        assert (r.action, r.result, r.winner_region, r.conflict) == ("flag", s.row, s.region, True)
        assert "insert-insert key collision" in r.reason
    else:
        assert "collision" not in r.reason


@PROPS
@given(strategy=st.sampled_from(list(TABLES)), pair=pairs(), prio=priorities)
def test_an_update_of_a_row_the_other_side_deleted_is_a_conflict_naming_the_deletion(strategy, pair, prio):
    s, l = pair
    if not _deleted_and_updated(s, l):
        return
    r = _resolve(strategy, s, l, prio)
    deleter, updater = (s, l) if s.row is None else (l, s)
    assert r.conflict
    assert r.reason.startswith(f"conflict: {deleter.region} deleted it after the fork")
    if strategy == "immutable-append-only":
        # Nothing on the survivor is replaced, and a row it lacks is not put back silently.
        assert (r.action, r.result) == ("flag", s.row)
    elif strategy == "source-priority" and deleter.region == EAST:
        assert (r.result, r.winner_region) == (None, EAST)  # the source deleted it: it stays deleted
    else:
        # The deletion's time is unknown: the update wins, and the audit says the row came back.
        assert (r.result, r.winner_region) == (updater.row, updater.region)


# -- examples --------------------------------------------------------------------------------


def _row(i: int, minute: int, **fields) -> dict:
    return {"id": i, "updated_at": T0 + timedelta(minutes=minute), **fields}


def _v(region: str, row: dict | None) -> Version:
    return version_of(region, row, TABLES["last-write-wins"])


def test_lww_tie_goes_to_the_preferred_region_not_to_an_argument_position():
    east, west = _v(EAST, _row(1, 150, a=1)), _v(WEST, _row(1, 150, a=2))
    for prio, winner in (({EAST: 1, WEST: 2}, east), ({EAST: 2, WEST: 1}, west)):
        for s, l in ((east, west), (west, east)):
            r = resolve(TABLES["last-write-wins"], (1,), s, l, prio, FORK, NOW)
            assert (r.result, r.winner_region, r.conflict) == (winner.row, winner.region, True)
            assert "region priority" in r.reason


def test_survivor_update_beats_an_undated_loser_delete():
    survivor = _v(EAST, _row(1, 150, a=1))
    r = resolve(TABLES["last-write-wins"], (1,), survivor, deletion(WEST), {}, FORK, NOW)
    assert (r.action, r.result, r.conflict) == ("keep_survivor", survivor.row, True)


def test_loser_delete_of_an_untouched_row_is_applied():
    r = resolve(TABLES["last-write-wins"], (1,), _v(EAST, _row(1, 50)), deletion(WEST), {}, FORK, NOW)
    assert (r.action, r.result, r.conflict, r.winner_region) == ("delete", None, False, WEST)


def test_source_region_delete_wins_over_a_later_update():
    table = TABLES["source-priority"]
    r = resolve(table, (1,), _v(WEST, _row(1, 199, a=9)), deletion(EAST, T0 + timedelta(minutes=120)), {}, FORK, NOW)
    assert (r.action, r.result, r.winner_region) == ("delete", None, EAST)


def test_append_only_flags_an_update_and_keeps_the_survivor():
    table = TABLES["immutable-append-only"]
    survivor, loser = _v(EAST, _row(1, 50, a=1)), _v(WEST, _row(1, 150, a=2))
    r = resolve(table, (1,), survivor, loser, {}, FORK, NOW)
    assert (r.action, r.result, r.conflict) == ("flag", survivor.row, False)
    r = resolve(table, (2,), Version(region=EAST), _v(WEST, _row(2, 150, a=2)), {}, FORK, NOW)
    assert r.action == "insert_loser"


def test_stale_loser_loses_to_fresh_survivor_even_when_later_than_the_fork():
    table = TableConflictConfig(strategy="freshness-priority", ttl=timedelta(minutes=55))
    stale_loser, fresh_survivor = _v(WEST, _row(1, 140, a=2)), _v(EAST, _row(1, 150, a=1))
    r = resolve(table, (1,), fresh_survivor, stale_loser, {}, FORK, T0 + timedelta(minutes=196))
    assert (r.action, r.winner_region) == ("keep_survivor", EAST)
    assert r.reason == f"conflict: {WEST} is stale (older than 0:55:00)"
    # Exactly ttl old is still fresh: the loser at 141 is not stale at 196, so time decides.
    r = resolve(table, (1,), fresh_survivor, _v(WEST, _row(1, 141, a=2)), {}, FORK, T0 + timedelta(minutes=196))
    assert r.reason == f"conflict: {EAST} wrote last"


def test_merge_with_the_shipped_alert_rules_config():
    cfg = load_config(DEFAULT_CONFIG, env={})
    table = cfg.conflicts["alert_rules"]
    regions = {r.name: r.priority for r in cfg.regions}
    east = version_of(EAST, {"id": 1, "name": "cpu-east", "threshold": 80, "enabled": True,
                             "updated_at": T0 + timedelta(minutes=150)}, table)
    west = version_of(WEST, {"id": 1, "name": "cpu-west", "threshold": 95, "enabled": False,
                             "updated_at": T0 + timedelta(minutes=160)}, table)
    r = resolve(table, (1,), east, west, regions, FORK, NOW)
    # threshold from us-east-1, enabled from us-west-2, the rest from the newer (us-west-2) row.
    assert r.result == {"id": 1, "name": "cpu-west", "threshold": 80, "enabled": False,
                        "updated_at": T0 + timedelta(minutes=160)}
    assert (r.action, r.conflict, r.winner_region) == ("merge", True, WEST)


def test_resolve_changes_and_apply_to_build_the_final_table():
    table = TABLES["last-write-wins"]
    survivor = {(1,): _row(1, 50, a=1), (2,): _row(2, 50, a=2), (3,): _row(3, 160, a=3)}
    loser = [_row(1, 150, a=10), _row(3, 150, a=30), _row(4, 150, a=40)]
    out = resolve_changes(table, survivor, loser, [(2,)], WEST, EAST, {EAST: 1}, FORK, NOW)
    assert [(r.key, r.action) for r in out] == [((1,), "apply_loser"), ((2,), "delete"),
                                                ((3,), "keep_survivor"), ((4,), "insert_loser")]
    assert apply_to(survivor, out) == {(1,): loser[0], (3,): survivor[(3,)], (4,): loser[2]}


def test_versions_refuse_naive_timestamps_and_rows_on_deletions():
    with pytest.raises(ValueError):
        Version(region=EAST, row={"id": 1}, updated_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        Version(region=EAST, row={"id": 1}, deleted=True)


def _inserted(region: str, minute: int, created: int | None, **fields) -> Version:
    row = _row(1001, minute, created_at=None if created is None else T0 + timedelta(minutes=created), **fields)
    return version_of(region, row, TABLES["last-write-wins"])


def test_both_sides_inserting_the_same_sequence_value_is_a_flagged_collision():
    survivor, loser = _inserted(EAST, 120, 120, a=1), _inserted(WEST, 130, 130, a=2)
    for strategy, table in TABLES.items():
        r = resolve(table, (1001,), survivor, loser, {WEST: 1}, FORK, NOW)
        assert (r.action, r.result, r.winner_region, r.conflict) == ("flag", survivor.row, EAST, True), strategy
        assert r.reason == (f"conflict: insert-insert key collision, {EAST} and {WEST} each inserted a different "
                            f"row under this key after the fork: {EAST}'s row kept, {WEST}'s flagged for review "
                            "(re-key it by hand)")


def test_what_is_not_a_collision():
    lww = TABLES["last-write-wins"]
    # One row inserted just before the (early-erring) fork time, replicated, then updated on both
    # sides: the same creation time, so two updates of one row, decided by time.
    r = resolve(lww, (1001,), _inserted(EAST, 120, 101, a=1), _inserted(WEST, 130, 101, a=2), {}, FORK, NOW)
    assert (r.action, r.conflict, r.reason) == ("apply_loser", True, f"conflict: {WEST} wrote last")
    # The same write made on both sides (a retried request): nothing differs but the stamps.
    r = resolve(lww, (1001,), _inserted(EAST, 120, 120, a=1), _inserted(WEST, 130, 130, a=1), {}, FORK, NOW)
    assert (r.action, r.conflict) == ("apply_loser", True)
    # No creation column: the limit of timestamps, two updates of one row; still a conflict, so the
    # audit keeps both versions.
    r = resolve(lww, (1001,), _inserted(EAST, 120, None, a=1), _inserted(WEST, 130, None, a=2), {}, FORK, NOW)
    assert (r.action, r.conflict) == ("apply_loser", True)


def test_the_survivor_deleted_a_row_the_loser_then_updated():
    existing = _row(1, 150, a=2, created_at=T0 + timedelta(minutes=10))  # inserted long before the fork
    gone = Version(region=EAST)
    source = TableConflictConfig(strategy="source-priority", source_region=EAST, created_column="created_at")
    loser = version_of(WEST, existing, source)
    r = resolve(source, (1,), gone, loser, {}, FORK, NOW)
    assert (r.action, r.result, r.winner_region, r.conflict) == ("keep_survivor", None, EAST, True)
    assert r.reason == (f"conflict: {EAST} deleted it after the fork (when is not recorded) and {WEST} updated it: "
                        f"{EAST} is the source region")
    r = resolve(TABLES["last-write-wins"], (1,), gone, loser, {}, FORK, NOW)
    assert (r.action, r.result, r.conflict) == ("insert_loser", existing, True)
    assert r.reason.endswith(f"{WEST} wrote last") and "deleted it after the fork" in r.reason
    r = resolve(TABLES["immutable-append-only"], (1,), gone, loser, {}, FORK, NOW)
    assert (r.action, r.result, r.conflict) == ("flag", None, True)
    # Without a creation column the deletion cannot be seen: an insert on the loser, as before.
    blind = TableConflictConfig(strategy="source-priority", source_region=EAST)
    r = resolve(blind, (1,), gone, version_of(WEST, existing, blind), {}, FORK, NOW)
    assert (r.action, r.conflict, r.reason) == ("insert_loser", False, f"only {WEST} changed it after the fork")
