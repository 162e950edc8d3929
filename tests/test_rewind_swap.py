"""The re-clone's swap on a real filesystem: a worker killed anywhere in it leaves a directory
the retry completes, and never one where both copies are gone."""

from __future__ import annotations

from pathlib import Path

from activities.postgres.rewind import _aside_dir, _clone_dir, _finish_interrupted_swap, _swap_in


def _dir(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "PG_VERSION").write_text(content)
    return path


def test_swap_replaces_the_directory_only_with_the_finished_clone(tmp_path):
    data = _dir(tmp_path / "pgdata", "old")
    _swap_in(_dir(_clone_dir(data), "new"), data)
    assert (data / "PG_VERSION").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata"]


def test_a_swap_killed_between_its_renames_is_finished_by_the_retry(tmp_path):
    data = tmp_path / "pgdata"
    _dir(_aside_dir(data), "old")  # the old directory moved aside: the clone had succeeded
    _dir(_clone_dir(data), "new")
    _finish_interrupted_swap(data)
    assert (data / "PG_VERSION").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata"]


def test_a_swap_killed_before_its_cleanup_keeps_the_new_directory(tmp_path):
    data = _dir(tmp_path / "pgdata", "new")
    _dir(_aside_dir(data), "old")
    _finish_interrupted_swap(data)
    assert (data / "PG_VERSION").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata"]


def test_a_clone_killed_mid_copy_never_replaces_the_directory(tmp_path):
    data = _dir(tmp_path / "pgdata", "old")
    (_clone_dir(data)).mkdir()  # pg_basebackup killed half-way: no swap began
    _finish_interrupted_swap(data)
    assert (data / "PG_VERSION").read_text() == "old"
