"""The lab trusts a pid file only for the process that wrote it or was written for it."""

from __future__ import annotations

import os
import subprocess
import time

from lab.processes import kill_tree, read_pid


def test_a_pid_file_older_than_the_process_it_names_is_stale(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "server.pid"
        pidfile.write_text(f"{proc.pid}\n")
        assert read_pid(pidfile) == proc.pid

        # As after a reboot or a dead server: the file was last written long before the
        # process that now has its pid started, so that process is someone else's.
        old = time.time() - 600
        os.utime(pidfile, (old, old))
        assert read_pid(pidfile) is None
        assert kill_tree(read_pid(pidfile)) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_file_of_a_server_that_rewrote_it_later_still_counts(tmp_path):
    # postmaster.pid is rewritten while the server runs; only a later start is stale.
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "postmaster.pid"
        pidfile.write_text(f"{proc.pid}\n/data\n")
        later = time.time() + 30
        os.utime(pidfile, (later, later))
        assert read_pid(pidfile) == proc.pid
        assert read_pid(tmp_path / "missing.pid") is None
    finally:
        proc.kill()
        proc.wait()
