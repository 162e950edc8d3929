"""The spool's files on the worker: where they go, and that none outlives its reconcile."""

from __future__ import annotations

import os
import time

import pytest

from activities.postgres.row_spool import LEFT_BEHIND_S, SpoolDir


def test_a_spool_dir_removes_its_runs_leftovers_and_old_ones_and_itself(tmp_path):
    """An attempt retried on the same worker after a crash removes what its predecessor left;
    any run's spool older than a day (a worker killed, its retry elsewhere) goes too, holding
    rows in the clear; another run's recent spool (a reconcile running now) stays."""
    mine = tmp_path / "eagle-dr-loser-run-a-x1"
    theirs = tmp_path / "eagle-dr-loser-run-b-x2"
    forgotten = tmp_path / "eagle-dr-loser-run-c-x3"
    unrelated = tmp_path / "something-else"
    for d in (mine, theirs, forgotten, unrelated):
        d.mkdir()
        (d / "0.rows").write_text("{}\tf\t\\N\n")
    old = time.time() - LEFT_BEHIND_S - 60
    os.utime(forgotten, (old, old))
    os.utime(unrelated, (old, old))
    with pytest.raises(RuntimeError, match="apply failed"):
        with SpoolDir("run-a", root=tmp_path) as spool:
            assert spool.parent == tmp_path and spool.name.startswith("eagle-dr-loser-run-a-")
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted([spool.name, theirs.name, unrelated.name])
            (spool / "0.rows").write_text("rows")
            raise RuntimeError("apply failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, unrelated.name])


def test_a_spool_on_a_full_disk_fails_and_is_never_read_as_whole(tmp_path):
    """The kernel's own "no space left" (/dev/full): the spool's close says so, and a read of
    what it holds is refused rather than applied short of its last rows."""
    import errno

    from activities.postgres.row_spool import RowSpool

    (tmp_path / "0.rows").symlink_to("/dev/full")
    spool = RowSpool(tmp_path / "0.rows", "updated_at")
    spool.add('{"id": 1, "updated_at": "2026-01-01T00:00:00+00:00"}', None, None)
    with pytest.raises(OSError) as e:
        spool.close()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="not written in full"):
        list(spool)
