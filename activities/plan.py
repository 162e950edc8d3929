"""What a runbook's plan (``--plan``) reads beyond the runbooks' own preflight activities:
where routing points now, and what a rejoin (failback, the loser of a split brain) would find.

Both only read. Nothing here stops, starts, fences, writes a file or takes a lock: a plan
must leave every system as it found it (tests/test_plan.py checks that it does).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from temporalio import activity

from activities.postgres.ctl import FENCE_MARKER, PgCtl
from activities.postgres.divergence import _switchpoint
from activities.postgres.lsn import lsn_diff
from activities.postgres.status import CURRENT_TIMELINE, connect
from activities.postgres.wal import DEFAULT_TABLESPACE, WalUnreadable, current_timeline, scan
from activities.routing import LabRouter
from eagle_dr.config import EagleConfig, scrub


# A table's schema-qualified name, and whether it is the system's (below FirstNormalObjectId).
_QUALIFIED = ("select format('%%I.%%I', n.nspname, t.relname), t.oid < 16384 from pg_class t "
              "join pg_namespace n on n.oid = t.relnamespace ")


class RoutingView(BaseModel):
    """Each configured routing mechanism and the region (or, for DNS, the value) it names now."""

    mechanisms: dict[str, str | None] = {}
    unreachable: list[str] = []


class RejoinPlanRequest(BaseModel):
    region: str  # the node that would be rewound (failback's old primary, a split brain's loser)
    primary_region: str  # the node it would follow


class RejoinView(BaseModel):
    """What rewinding ``region`` onto ``primary_region`` would meet, read without touching it."""

    running: bool
    role: str | None = None  # "primary" | "standby" | None (stopped)
    fenced: bool = False  # a stop fence's marker is in its data directory
    timeline: int | None = None
    primary_timeline: int | None = None
    fork_lsn: str | None = None
    # pg_rewind needs wal_log_hints or data checksums on the node it rewinds.
    wal_log_hints: bool | None = None
    data_checksums: bool | None = None
    # Post-fork WAL on the node (pg_waldump reads the files; the server is not asked).
    lost_commits: int | None = None
    lost_bytes: int | None = None
    changed_relation_files: int | None = None
    # Rows the post-fork WAL wrote, per table and kind ("public.alerts": {"insert": 120, ...}),
    # heap records counted (a MULTI_INSERT's tuples each; TOAST counted under its table).
    # Named from the catalog of ``names_from`` (the node itself when it answers, else the
    # primary: the same file numbers for tables both held at the fork).
    changed_tables: dict[str, dict[str, int]] = {}
    unnamed_files: int = 0  # changed files neither catalog names (a table made after the fork)
    catalog_files: int = 0  # system catalogs' files (DDL, statistics): no application rows
    names_from: str | None = None
    notes: list[str] = []

    @property
    def rewind_possible(self) -> bool | None:
        if self.wal_log_hints is None and self.data_checksums is None:
            return None
        return bool(self.wal_log_hints or self.data_checksums)


class PlanActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def read_routing(self) -> RoutingView:
        """Where each mechanism route_traffic moves points now (control worker: APIs only)."""
        view = RoutingView()
        if self.cfg.routing.lab_file:
            view.mechanisms["lab"] = LabRouter(self.cfg.lab.state_dir).active_region()
        if self.cfg.routing.kubernetes:
            from activities.kubernetes import KubernetesCluster

            for r in self.cfg.regions:
                try:
                    with KubernetesCluster(r.kubernetes) as k8s:
                        view.mechanisms[f"configmap@{r.name}"] = k8s.get_active_region()
                except Exception:  # noqa: BLE001 - a cluster down with its region is reported, not fatal
                    view.unreachable.append(f"{r.name}/kubernetes")
        if self.cfg.routing.dns:
            from activities.dns import Route53Failover

            target = next((r for r in self.cfg.regions if r.dns), None)
            if target is not None:
                try:
                    cur = Route53Failover(self.cfg.routing.dns_endpoint_url, target.dns.zone).current(target.dns.record)
                    value = (cur.get("primary") or {}).get("value")
                    # The value names a region's endpoint: say which region it is.
                    owner = next((r.name for r in self.cfg.regions if r.dns and r.dns.value == value), value)
                    view.mechanisms[f"dns {target.dns.record}"] = owner
                except Exception as e:  # noqa: BLE001
                    view.unreachable.append(f"dns ({scrub(str(e))[:120]})")
        return view

    @staticmethod
    def _name_tables(view: RejoinView, changes: dict, created: set, *catalogs) -> None:
        """Per-table row counts for the plan. Read-only lookups of file numbers
        (``pg_filenode_relation``) in the first catalog that answers: the node's own, or the
        primary's for files both held at the fork. A file in another database, one the node
        created after the fork (the primary may have given its number to another relation), or
        one no catalog names, is counted as unnamed (never guessed)."""
        for i, where in enumerate(catalogs):
            if where is None:
                continue
            region, pg = where
            own = i == 0
            try:
                with connect(pg) as conn:
                    db = conn.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
                    tables: dict[str, dict[str, int]] = {}
                    unnamed = catalog = 0
                    for (spc, dbid, node), rc in changes.items():
                        name = None
                        if rc.truncated_oid is not None:
                            name = conn.execute(_QUALIFIED + "where t.oid = %s", (rc.truncated_oid,)).fetchone()
                        elif dbid == db and (own or (spc, dbid, node) not in created):
                            # TOAST rows are their table's; 0 is the database's default tablespace.
                            name = conn.execute(
                                _QUALIFIED + "where t.oid = (select coalesce(o.oid, r.oid) from pg_class r "
                                "left join pg_class o on o.reltoastrelid = r.oid "
                                "where r.oid = pg_filenode_relation(%s, %s))",
                                (0 if spc == DEFAULT_TABLESPACE else spc, node)).fetchone()
                        if name is None:
                            unnamed += 1
                            continue
                        if name[1]:
                            catalog += 1  # the system's own (DDL, statistics): no rows to reconcile
                            continue
                        have = tables.setdefault(name[0], {})
                        for kind, n in rc.ops.items():
                            have[kind] = have.get(kind, 0) + n
            except Exception as e:  # noqa: BLE001 - counts are a courtesy of the plan; say why they are missing
                view.notes.append(f"the changed tables could not be named on {region}: {scrub(str(e))[:160]}")
                continue
            view.changed_tables, view.unnamed_files, view.names_from = tables, unnamed, region
            view.catalog_files = catalog
            return

    @activity.defn
    def inspect_rejoin(self, req: RejoinPlanRequest) -> RejoinView:
        """On the rejoining node's worker (its data directory and pg_wal are local there)."""
        node, primary = self.cfg.region(req.region).postgres, self.cfg.region(req.primary_region).postgres
        ctl = PgCtl(node)
        view = RejoinView(running=ctl.running(), fenced=(Path(ctl.data_dir) / FENCE_MARKER).exists())
        if view.running:
            try:
                with connect(node) as conn:
                    in_recovery, hints, sums = conn.execute(
                        "select pg_is_in_recovery(), current_setting('wal_log_hints') = 'on', "
                        "current_setting('data_checksums') = 'on'").fetchone()
                    view.role = "standby" if in_recovery else "primary"
                    view.wal_log_hints, view.data_checksums = hints, sums
                    if not in_recovery:
                        view.timeline = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
            except Exception as e:  # noqa: BLE001 - running but not answering: read its files instead
                view.notes.append(f"{req.region}'s PostgreSQL runs but did not answer: {scrub(str(e))[:160]}")
        try:
            # pg_controldata reads the control file; a running server's may lag a promotion, so the
            # newest WAL segment's timeline decides (as failback's own fork_between does).
            data = ctl.controldata()
            if view.wal_log_hints is None:
                view.wal_log_hints = data.get("wal_log_hints setting") == "on"
                view.data_checksums = (data.get("Data page checksum version", "0") or "0") != "0"
            if view.timeline is None:
                view.timeline = current_timeline(ctl)
        except Exception as e:  # noqa: BLE001
            view.notes.append(f"{req.region}'s control file could not be read: {scrub(str(e))[:160]}")
        history = None
        try:
            with connect(primary) as conn:
                view.primary_timeline = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
                if view.timeline is not None and view.primary_timeline > view.timeline:
                    history = conn.execute("select pg_read_file(%s)",
                                           (f"pg_wal/{view.primary_timeline:08X}.history",)).fetchone()[0]
        except Exception as e:  # noqa: BLE001
            view.notes.append(f"{req.primary_region}'s PostgreSQL could not be read: {scrub(str(e))[:160]}")
        if view.timeline is None or view.primary_timeline is None:
            return view
        if view.timeline == view.primary_timeline:
            view.notes.append(f"both nodes are on timeline {view.timeline}: no fork to measure")
            return view
        if history is None:
            path = Path(node.data_dir) / "pg_wal" / f"{view.timeline:08X}.history"
            history = path.read_text() if path.exists() else ""
        view.fork_lsn = _switchpoint(history, min(view.timeline, view.primary_timeline))
        if view.fork_lsn is None:
            view.notes.append(f"timelines {view.timeline} and {view.primary_timeline} share no history: re-clone")
            return view
        try:
            found = scan(ctl, str(Path(node.data_dir) / "pg_wal"), view.timeline, view.fork_lsn)
            view.lost_commits, view.changed_relation_files = len(found.commits), len(found.changes)
            view.lost_bytes = lsn_diff(found.end_lsn, view.fork_lsn)
            self._name_tables(view, found.changes, found.created_files,
                              (req.region, node) if view.running else None, (req.primary_region, primary))
            if view.role == "primary":
                view.notes.append(f"{req.region} still takes writes: the counts grow until the runbook stops it")
        except WalUnreadable as e:
            view.notes.append(f"its WAL after the fork cannot be read now ({str(e)[:200]}): the runbook would stop "
                              "there, keeping the node's data")
        return view
