"""A Sentinel that was down while the Redis master moved comes back naming the old master:
status says so, and healing the region or failing back re-points every Sentinel.

Runs on the session lab from whatever topology the tests before left, and leaves the Redis
master where it found it (in the PostgreSQL primary's region).
"""

from __future__ import annotations

import uuid

from activities.redis.failback import preserve_and_rejoin
from activities.redis.failover import repoint_sentinels, sentinel_quorum, switchover
from activities.redis.status import redis_status
from eagle_dr.status import gather
from tests.lab_helpers import _primary


def _addr(cfg) -> str:
    return f"{cfg.host}:{cfg.port}"


def _redis_move(old, new) -> None:
    """Move the master as the switchover runbook's Redis step does, Sentinel re-point included."""
    switchover(old, new)
    repoint_sentinels(new, new)


async def test_stale_sentinel_is_flagged_then_repointed_on_heal_and_on_failback(lab):
    p = _primary(lab)
    o = lab.cfg.other(p).name
    rp, ro = lab.cfg.region(p).redis, lab.cfg.region(o).redis
    assert redis_status(rp).role == "master"
    place, stale = next(((pl, s) for pl, s in lab.sentinels() if pl == o), lab.sentinels()[0])
    stale_addr = f"{stale.host}:{stale.port}"
    others = sorted(str(ep) for ep in rp.sentinels if str(ep) != stale_addr)
    try:
        assert stale.kill()
        _redis_move(rp, ro)  # the master moves while that Sentinel is down
        stale.start()
        # It came back with its old view: two name the new master, one the old.
        st = await gather(lab.cfg)
        assert {m: sorted(w) for m, w in st.sentinels_disagree.items()} == {_addr(ro): others, _addr(rp): [stale_addr]}
        lab.heal_region(place)  # the re-point path when a region heals
        q = sentinel_quorum(rp)
        assert q.masters == {str(ep): _addr(ro) for ep in rp.sentinels} and not q.unreachable, q
        assert (await gather(lab.cfg)).sentinels_disagree == {}

        # Again on the way back, with failback's Redis rejoin as the re-point path.
        assert stale.kill()
        _redis_move(ro, rp)
        stale.start()
        assert sentinel_quorum(rp).masters[stale_addr] == _addr(ro)
        assert (await gather(lab.cfg)).sentinels_disagree
        res = preserve_and_rejoin(ro, rp, lab.cfg.region(o).s3, f"test/{uuid.uuid4()}.rdb", lab.cfg.redis_reconcile)
        assert res.rejoined and res.sentinels_stale == {} and res.sentinels_unreachable == [], res
        q = sentinel_quorum(rp)
        assert q.masters == {str(ep): _addr(rp) for ep in rp.sentinels}, q
        assert (await gather(lab.cfg)).sentinels_disagree == {}
    finally:
        stale.start()
        if redis_status(rp).role != "master":
            _redis_move(ro, rp)
        lab.repoint_sentinels()
    assert redis_status(rp).role == "master" and redis_status(ro).role == "slave"
