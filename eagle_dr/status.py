"""``eagle-dr status``: the whole topology on one screen, like ``patronictl list``.

Probes every region directly from where the operator stands (not through the workers, so
it still works when the workers or Temporal are down) and asks every worker for real
whether it is alive (workflows/liveness.py says why pollers alone cannot tell).

The verdict (``health``) drives the exit code: 0 healthy; 1 degraded (split brain, no
writable primary, a database or worker down, a standby not streaming or lagging past the
guard, Sentinels disagreeing, a readiness check failing, fences or scale-downs left behind,
archiving degraded); 2 cannot assess (no region's PostgreSQL answered, or Temporal did not,
so workers and moves are unknown) when nothing is known to be degraded.

``status --json`` is this module's ``TopologyStatus``; its schema is stable (fields are only
ever added): ``service``, ``active_region``, ``health`` ({``state``: healthy | degraded |
unknown, ``exit_code``, ``reasons``: [str]}), ``regions`` ([{``name``, ``configured_role``,
``postgres``, ``redis``, ``redis_fenced``, ``services``, ``archive``}]), ``sentinels``,
``sentinels_disagree``, ``workers``, ``temporal_address``, ``temporal_ui``,
``temporal_ui_reachable``, ``move_running``, ``monitor``, ``readiness``, ``leftovers``,
``left_scaled_to_0``, ``lag_guard_bytes``. Its ``error`` fields keep the drivers' full text;
``health.reasons`` and the tables give the short form.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from pydantic import BaseModel, computed_field

from activities.backup.archive import ArchiverState, read_archiver, read_gaps
from activities.backup.pgbackrest import Stanza
from activities.postgres.status import PgStatus, pg_status
from activities.readiness import ReadinessReport, assess
from activities.redis.status import RedisStatus, SentinelView, fenced, redis_status, sentinel_view
from activities.routing import LabRouter
from eagle_dr.config import EagleConfig, SecretUnavailable, scrub
from eagle_dr.devserver import ui_reachable
from eagle_dr.monitor import MonitorView, monitor_view
from eagle_dr.temporal import move_running

# Pollers seen this recently are listed (for the operator's information only: whether a
# worker is alive is decided by the liveness probe). DescribeTaskQueue reports the root
# partition's pollers only: on a cluster with several partitions per queue a live worker
# can be missing from the list (the lab runs one partition).
POLLER_FRESH_SECONDS = 90
# How long a worker has to pick up the liveness probe: a live one takes milliseconds.
PICKUP_SECONDS = 3.0

# Client-library error text -> what a tired operator needs in a table cell. Matched in order.
_SHORT = (("temporal:", "Temporal unreachable"), ("connection refused", "connection refused"), ("timeout expired", "timeout"), ("timed out", "timeout"),
          ("password authentication failed", "authentication failed"), ("authentication", "authentication failed"),
          ("noauth", "authentication required"), ("wrongpass", "wrong password"),
          ("name or service not known", "unknown host"), ("no route to host", "no route to host"),
          ("network is unreachable", "network unreachable"), ("certificate", "TLS certificate rejected"),
          ("ssl", "TLS error"), ("does not exist", "does not exist"), ("not set", "secret not set"),
          ("no such file", "secret file missing"))


def short(error: str | None) -> str:
    """A cell-sized reason for ``error`` (the full text is in --json's detail fields and logs)."""
    if not error:
        return ""
    low = error.lower()
    for needle, what in _SHORT:
        if needle in low:
            return what
    line = error.strip().splitlines()[0]
    return line if len(line) <= 60 else line[:57] + "..."


class Health(BaseModel):
    state: str  # healthy | degraded | unknown
    exit_code: int
    reasons: list[str] = []


class WorkerView(BaseModel):
    task_queue: str
    region: str
    # A worker on this queue picked up a probe just now.
    polling: bool
    worker: str | None = None
    pollers: list[str] = []
    last_seen_seconds: float | None = None
    error: str | None = None


class ServicesView(BaseModel):
    """The region's microservices as its Kubernetes cluster reports them (routing.kubernetes)."""

    reachable: bool
    error: str | None = None
    # Deployment -> desired replicas (spec), for the configured selector.
    replicas: dict[str, int] = {}
    ready: dict[str, int] = {}
    # Deployment -> the replicas a fence remembered in the routing ConfigMap when it scaled it to 0.
    remembered: dict[str, int] = {}
    namespace: str | None = None
    config_map: str | None = None
    # active.region in this cluster's routing ConfigMap.
    active_region: str | None = None

    @property
    def at_zero(self) -> list[str]:
        return sorted(name for name, n in self.replicas.items() if n == 0)
class ArchiveView(BaseModel):
    """WAL archiving on a primary: pg_stat_archiver, the WAL waiting, and what the archive
    guard (activities/backup/archive.py) dropped. The dropped-repo and gap files are read
    where they live, so on another host than the node they show as unknown (None)."""

    archiver: ArchiverState
    dropped: list[str] | None = None
    # Buckets whose WAL has a gap not yet closed by a full backup.
    gaps: list[str] | None = None

    @computed_field
    @property
    def degraded(self) -> bool:
        return bool(self.archiver.failing or self.dropped or self.gaps)


def archive_view(cfg: EagleConfig, region: str) -> ArchiveView:
    dropped = gaps = None
    try:
        st = Stanza(cfg, region)
        if st.dir.exists():
            dropped = st.dropped()
            gaps = sorted({g.repo_region for g in read_gaps(st) if g.healed_by is None})
    except Exception:  # noqa: BLE001 - no pgBackRest config here: archiving shown from PostgreSQL alone
        pass
    return ArchiveView(archiver=read_archiver(cfg.region(region).postgres, 2), dropped=dropped, gaps=gaps)


class RegionView(BaseModel):
    name: str
    configured_role: str
    postgres: PgStatus
    redis: RedisStatus
    # A master that carries a runbook's fence (refuses writes / REPLICAOF).
    redis_fenced: bool = False
    # None when routing does not go through Kubernetes.
    services: ServicesView | None = None
    # On the primary: WAL archiving (None elsewhere).
    archive: ArchiveView | None = None


class TopologyStatus(BaseModel):
    service: str
    active_region: str | None
    regions: list[RegionView]
    sentinels: list[SentinelView]
    workers: list[WorkerView]
    temporal_address: str
    temporal_ui: str
    temporal_ui_reachable: bool
    # Whether a runbook holds dr-move-<service> now (None: Temporal could not say).
    move_running: bool | None = None
    # The always-on monitor (dr-monitor-<service>): running, paused or not running.
    monitor: MonitorView | None = None
    # The readiness checks (activities/readiness.py), run from here for the serving primary.
    readiness: ReadinessReport | None = None
    # The failover lag guard (health.max_lag_bytes): a standby further behind is degraded.
    lag_guard_bytes: int | None = None

    @computed_field
    @property
    def health(self) -> Health:
        """The verdict behind the exit code (module docstring)."""
        bad: list[str] = []
        unknown: list[str] = []
        answered = [r for r in self.regions if r.postgres.reachable]
        if not answered:
            unknown.append("no region's PostgreSQL answered: the topology cannot be assessed")
        if len(self.primaries) > 1:
            bad.append(f"split brain: writable primaries in {', '.join(self.primaries)}")
        elif answered and not self.primaries:
            bad.append("no writable PostgreSQL primary")
        for r in self.regions:
            if answered and not r.postgres.reachable:
                bad.append(f"{r.name} PostgreSQL down ({short(r.postgres.error)})")
            if not r.redis.reachable:
                # With no database answering at all, nothing is known, not degraded.
                (bad if answered else unknown).append(f"{r.name} Redis down ({short(r.redis.error)})")
            p = r.postgres
            if p.role == "standby" and p.receiver_status != "streaming" and len(self.primaries) == 1:
                bad.append(f"{r.name} standby not streaming ({p.receiver_status or 'no receiver'})")
            for link in p.replicas if p.role == "primary" else []:
                if self.lag_guard_bytes is not None and (link.lag_bytes or 0) > self.lag_guard_bytes:
                    bad.append(f"{link.application_name} lags {link.lag_bytes} bytes, past the guard "
                               f"({self.lag_guard_bytes})")
            if r.archive is not None and r.archive.degraded:
                bad.append(f"{r.name} WAL archiving degraded")
        if self.sentinels_disagree:
            bad.append("Sentinels disagree on the Redis master")
        temporal_down = any((w.error or "").startswith("temporal:") for w in self.workers)
        if temporal_down:
            unknown.append("Temporal did not answer: workers and running moves unknown")
        for w in self.workers:
            if not w.polling and not (w.error or "").startswith(("temporal:", "liveness probe:")):
                bad.append(f"worker down: {w.task_queue} ({w.region})")
        for c in (self.readiness.checks if self.readiness else []):
            if c.state == "fail":
                bad.append(f"readiness {c.key}: {c.reason}")
        bad += [f"left fenced: {x.split(';')[0]}" for x in self.leftovers]
        bad += [f"left scaled to 0: {x.split(' (')[0]}" for x in self.left_scaled_to_0]
        if bad:
            return Health(state="degraded", exit_code=1, reasons=bad + unknown)
        if unknown:
            return Health(state="unknown", exit_code=2, reasons=unknown)
        return Health(state="healthy", exit_code=0)

    @property
    def primaries(self) -> list[str]:
        """Writable primaries: a fenced (read-only) old primary is no second writer."""
        return [r.name for r in self.regions if r.postgres.role == "primary" and not r.postgres.read_only]

    @computed_field
    @property
    def sentinels_disagree(self) -> dict[str, list[str]]:
        """Master address -> the Sentinels naming it, when the reachable Sentinels do not all
        name the same master (a Sentinel down during a move comes back with its old view);
        empty when they agree."""
        named: dict[str, list[str]] = {}
        for s in self.sentinels:
            if s.reachable:
                named.setdefault(s.master or "none", []).append(s.address)
        return named if len(named) > 1 else {}

    @property
    def serving_region(self) -> str | None:
        """Where clients should be served: the one writable primary, else where routing points
        (a move stopped before its promotion leaves the old primary fenced and routing on it)."""
        return self.primaries[0] if len(self.primaries) == 1 else self.active_region

    @computed_field
    @property
    def left_scaled_to_0(self) -> list[str]:
        """Deployments at 0 replicas in the region that should serve, with no runbook running:
        a move stopped (terminated, or crashed and never resumed) after its scale-down. The
        other region at 0 is the normal standby state and is not reported."""
        if self.move_running is not False:
            return []
        out = []
        for r in self.regions:
            sv = r.services
            if r.name != self.serving_region or sv is None or not sv.reachable or not sv.at_zero:
                continue
            scale = "; ".join(f"kubectl -n {sv.namespace} scale deployment/{d} --replicas={sv.remembered.get(d) or 1}"
                              for d in sv.at_zero)
            fenced = [d for d in sv.at_zero if d in sv.remembered]
            why = (f" ({', '.join(fenced)} scaled down by a fence; counts remembered in ConfigMap {sv.config_map})"
                   if fenced else "")
            out.append(f"{r.name}: services at 0 replicas in the region that serves ({', '.join(sv.at_zero)}){why} "
                       f"and no runbook is running; repair: {scale}")
        return out

    @computed_field
    @property
    def leftovers(self) -> list[str]:
        """Fences with no runbook running to own them: what a terminated (or crashed and never
        resumed) move leaves behind, each with its repair. Empty while a move runs: then they
        are that move's, and it lifts them or rolls forward."""
        if self.move_running is not False:
            return []
        out = []
        writable = [r.name for r in self.regions if r.postgres.role == "primary" and not r.postgres.read_only]
        for r in self.regions:
            p, other = r.postgres, next((x.name for x in self.regions if x.name != r.name), "?")
            # A hold on a running primary: only a run that ended between its hold and its stop
            # leaves one; the next restart would come up read-only as a standby of nothing.
            held = p.role == "primary" and p.hold == "eagle-dr"
            local = (" --local on its host (lifts the hold in place, no restart)" if held else
                     " (on its host add --local for a stopped one)")
            repair = (f"eagle-dr failback --region {r.name}" if other in writable else
                      f"eagle-dr unfence --region {r.name}{local}")
            if p.role == "primary" and p.read_only:
                out.append(f"{r.name}: PostgreSQL is a fenced read-only primary"
                           + (" whose data directory also holds a stop fence's hold" if held else "")
                           + f" and no runbook is running; repair: {repair}")
            elif held:
                out.append(f"{r.name}: PostgreSQL is a writable primary, but its data directory still holds a stop "
                           f"fence's hold (standby.signal and eagle-dr's marker) and no runbook is running: its next "
                           f"restart comes up as a read-only standby of nothing; repair: {repair}")
            elif p.role == "primary" and p.hold == "standby.signal":
                out.append(f"{r.name}: PostgreSQL is a writable primary, but its data directory has a standby.signal "
                           f"that eagle-dr did not write: its next restart comes up as a standby; remove the file on "
                           f"its host if it is to stay the primary")
            if p.role == "standby" and p.upstream is None and p.receiver_status is None:
                out.append(f"{r.name}: PostgreSQL is held as a standby of nothing (a stop fence) and no runbook is "
                           f"running; repair: {repair}")
            if r.redis.role == "master" and r.redis_fenced:
                out.append(f"{r.name}: Redis refuses writes (fenced) and no runbook is running; repair: {repair}")
        return out


def services_view(settings, timeout_s: float = 3.0) -> ServicesView:
    """Read the region's deployments and the fence's remembered counts through the runbooks'
    own Kubernetes adapter (the one place that knows the selector and the ConfigMap layout);
    an unreachable API server is a status, not a crash."""
    from activities.kubernetes import KubernetesCluster, ResourceMissing

    where = {"namespace": settings.namespace, "config_map": settings.config_map}
    try:
        with KubernetesCluster(settings, request_timeout_s=(timeout_s, timeout_s)) as k8s:
            deployments = k8s.list_deployments()
            try:
                remembered, active = k8s.remembered_replicas(), k8s.get_active_region()
            except ResourceMissing:
                remembered, active = {}, None
    except Exception as e:  # noqa: BLE001 - a dead region's API server is expected in a DR status
        return ServicesView(reachable=False, error=scrub(str(e))[:300], **where)
    return ServicesView(reachable=True, replicas={d.name: d.replicas for d in deployments},
                        ready={d.name: d.ready_replicas for d in deployments}, remembered=remembered,
                        active_region=active, **where)


async def _liveness(client, queues: list[str]) -> dict:
    """Run WorkerLivenessWorkflow on an in-process worker of a throw-away queue."""
    from temporalio.worker import Worker

    from workers.run import sandbox_runner
    from workflows.liveness import LivenessInput, WorkerLivenessWorkflow

    own = f"eagle-dr-status-{uuid.uuid4()}"
    async with Worker(client, task_queue=own, workflows=[WorkerLivenessWorkflow], workflow_runner=sandbox_runner()):
        found = await client.execute_workflow(
            WorkerLivenessWorkflow.run, LivenessInput(task_queues=queues, pickup_seconds=PICKUP_SECONDS),
            id=own, task_queue=own, execution_timeout=timedelta(seconds=PICKUP_SECONDS + 20))
    return {q.task_queue: q for q in found}


async def _pollers(address: str, queues: list[tuple[str, str, bool]], cfg=None) -> list[WorkerView]:
    from eagle_dr.temporal import connect, poller_ages

    try:
        client = await asyncio.wait_for(connect(address, config=cfg), 5)
    except Exception as e:  # noqa: BLE001 - Temporal down is a status, not a crash
        return [WorkerView(task_queue=q, region=r, polling=False, error=f"temporal: {e}") for q, r, _ in queues]
    try:
        alive = await _liveness(client, [q for q, _, _ in queues])
    except Exception as e:  # noqa: BLE001 - reported per queue below
        alive, liveness_error = {}, f"liveness probe: {e}"
    else:
        liveness_error = None
    out = []
    for queue, region, is_workflow in queues:
        try:
            ages = await poller_ages(client, queue, workflow=is_workflow)
        except Exception as e:  # noqa: BLE001
            out.append(WorkerView(task_queue=queue, region=region, polling=False, error=str(e)))
            continue
        fresh = {i: a for i, a in ages.items() if a <= POLLER_FRESH_SECONDS}
        probe = alive.get(queue)
        if probe is None:
            error = liveness_error
        elif not probe.alive:
            error = f"no worker picked up a probe within {PICKUP_SECONDS:.0f}s"
        else:
            error = None
        out.append(WorkerView(task_queue=queue, region=region, polling=bool(probe and probe.alive),
                              worker=probe.worker if probe else None, pollers=sorted(fresh),
                              last_seen_seconds=min(ages.values()) if ages else None, error=error))
    return out


async def gather(cfg: EagleConfig, temporal_address: str | None = None) -> TopologyStatus:
    address = temporal_address or f"127.0.0.1:{cfg.lab.dev_server.grpc_port}"
    regions = []
    for r in cfg.regions:
        # An unreadable secret is a finding here (the operator's host may lack it), not a crash;
        # the activities keep raising it, so a worker without it casts no vote instead of "down".
        rs = _unless_secret(lambda: redis_status(r.redis, 2), lambda e: RedisStatus(reachable=False, error=e))
        ps = _unless_secret(lambda: pg_status(r.postgres, 2, files=True), lambda e: PgStatus(reachable=False, error=e))
        regions.append(RegionView(name=r.name, configured_role=r.role, postgres=ps, redis=rs,
                                  redis_fenced=rs.role == "master" and fenced(r.redis, 2),
                                  services=services_view(r.kubernetes) if cfg.routing.kubernetes else None,
                                  archive=archive_view(cfg, r.name) if ps.role == "primary" else None))
    seen, sentinels = set(), []
    for r in cfg.regions:
        for ep in r.redis.sentinels:
            if str(ep) not in seen:
                seen.add(str(ep))
                sentinels.append(_unless_secret(lambda: sentinel_view(r.redis, ep, 2),
                                                lambda e: SentinelView(address=str(ep), reachable=False, error=e)))
    queues = [(r.temporal.task_queue, r.name, False) for r in cfg.regions]
    queues.append((cfg.temporal.control_task_queue, "control", True))
    workers = await _pollers(address, queues, cfg)
    active = LabRouter(cfg.lab.state_dir).active_region() if cfg.routing.lab_file else None
    if active is None:
        # Without the lab's file, the clusters' ConfigMaps say where routing points (if they agree).
        named = {r.services.active_region for r in regions if r.services and r.services.reachable}
        active = named.pop() if len(named) == 1 else LabRouter(cfg.lab.state_dir).active_region()
    st = TopologyStatus(service=cfg.service, active_region=active, monitor=await _monitor(address, cfg.service, cfg),
                        regions=regions, sentinels=sentinels, workers=workers, temporal_address=address,
                        temporal_ui=cfg.temporal.ui_url, temporal_ui_reachable=ui_reachable(cfg.temporal.ui_url),
                        move_running=await move_running(address, cfg.service, cfg),
                        lag_guard_bytes=cfg.health.max_lag_bytes)
    primary = st.serving_region if st.serving_region in cfg.region_names else cfg.primary.name
    # The checks block on the network (pgbackrest info, Route 53): off the event loop.
    try:
        st.readiness = await asyncio.to_thread(assess, cfg, primary, _alive(workers))
    except SecretUnavailable:
        st.readiness = None  # its databases were not readable either: the verdict says so
    return st


def _unless_secret(probe, unreadable):
    try:
        return probe()
    except SecretUnavailable as e:
        return unreadable(f"secret: {e}")


def _alive(workers: list[WorkerView]) -> dict[str, bool | None]:
    """Region (or ``control``) -> its worker picked up the liveness probe; None when the
    probe itself could not run (Temporal down): that is not knowing, not a dead worker."""
    return {w.region: None if (w.error or "").startswith(("temporal:", "liveness probe:")) else w.polling
            for w in workers}


async def _monitor(address: str, service: str, cfg=None) -> MonitorView:
    from eagle_dr.monitor import monitor_id
    from eagle_dr.temporal import connect

    try:
        client = await asyncio.wait_for(connect(address, config=cfg), 5)
        return await asyncio.wait_for(monitor_view(client, service), 10)
    except Exception as e:  # noqa: BLE001 - Temporal down: unknown, said in the line
        return MonitorView(workflow_id=monitor_id(service), running=False, status="unknown",
                           error=f"temporal: {e or type(e).__name__}")


def collect(cfg: EagleConfig, temporal_address: str | None = None) -> TopologyStatus:
    return asyncio.run(gather(cfg, temporal_address))


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def archive_line(region: str, v: ArchiveView) -> str:
    """One line: "WAL archiving on <primary>: ok|DEGRADED ..." (plain text; render colours it)."""
    a = v.archiver
    if not a.reachable:
        return f"WAL archiving on {region}: unknown ({a.error})"
    parts = [f"{a.ready_segments} segment(s) ({_fmt_bytes(a.ready_bytes)}) waiting",
             f"last archived {a.last_archived_wal or '-'}"]
    if a.failing:
        parts.append(f"FAILING since {a.last_failed_at:%Y-%m-%d %H:%M:%S} UTC ({a.last_failed_wal})")
    if v.dropped:
        parts.append(f"{', '.join(v.dropped)} bucket DROPPED from archiving (unreachable; PITR there stops at the gap)")
    if v.gaps:
        parts.append(f"WAL gap in {', '.join(v.gaps)} bucket until a full backup to it")
    if a.archive_mode != "on":
        parts.append(f"archive_mode={a.archive_mode}")
    return f"WAL archiving on {region}: {'DEGRADED' if v.degraded else 'ok'}; " + "; ".join(parts)


def _archive_line(region: str, v: ArchiveView) -> str:
    line = archive_line(region, v)
    return line.replace("DEGRADED", "[bold red]DEGRADED[/]", 1) if v.degraded else line


def render(st: TopologyStatus, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]{st.service}[/]  active region: [bold cyan]{st.active_region or '?'}[/]  "
                  f"temporal: {st.temporal_address}  UI: {st.temporal_ui} "
                  f"({'[green]up[/]' if st.temporal_ui_reachable else '[red]down[/]'})")
    h = st.health
    colour = {"healthy": "green", "degraded": "bold red", "unknown": "yellow"}[h.state]
    console.print(f"[{colour}]{h.state.upper()}[/]" + (": " + escape("; ".join(h.reasons)) if h.reasons else ""))
    if len(st.primaries) > 1:
        console.print(f"[bold red]SPLIT BRAIN: writable PostgreSQL primaries in {', '.join(st.primaries)}[/]")
    if st.monitor is not None:
        colour = {"running": "green", "paused": "yellow"}.get(st.monitor.status, "red")
        line = f"monitor: {st.monitor.status} ({short(st.monitor.error)})" if st.monitor.error else st.monitor.line()
        console.print(f"[{colour}]{escape(line)}[/]")
    for left in st.leftovers:
        console.print(f"[bold red]LEFT FENCED:[/] {left}")
    if st.readiness is not None:
        _render_readiness(console, st.readiness)
    for left in st.left_scaled_to_0:
        console.print(f"[bold red]LEFT SCALED TO 0:[/] {left}")

    t = Table(title="PostgreSQL", title_justify="left")
    for col in ("region", "role", "timeline", "lsn", "replication", "lag", "note"):
        t.add_column(col)
    for r in st.regions:
        p = r.postgres
        if not p.reachable:
            t.add_row(r.name, "[red]DOWN[/]", "-", "-", "-", "-", escape(short(p.error)))
            continue
        if p.role == "primary":
            links = ", ".join(f"{x.application_name}: {x.state}" for x in p.replicas) or "[yellow]no standby[/]"
            lag = ", ".join(f"{_fmt_bytes(x.lag_bytes)} / {x.replay_lag_seconds or 0:.3f}s" for x in p.replicas) or "-"
            role = "[green]primary[/]" + (" (read-only)" if p.read_only else "")
        else:
            links = f"from {p.upstream or '?'}: {p.receiver_status or '[red]not streaming[/]'}"
            lag = f"replay delay {p.replay_delay_seconds:.1f}s" if p.replay_delay_seconds is not None else "-"
            role = "standby"
        t.add_row(r.name, role, str(p.timeline or "-"), p.lsn or "-", links, lag, "")
    console.print(t)
    for r in st.regions:
        if r.archive is not None:
            console.print(_archive_line(r.name, r.archive))

    t = Table(title="Redis", title_justify="left")
    for col in ("region", "role", "offset", "master / replicas", "link"):
        t.add_column(col)
    for r in st.regions:
        x = r.redis
        if not x.reachable:
            t.add_row(r.name, "[red]DOWN[/]", "-", escape(short(x.error)), "-")
        elif x.role == "master":
            t.add_row(r.name, "[green]master[/]", str(x.offset), f"{x.connected_replicas} replica(s)", "-")
        else:
            t.add_row(r.name, "replica", str(x.offset), f"of {x.master}", x.link_status or "-")
    console.print(t)

    if st.sentinels_disagree:
        views = "; ".join(f"{', '.join(who)} name {m}" for m, who in st.sentinels_disagree.items())
        console.print(f"[bold red]SENTINELS DISAGREE on the master: {views}[/] "
                      "(one was down during a move: failback re-points them all; in the lab, so does "
                      "eagle-dr lab heal-region)")

    if any(r.services for r in st.regions):
        t = Table(title="Services (Kubernetes)", title_justify="left")
        for col in ("region", "deployments (ready/desired)", "routing says"):
            t.add_column(col)
        for r in st.regions:
            sv = r.services
            if sv is None:
                continue
            if not sv.reachable:
                t.add_row(r.name, f"[red]API UNREACHABLE[/] {escape(short(sv.error))}", "-")
                continue
            deps = ", ".join(f"{d} {sv.ready.get(d, 0)}/{n}" for d, n in sorted(sv.replicas.items())) or "none"
            t.add_row(r.name, deps, sv.active_region or "-")
        console.print(t)

    t = Table(title="Sentinels", title_justify="left")
    for col in ("sentinel", "master", "peers", "quorum"):
        t.add_column(col)
    for s in st.sentinels:
        if not s.reachable:
            t.add_row(s.address, "[red]DOWN[/]", "-", escape(short(s.error)))
        else:
            q = "[green]OK[/]" if s.quorum_ok else f"[red]{s.quorum_message}[/]"
            t.add_row(s.address, s.master or "-", str(s.other_sentinels), q)
    console.print(t)

    t = Table(title="Workers", title_justify="left")
    for col in ("task queue", "region", "polling", "pollers"):
        t.add_column(col)
    for w in st.workers:
        state = "[green]yes[/]" if w.polling else f"[red]no[/]: {escape(short(w.error))}" if w.error else "[red]no[/]"
        t.add_row(w.task_queue, w.region, state, ", ".join(w.pollers) or "-")
    console.print(t)


_READINESS_COLOUR = {"ok": "green", "n/a": "dim", "unknown": "yellow", "warn": "yellow", "fail": "bold red"}


def _render_readiness(console, rep: ReadinessReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Readiness (would a failover from {rep.primary} work now?): {rep.state.upper()}",
              title_justify="left")
    for col in ("check", "region", "state", "reason"):
        t.add_column(col)
    for c in rep.checks:
        colour = _READINESS_COLOUR[c.state]
        t.add_row(c.name, c.region or "-", f"[{colour}]{c.state}[/]", escape(c.reason))
    console.print(t)
