"""The lab trusts a pid file only for the process it was written for."""

from __future__ import annotations

import os
import subprocess
import time

from lab.processes import kill_tree, read_pid, spawn


def test_spawn_records_the_start_and_a_reused_pid_is_not_trusted(tmp_path):
    pidfile, log = tmp_path / "server.pid", tmp_path / "server.log"
    pid = spawn(["sleep", "60"], pidfile=pidfile, logfile=log)
    try:
        assert read_pid(pidfile) == pid
        # Whatever the file's time says (a clock step, a copied state): the start it records decides.
        old = time.time() - 3600
        os.utime(pidfile, (old, old))
        assert read_pid(pidfile) == pid
        # The same pid with another start time is another process: a stale file.
        lines = pidfile.read_text().splitlines()
        pidfile.write_text(f"{lines[0]}\nstart={int(lines[1].split('=')[1]) + 1}\n")
        assert read_pid(pidfile) is None
        assert kill_tree(read_pid(pidfile)) == []
        assert os.path.exists(f"/proc/{pid}")
    finally:
        os.kill(pid, 9)


def test_a_server_written_pid_file_names_only_a_process_working_in_its_directory(tmp_path):
    """Redis, Sentinel and PostgreSQL write their pid files themselves (the pid alone) and work
    in the directory that holds it. Another lab's Redis that got a dead server's pid (pid_max
    is 32768 here: it happens within a minute) works in its own directory: its pid in our
    stale file must not be ours to kill, however fresh the file."""
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours = subprocess.Popen(["sleep", "60"], cwd=ours_dir)
    theirs = subprocess.Popen(["sleep", "60"], cwd=theirs_dir)
    try:
        pidfile = ours_dir / "redis.pid"  # as Redis writes it: the pid alone
        pidfile.write_text(f"{ours.pid}\n")
        assert read_pid(pidfile) == ours.pid
        # Its own, whatever the file's time says (a clock step on a fresh VM).
        old = time.time() - 600
        os.utime(pidfile, (old, old))
        assert read_pid(pidfile) == ours.pid
        # A stale file, just written, naming a process that works elsewhere: not ours.
        pidfile.write_text(f"{theirs.pid}\n")
        assert read_pid(pidfile) is None
        assert kill_tree(read_pid(pidfile)) == []
        assert theirs.poll() is None
        assert read_pid(tmp_path / "missing.pid") is None
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()
