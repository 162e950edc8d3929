"""What a check found: per table, exact differing keys (a capped sample plus exact counts).

Keys are the primary key's values as text, in key-column order (``["42"]``, or
``["eu", "7"]`` for a composite key): what DataSyncWorkflow needs to re-copy each row. The
differences are B relative to A (A is the primary when one side is): ``inserted`` only on B,
``deleted`` only on A, ``updated`` on both with different contents.
"""

from __future__ import annotations

from pydantic import BaseModel


class KeyDiff(BaseModel):
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    inserted_keys: list[list[str]] = []
    updated_keys: list[list[str]] = []
    deleted_keys: list[list[str]] = []

    @property
    def total(self) -> int:
        return self.inserted + self.updated + self.deleted

    def add(self, kind: str, keys: list[list[str]], cap: int) -> None:
        setattr(self, kind, getattr(self, kind) + len(keys))
        sample: list = getattr(self, f"{kind}_keys")
        sample.extend(keys[:max(0, cap - len(sample))])

    def add_differing(self, keys: list[tuple], a: dict, b: dict, cap: int) -> None:
        """``keys`` that differ, each counted by where it is: only in ``b`` inserted, on both
        updated, only in ``a`` deleted (``a``, ``b``: key -> digest, each side's read)."""
        for kind, ks in (("inserted", [k for k in keys if k not in a]),
                         ("updated", [k for k in keys if k in a and k in b]),
                         ("deleted", [k for k in keys if k not in b])):
            if ks:
                self.add(kind, [list(k) for k in ks], cap)

    def merge(self, other: "KeyDiff", cap: int) -> None:
        for kind in ("inserted", "updated", "deleted"):
            setattr(self, kind, getattr(self, kind) + getattr(other, kind))
            sample: list = getattr(self, f"{kind}_keys")
            sample.extend(getattr(other, f"{kind}_keys")[:max(0, cap - len(sample))])


class TableResult(BaseModel):
    table: str
    key: list[str]
    row_hash: str = "hash"  # "hash", or "hash+text" (some columns by their text form): rowhash.py
    ranges: int = 0  # the table's top-level ranges
    ranges_checked: int = 0  # every range hashed, bisected ones included
    rows_a: int = 0
    rows_b: int = 0
    diff: KeyDiff = KeyDiff()
    # Keys that differed but were still changing on the primary at the re-check: rows in
    # flight, never reported as differences.
    in_flight: int = 0
    throttled_seconds: float = 0.0
    throttling: bool = False  # in a heartbeat: paused for replica lag right now
    seconds: float = 0.0
    resumed_ranges: int = 0  # top-level ranges a retry took from the heartbeat, not re-hashed

    @property
    def differences(self) -> int:
        return self.diff.total


class RedisDbCount(BaseModel):
    db: int
    keys_a: int
    keys_b: int


class RedisResult(BaseModel):
    a: str
    b: str
    counts: list[RedisDbCount] = []
    offset_a: int | None = None
    offset_b: int | None = None
    sampled: int = 0
    missing: list[str] = []  # sampled keys on A absent on B (capped)
    changed: list[str] = []  # sampled keys whose DUMP differs (capped)
    missing_count: int = 0
    changed_count: int = 0
    in_flight: int = 0
    notes: list[str] = []

    @property
    def differences(self) -> int:
        return self.missing_count + self.changed_count + sum(1 for c in self.counts if c.keys_a != c.keys_b)
