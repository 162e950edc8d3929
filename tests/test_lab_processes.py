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


def test_a_server_written_pid_file_older_than_its_process_is_stale(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "redis.pid"  # as Redis writes it: the pid alone
        pidfile.write_text(f"{proc.pid}\n")
        assert read_pid(pidfile) == proc.pid
        # Last written long before the process that now has its pid started: someone else's.
        old = time.time() - 600
        os.utime(pidfile, (old, old))
        assert read_pid(pidfile) is None
        assert kill_tree(read_pid(pidfile)) == []
        assert proc.poll() is None
        # Rewritten while the server runs (postmaster.pid is): still its own.
        later = time.time() + 30
        os.utime(pidfile, (later, later))
        assert read_pid(pidfile) == proc.pid
        assert read_pid(tmp_path / "missing.pid") is None
    finally:
        proc.kill()
        proc.wait()
