"""The conflict resolver: given the survivor's and the loser's version of one key, what the
survivor must end with. Pure and deterministic: no I/O, no clock (``now`` is a parameter).

Vocabulary. A *version* is one region's state of a key: a live row, a deletion it made after
the fork (``deleted=True``), or nothing at all (absent). A side *changed* the key after the fork
when its row's timestamp is later than the fork, when it deleted the key, or when it lacks a
row the other side still holds unchanged from before the fork: both held that row at the fork,
so the side lacking it deleted it since. A key is a *conflict* only when both sides changed it
and their versions differ.

A table's creation-time column (``created_column``: when each row was inserted) tells more.
Both sides holding a key, each inserted after the fork, independently (different creation
times) and with different contents, is an *insert-insert collision*: two different rows
given the same key (typically the same sequence value handed out on both sides of the
fork). No strategy may merge or overwrite one with the other; the key is flagged, see
``resolve``. Without a creation column a collision looks like two updates of one row and is
decided by the strategy as a conflict (audited with both versions, conflict=true); that is
the limit of what timestamps alone can tell.

The creation column also tells a resurrection from an insert. A side lacking a row that the
other holds, inserted at or before the fork, lacks it because it deleted it after the fork
(both held it at the fork). If the other side updated that row after the fork, both changed
the key: a conflict, with a reason naming the deletion, decided by the strategy.
source-priority with the deleting side as source keeps it deleted; append-only flags it;
the time-based strategies let the update win, because the deletion's time is unknown and an
undated delete is older than any update (``order``): a resurrected row can be deleted again,
a lost update cannot be recovered, and the audit holds the key as a conflict either way.
Without a creation column such a row looks inserted after the fork on the updating side, is
applied as that side's only change, and is not a conflict: the deletion cannot be seen.

Every rule below looks at the versions' content and region names only, never at which side
was passed as survivor: with a symmetric strategy (last-write-wins, freshness, merge, and
source-priority too) swapping the arguments gives the same result and winner. Only the
action's name (keep_survivor vs apply_loser), append-only's "never touch the survivor's
existing rows" and a collision's "the survivor's row stays" depend on the roles.

``apply.py`` re-implements exactly these rules in SQL; the reason strings come from the
functions here so the two cannot drift apart silently (a test compares them key by key).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from eagle_dr.config import TableConflictConfig

Action = Literal["keep_survivor", "apply_loser", "merge", "insert_loser", "delete", "flag"]
Key = tuple[Any, ...]


class Version(BaseModel):
    model_config = ConfigDict(frozen=True)

    region: str
    # None: the region does not hold the key (deleted, or never had it).
    row: dict[str, Any] | None = None
    updated_at: datetime | None = None
    # When the row was inserted (the table's created_column); None: unknown.
    created_at: datetime | None = None
    # A deletion the caller knows this region made after the fork. Without it a missing row is
    # only "absent", which is ambiguous (deleted here, or inserted on the other side).
    deleted: bool = False
    # This region's own transaction wrote this version after the fork (its xmin says so), even
    # if its timestamp says otherwise: an UPDATE that left the stamp alone, or a clock behind.
    written_after_fork: bool = False

    @field_validator("updated_at", "created_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        # Naive and aware datetimes do not compare: refuse early rather than fail mid-batch.
        if v is not None and v.tzinfo is None:
            raise ValueError("updated_at and created_at must be timezone-aware")
        return v

    @model_validator(mode="after")
    def _tombstone_has_no_row(self) -> "Version":
        if self.deleted and self.row is not None:
            raise ValueError("a deleted version cannot carry a row")
        return self


class Resolution(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: Key
    action: Action
    # The row the survivor must end with; None = the key must not exist there.
    result: dict[str, Any] | None
    winner_region: str | None
    conflict: bool
    reason: str


# -- building versions from rows -----------------------------------------------------------


def key_of(row: Mapping[str, Any], table: TableConflictConfig) -> Key:
    return tuple(row[k] for k in table.key)


def version_of(region: str, row: Mapping[str, Any] | None, table: TableConflictConfig,
               written_after_fork: bool = False) -> Version:
    """A region's current row for a key (None: it holds none) as a version."""
    if row is None:
        return Version(region=region)
    created = row.get(table.created_column) if table.created_column else None
    return Version(region=region, row=dict(row), updated_at=row.get(table.timestamp_column), created_at=created,
                   written_after_fork=written_after_fork)


def deletion(region: str, deleted_at: datetime | None = None) -> Version:
    return Version(region=region, deleted=True, updated_at=deleted_at)


# -- reasons (shared with the SQL implementation) --------------------------------------------

SAME_VERSION = "same version on both sides"
APPEND_BOTH = "append-only: written on both sides, flagged for review"
APPEND_DIVERGED = "append-only: diverged before the fork, survivor kept"


def only_changed(region: str) -> str:
    return f"only {region} changed it after the fork"


def lww_rule(winner_region: str, tie: bool, timestamp_column: str) -> str:
    if tie:
        return f"same {timestamp_column}, {winner_region} has region priority"
    return f"{winner_region} wrote last"


def stale_rule(stale_region: str, ttl: timedelta) -> str:
    return f"{stale_region} is stale (older than {ttl})"


def source_rule(source_region: str) -> str:
    return f"{source_region} is the source region"


def merge_rule(lww: str) -> str:
    return f"merged by field priority, other fields: {lww}"


def append_existing(region: str) -> str:
    return f"append-only: {region} changed an existing row, flagged for review"


def situation(conflict: bool, rule: str) -> str:
    return f"{'conflict' if conflict else 'diverged before the fork'}: {rule}"


APPEND_DELETED = "append-only, flagged for review"


def deleted_and_updated(deleter_region: str, updater_region: str, rule: str) -> str:
    return (f"conflict: {deleter_region} deleted it after the fork (when is not recorded) and "
            f"{updater_region} updated it: {rule}")


def collision(survivor_region: str, loser_region: str) -> str:
    return (f"conflict: insert-insert key collision, {survivor_region} and {loser_region} each inserted a "
            f"different row under this key after the fork: {survivor_region}'s row kept, {loser_region}'s "
            "flagged for review (re-key it by hand)")


# -- ordering --------------------------------------------------------------------------------


def region_preference(a: str, b: str, region_priority: Mapping[str, int]) -> bool | None:
    """True when region a beats region b on a timestamp tie: lower priority number first, then
    the name, so that unranked or equally ranked regions still have a fixed order. None: same region."""
    inf = float("inf")
    pa, pb = region_priority.get(a, inf), region_priority.get(b, inf)
    if pa != pb:
        return pa < pb
    if a != b:
        return a < b
    return None


def _canonical(v: Version) -> str:
    return json.dumps(v.row, sort_keys=True, default=str)


def order(a: Version, b: Version, region_priority: Mapping[str, int]) -> tuple[Version, Version, bool]:
    """(newer, older, tie): the last-write-wins order, a total order on the versions' content.

    A version without a timestamp (a deletion whose time is unknown) is older than any dated
    one, so an update made after the fork beats an undated delete: resurrecting a row is
    recoverable, silently losing one is not. ``tie`` is True when the timestamps are equal."""
    if a.updated_at != b.updated_at:
        if b.updated_at is None or (a.updated_at is not None and a.updated_at > b.updated_at):
            return a, b, False
        return b, a, False
    pref = region_preference(a.region, b.region, region_priority)
    if pref is None:
        # Same region on both sides only happens in tests; content still decides, not position.
        pref = _canonical(a) >= _canonical(b)
    return (a, b, True) if pref else (b, a, True)


def is_stale(v: Version, ttl: timedelta, now: datetime) -> bool:
    # An undated version cannot be shown to be fresh.
    return v.updated_at is None or v.updated_at < now - ttl


def _after(v: Version, fork_time: datetime) -> bool:
    return v.written_after_fork or (v.updated_at is not None and v.updated_at > fork_time)


def _inserted_after(v: Version, fork_time: datetime) -> bool:
    return v.created_at is not None and v.created_at > fork_time


def content(v: Version, table: TableConflictConfig) -> dict[str, Any] | None:
    """The row without its update and creation stamps: what the application wrote."""
    if v.row is None:
        return None
    return {k: x for k, x in v.row.items() if k not in (table.timestamp_column, table.created_column)}


def insert_collision(table: TableConflictConfig, a: Version, b: Version, fork_time: datetime) -> bool:
    """Both sides inserted a row under this key after the fork, and they are different rows.

    Equal creation times mean one insert replicated before the fork (the fork time errs early,
    so a row inserted just before it can look inserted after): the same row, updated since.
    Equal contents apart from the stamps mean the same write made on both sides (a retried
    request): nothing is lost whichever version stays, so the strategy decides as usual."""
    return (a.row is not None and b.row is not None and _inserted_after(a, fork_time)
            and _inserted_after(b, fork_time) and a.created_at != b.created_at
            and content(a, table) != content(b, table))


def _existed_at_fork(v: Version, fork_time: datetime) -> bool:
    # The fork time errs early (reconcile), so a row inserted just before the real fork counts
    # as inserted after it: a deletion of it is missed (as without a creation column), never
    # invented. A row inserted before the fork time by a transaction that committed after the
    # real fork does look deleted on the other side: a conflict, audited with its row.
    return v.created_at is not None and v.created_at <= fork_time


def changed_after_fork(v: Version, other: Version, fork_time: datetime) -> bool:
    if v.deleted:
        return True
    if v.row is not None:
        return _after(v, fork_time)
    # v lacks a row the other holds: v deleted it after the fork if the row existed then,
    # which shows when the other's row is unchanged since the fork, or was inserted before it.
    return other.row is not None and (not _after(other, fork_time) or _existed_at_fork(other, fork_time))


def deleter_of(survivor: Version, loser: Version) -> Version | None:
    """In a conflict, the side that lacks the row (it deleted it after the fork, at a time
    nobody recorded), if either does."""
    return next((v for v in (survivor, loser) if v.row is None and not v.deleted), None)


# -- strategies ------------------------------------------------------------------------------


def _merge(table: TableConflictConfig, newer: Version, older: Version) -> dict[str, Any]:
    assert newer.row is not None
    result = dict(newer.row)
    for field, regions in table.field_priority.items():
        for region in regions:
            src = next((v for v in (newer, older) if v.region == region and v.row is not None), None)
            if src is not None:
                if field in src.row:  # type: ignore[operator]
                    result[field] = src.row[field]  # type: ignore[index]
                break
    return result


def _by_strategy(
    table: TableConflictConfig, a: Version, b: Version, region_priority: Mapping[str, int], now: datetime
) -> tuple[Version, dict[str, Any] | None, str]:
    """(winner, result, rule) when the strategy must decide between two differing versions."""
    newer, older, tie = order(a, b, region_priority)
    lww = lww_rule(newer.region, tie, table.timestamp_column)
    if table.strategy == "freshness-priority":
        assert table.ttl is not None
        stale_a, stale_b = is_stale(a, table.ttl, now), is_stale(b, table.ttl, now)
        if stale_a != stale_b:
            fresh, stale = (b, a) if stale_a else (a, b)
            return fresh, fresh.row, stale_rule(stale.region, table.ttl)
    elif table.strategy == "source-priority":
        sources = [v for v in (a, b) if v.region == table.source_region]
        if len(sources) == 1:
            return sources[0], sources[0].row, source_rule(sources[0].region)
        # Neither (or both) from the source region: nothing to prefer, fall back to time.
    elif table.strategy == "merge-with-priority" and newer.row is not None:
        return newer, _merge(table, newer, older), merge_rule(lww)
    return newer, newer.row, lww


def _append_only(
    survivor: Version, loser: Version, s_changed: bool, l_changed: bool, same: bool
) -> tuple[Version, dict[str, Any] | None, bool, str]:
    """(winner, result, flag, reason). Nothing already on the survivor is ever replaced."""
    if s_changed and l_changed:
        if same:
            return survivor, survivor.row, False, SAME_VERSION
        return survivor, survivor.row, True, APPEND_BOTH
    if l_changed:
        if survivor.row is not None:
            return survivor, survivor.row, True, append_existing(loser.region)
        return loser, loser.row, False, only_changed(loser.region)
    if s_changed:
        return survivor, survivor.row, False, only_changed(survivor.region)
    return survivor, survivor.row, False, SAME_VERSION if same else APPEND_DIVERGED


def _action(flag: bool, survivor: Version, loser: Version, result: dict[str, Any] | None) -> Action:
    if flag:
        return "flag"
    if result == survivor.row:
        return "keep_survivor"
    if result is None:
        return "delete"
    if survivor.row is None:
        return "insert_loser"
    if result == loser.row:
        return "apply_loser"
    return "merge"


def resolve(
    table: TableConflictConfig,
    key: Key,
    survivor: Version,
    loser: Version,
    region_priority: Mapping[str, int],
    fork_time: datetime,
    now: datetime,
) -> Resolution:
    s_changed = changed_after_fork(survivor, loser, fork_time)
    l_changed = changed_after_fork(loser, survivor, fork_time)
    same = survivor.row == loser.row
    collided = insert_collision(table, survivor, loser, fork_time)
    conflict = collided or (s_changed and l_changed and not same)
    flag = False
    if collided:
        # Two different rows, one key: any strategy would merge them or drop one. Re-keying the
        # loser's row automatically is not safe: rows in other tables (foreign keys, or ids the
        # application already handed out) may refer to either under that key, and only a human
        # can tell which. So the survivor's row, the one the application has used since the
        # failover, stays, and the loser's is flagged: the audit keeps both versions to re-key.
        winner, result, flag, reason = survivor, survivor.row, True, collision(survivor.region, loser.region)
    elif table.strategy == "immutable-append-only":
        winner, result, flag, reason = _append_only(survivor, loser, s_changed, l_changed, same)
        if conflict and (deleter := deleter_of(survivor, loser)) is not None:
            updater = loser if deleter is survivor else survivor
            reason = deleted_and_updated(deleter.region, updater.region, APPEND_DELETED)
    elif s_changed != l_changed:
        # Only one side moved: its change stands, whatever the strategy.
        winner = survivor if s_changed else loser
        result, reason = winner.row, only_changed(winner.region)
    elif same:
        winner = order(survivor, loser, region_priority)[0]
        result, reason = survivor.row, SAME_VERSION
    else:
        # Both changed (a conflict), or neither did yet they differ (inputs that disagree about
        # the fork): the strategy decides either way.
        winner, result, rule = _by_strategy(table, survivor, loser, region_priority, now)
        reason = situation(conflict, rule)
        if conflict and (deleter := deleter_of(survivor, loser)) is not None:
            updater = loser if deleter is survivor else survivor
            reason = deleted_and_updated(deleter.region, updater.region, rule)
    return Resolution(
        key=tuple(key),
        action=_action(flag, survivor, loser, result),
        result=result,
        winner_region=winner.region,
        conflict=conflict,
        reason=reason,
    )


def resolve_all(
    table: TableConflictConfig,
    items: Iterable[tuple[Key, Version, Version]],
    region_priority: Mapping[str, int],
    fork_time: datetime,
    now: datetime,
) -> list[Resolution]:
    """Resolve (key, survivor, loser) triples; the output is sorted by key whatever the input order."""
    seen: set[Key] = set()
    out = []
    for key, survivor, loser in sorted(items, key=lambda item: item[0]):
        if key in seen:
            raise ValueError(f"key {key!r} given twice")
        seen.add(key)
        out.append(resolve(table, key, survivor, loser, region_priority, fork_time, now))
    return out


def resolve_changes(
    table: TableConflictConfig,
    survivor_rows: Mapping[Key, Mapping[str, Any]],
    loser_rows: Iterable[Mapping[str, Any]],
    deleted_keys: Iterable[Key],
    loser_region: str,
    survivor_region: str,
    region_priority: Mapping[str, int],
    fork_time: datetime,
    now: datetime,
    survivor_written: Collection[Key] = (),
) -> list[Resolution]:
    """The loser's changed rows and deleted keys against the survivor's current rows: what
    ``apply.apply_resolutions`` computes in SQL, here in memory. ``survivor_written``: the keys
    whose survivor row a post-fork transaction wrote (in SQL: its xmin, ``survivor_xid_from``)."""
    items: list[tuple[Key, Version, Version]] = []
    written = {tuple(k) for k in survivor_written}
    for row in loser_rows:
        key = key_of(row, table)
        items.append((key, version_of(survivor_region, survivor_rows.get(key), table, key in written),
                      version_of(loser_region, row, table)))
    for key in deleted_keys:
        key = tuple(key)
        items.append((key, version_of(survivor_region, survivor_rows.get(key), table, key in written),
                      deletion(loser_region)))
    return resolve_all(table, items, region_priority, fork_time, now)


def apply_to(rows: Mapping[Key, dict[str, Any]], resolutions: Iterable[Resolution]) -> dict[Key, dict[str, Any]]:
    """The survivor's table after the resolutions (a copy; the input is left alone)."""
    out = dict(rows)
    for r in resolutions:
        if r.result is None:
            out.pop(r.key, None)
        else:
            out[r.key] = r.result
    return out
