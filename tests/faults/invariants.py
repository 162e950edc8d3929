"""The invariants a runbook must keep whatever fault hits it, checked against the real servers.

Each check answers with a ``Check``: held or not, and the evidence. Roles are never taken
from what a server says about itself (pg_is_in_recovery, INFO's role): a write is attempted,
exactly as a client would, because a fence that a client can get around is no fence.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from activities.postgres.status import connect as admin_connect
from activities.redis.status import client as redis_client
from activities.routing import LabRouter

INVARIANTS = ("one writable pg", "one unfenced redis master", "routing = primary", "acked writes kept",
              "one audit row per key", "monitor: no false failover",
              "cancel answered")


@dataclass
class Check:
    held: bool | None  # None: not applicable to this run
    evidence: str
    # Violated, but the run's own report says so (degraded, naming the part and its repair):
    # the runbooks' contract after the point of no return. Shown, not failed.
    reported: bool = False

    @property
    def cell(self) -> str:
        if self.held is None:
            return "n/a"
        return "held" if self.held else "VIOLATED (reported)" if self.reported else "VIOLATED"


def pg_takes_writes(lab, region: str) -> tuple[bool, str]:
    """A client's write: the application's own DSN, no fence override, ``BEGIN READ WRITE``
    (which gets around default_transaction_read_only), then a real write, rolled back.

    The write goes to a temporary table: on a node that wrongly takes it, it must not add a
    row to an application table that failback would later have to account for."""
    pg = lab.cfg.region(region).postgres
    try:
        with psycopg.connect(pg.dsn(), connect_timeout=3, autocommit=False,
                             options="-c statement_timeout=3000") as conn:
            conn.execute("begin read write")
            conn.execute("create temp table eagle_dr_fault_probe (x int) on commit drop")
            conn.execute("insert into eagle_dr_fault_probe values (1)")
            conn.rollback()
        return True, "write accepted"
    except psycopg.Error as e:
        return False, (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def redis_takes_writes(lab, region: str) -> tuple[bool, str]:
    """A client's SET: a fenced master answers NOREPLICAS, a replica READONLY."""
    try:
        c = redis_client(lab.cfg.region(region).redis, 3)
        c.set("eagle-dr:fault-probe", region, px=2000)
        return True, "SET accepted"
    except (redis.RedisError, OSError) as e:
        return False, str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def writable_postgres(lab) -> tuple[list[str], dict[str, str]]:
    seen = {r.name: pg_takes_writes(lab, r.name) for r in lab.cfg.regions}
    return [r for r, (ok, _) in seen.items() if ok], {r: why for r, (_, why) in seen.items()}


def check_one_writable_pg(lab) -> tuple[Check, list[str]]:
    writable, why = writable_postgres(lab)
    return Check(len(writable) <= 1, "; ".join(f"{r}: {w}" for r, w in why.items())), writable


def check_one_redis_master(lab) -> Check:
    seen = {r.name: redis_takes_writes(lab, r.name) for r in lab.cfg.regions}
    writable = [r for r, (ok, _) in seen.items() if ok]
    return Check(len(writable) <= 1, "; ".join(f"{r}: {w}" for r, (_, w) in seen.items()))


def check_routing(lab, writable: list[str]) -> Check:
    """Traffic goes to the one region that takes writes (none taking writes: it goes nowhere)."""
    active = LabRouter(lab.state).active_region()
    if len(writable) != 1:
        return Check(False, f"routing names {active}; writable primaries: {writable or 'none'}")
    return Check(active == writable[0], f"routing names {active}; primary {writable[0]}")


def check_acked_writes(lab, writer, primary: str | None, rpo) -> Check:
    """Every write the client was told had committed is on the primary, or the run's report
    counts at least that many lost commits, or says the loss is unknown (never 0 or "met")."""
    acked = writer.acked_ids()
    if not acked:
        return Check(None, "no write acknowledged")
    if primary is None:
        return Check(False, f"{len(acked)} acknowledged writes and no writable primary to hold them")
    with admin_connect(lab.cfg.region(primary).postgres, 5) as conn:
        missing = [r[0] for r in conn.execute(
            "select a.id from unnest(%s::bigint[]) as a(id) left join alerts using (id) where alerts.id is null "
            "order by a.id", (acked,)).fetchall()]
    if not missing:
        return Check(True, f"{len(acked)} acknowledged, all on {primary}")
    where = getattr(writer, "where", lambda ids: "")(missing)
    lost = getattr(rpo, "lost_commits", None) if rpo is not None else None
    unknown = rpo is not None and lost is None and rpo.met is not True
    counted = unknown or (lost is not None and lost >= len(missing))
    what = "no RPO reported" if rpo is None else \
        f"RPO lost_commits={lost}, lost_wal_bytes={rpo.lost_wal_bytes}, met={rpo.met}"
    return Check(counted, f"{len(missing)} of {len(acked)} acknowledged missing on {primary} "
                          f"(e.g. {missing[:5]}{where}); {what}")


def check_cancel_answered(outcome: str, steps_after_cancel: int | None = None) -> Check:
    """A cancel request ends the run cancelled (before the point of no return) or is refused
    and the report says so (after it); a run that just carries on was never told.

    ``steps_after_cancel``: activities the run scheduled after the cancel request reached the
    server (from its history; None: the history has no such request). 0 or None means the
    request landed as or after the run finished its last step: there was nothing left to
    cancel or refuse, and the run's report of the finished move is the true answer."""
    ok = outcome == "cancelled" or "(cancel refused)" in outcome
    if ok:
        return Check(True, f"run {outcome}")
    if steps_after_cancel == 0:
        return Check(True, f"run {outcome}: the cancel request reached the server after the run's last step")
    if steps_after_cancel is None:
        # No cancel request in the run's history: the server took it after the run had closed
        # (the step was too quick to catch), so there was nothing left to cancel.
        return Check(True, f"run {outcome}: it had ended before the cancel request reached it")
    return Check(False, f"run {outcome}: the cancel request was neither honoured nor refused"
                        + (f" ({steps_after_cancel} steps ran after it)" if steps_after_cancel else ""))


def check_audit(lab, primary: str | None, run_ids: list[str]) -> Check:
    """One eagle_dr.conflict_audit row per decided key, however often a step was retried."""
    if primary is None:
        return Check(False, "no writable primary to read the audit from")
    with admin_connect(lab.cfg.region(primary).postgres, 5) as conn:
        if conn.execute("select to_regclass('eagle_dr.conflict_audit')").fetchone()[0] is None:
            return Check(True, "no audit table (nothing was decided)")
        rows = conn.execute(
            "select run_id, table_name, primary_key::text, count(*) from eagle_dr.conflict_audit "
            "where run_id = any(%s) group by 1, 2, 3", (run_ids,)).fetchall()
    dupes = [(t, k, n) for _, t, k, n in rows if n > 1]
    return Check(not dupes, f"{len(rows)} decided keys" + (f"; DUPLICATES {dupes[:5]}" if dupes else ", one row each"))
