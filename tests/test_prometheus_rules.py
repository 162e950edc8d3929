"""deploy/prometheus/rules.yml: valid for promtool, and its unit tests (rules_test.yml) pass:
a region dark for most vantage points pages after its `for`, one partitioned worker does
not, lag past the failover guard pages. Needs Debian's `prometheus` package (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def _promtool(*args: str) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_rules_are_valid():
    assert "SUCCESS" in _promtool("check", "rules", "rules.yml")


def test_rules_fire_as_their_unit_tests_say():
    assert "SUCCESS" in _promtool("test", "rules", "rules_test.yml")
