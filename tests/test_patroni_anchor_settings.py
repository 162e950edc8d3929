"""The Patroni anchor's settings rules and search order (bench/patroni_anchor.py).

No cluster here: these are the rules that decide which settings the benchmark may give
Patroni; the SIGSTOP check itself runs in ``python -m bench.patroni_anchor``."""

import pytest

from bench.patroni_anchor import (
    DEFAULT_SETTINGS, MODERN_MINIMUMS, DcsSettings, ProbeWriter, _dominated, dcs_settings, legal_settings,
)


def test_the_rule_is_enforced_naming_ttl():
    # the anchor's former settings: 2 + 2*5 = 12 > 10
    with pytest.raises(ValueError, match=r"ttl 10 breaks .*loop_wait \+ 2\*retry_timeout <= ttl"):
        dcs_settings(ttl=10, loop_wait=2, retry_timeout=5)
    assert dcs_settings(ttl=12, loop_wait=2, retry_timeout=5) == DcsSettings(12, 2, 5)


@pytest.mark.parametrize("field, kwargs", [
    ("loop_wait", {"ttl": 10, "loop_wait": 0, "retry_timeout": 2}),
    ("retry_timeout", {"ttl": 10, "loop_wait": 1, "retry_timeout": 1}),
    ("ttl", {"ttl": 4.5, "loop_wait": 1, "retry_timeout": 1}),
    ("loop_wait", {"ttl": 10, "loop_wait": True, "retry_timeout": 2}),
])
def test_patroni_minimums_and_whole_seconds(field, kwargs):
    with pytest.raises(ValueError, match=field):
        dcs_settings(**kwargs)


def test_modern_minimums_are_available():
    with pytest.raises(ValueError, match="ttl 5 is below the minimum 20"):
        dcs_settings(5, 1, 2, MODERN_MINIMUMS)
    assert legal_settings(30, MODERN_MINIMUMS)[0] == DcsSettings(20, 1, 3)


def test_candidates_fastest_first_and_all_legal():
    cands = legal_settings(max_ttl=12)
    assert cands[0] == DcsSettings(ttl=5, loop_wait=1, retry_timeout=2)
    assert [c.ttl for c in cands] == sorted(c.ttl for c in cands)
    for c in cands:
        assert c.loop_wait + 2 * c.retry_timeout <= c.ttl
        assert c.loop_wait >= 1 and c.retry_timeout >= 2
    # within one ttl, loop_wait 1 first
    assert [c for c in cands if c.ttl == 7][0] == DcsSettings(7, 1, 2)
    assert DEFAULT_SETTINGS in cands


def test_a_longer_loop_wait_is_skipped_after_the_shorter_failed():
    failed = [DcsSettings(7, 1, 2)]
    assert _dominated(DcsSettings(7, 3, 2), failed)
    assert not _dominated(DcsSettings(7, 1, 3), failed)  # another retry_timeout: still tried
    assert not _dominated(DcsSettings(8, 1, 2), failed)


def test_longest_gap_spans_the_start_and_the_end():
    w = ProbeWriter((1, 2))
    w.acks.extend([(9.0, 1, 1), (9.9, 1, 2), (13.5, 2, 3), (13.55, 2, 4)])
    assert w.longest_gap(10.0, 14.0) == pytest.approx(3.6)  # 9.9 -> 13.5
    assert w.longest_gap(10.0, 20.0) == pytest.approx(6.45)  # 13.55 -> end, nothing since
