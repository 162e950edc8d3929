"""Continuous readiness checks: what would make the next failover (or the failback after it)
fail, found while there is still time to repair it.

Each check is a plain function over the config and what it reads now, so ``eagle-dr status``
(from the operator's host) and the monitor's ``assess_readiness`` activity (on the primary's
worker) compute the same verdicts. A check is ``ok``, ``warn`` (a failover would work now
but with a margin gone), ``fail`` (a failover or failback would fail or lose more than the
guard allows), ``unknown`` (it could not be assessed: never counted as ok) or ``n/a`` (not
configured here, e.g. no DNS routing).

The checks, one each (region: the one it concerns):

- ``standby``: the failover target answers, is in recovery and streams;
- ``replication_lag``: WAL the standby has not received against the failover lag guard
  (``health.max_lag_bytes``: past it a failover refuses without ``--force``), replay lag
  against ``readiness.max_replay_lag``;
- ``replication_slot``: the standby's slot on the primary exists, is active, and PostgreSQL
  still reserves the WAL it retains (``wal_status``): a lost slot means failback or a
  re-attach needs a new base backup;
- ``rewind_safety`` per node: ``wal_log_hints`` or data checksums (pg_rewind refuses a node
  with neither, and failback rewinds the old primary);
- ``unlogged`` on the primary: unlogged tables and sequences, which no move or backup carries
  (warn: a failover empties them);
- ``next_start`` on the primary: what its data directory makes of its next start: a
  ``standby.signal`` (a stop fence's hold left by a switchover that ended between its hold and
  its stop, or anyone's) turns a crash restart or reboot of the primary into a read-only
  standby, an outage nothing else predicts (warn once the hold is 2 minutes old: a running
  switchover holds its source for seconds);
- ``wal_headroom`` on the primary: free space on the pg_wal filesystem against what it may
  still have to hold (max_wal_size, and the WAL the archive guard lets pile up for a dead
  bucket before pgBackRest drops it: ``backup.archive_queue_limit``);
- ``sentinel_quorum``: ``SENTINEL CKQUORUM`` on every Sentinel;
- ``dns``: the Route 53 failover pair exists, PRIMARY names the primary's region with its
  value, and its TTL is within ``readiness.max_dns_ttl`` (clients keep a stale answer for a
  TTL: a long one is RTO);
- ``backup_age``: the newest backup in each bucket, by the restore drill's freshness rules;
- ``workers``: a worker picks up work on every task queue (the caller says which do).
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, computed_field
from temporalio import activity

from activities.postgres.status import PgStatus, connect, pg_status
from activities.postgres.unlogged import describe, unlogged_relations
from activities.redis.status import sentinel_view
from eagle_dr import metrics
from eagle_dr.config import EagleConfig, RegionConfig, scrubbed_first_line

State = Literal["ok", "warn", "fail", "unknown", "n/a"]

# Worst first: a report's overall state is its worst check's. Unknown ranks above ok and
# below warn: it cannot be called ready, but it is not a finding of a fault either.
_RANK = {"n/a": 0, "ok": 0, "unknown": 1, "warn": 2, "fail": 3}


class ReadinessCheck(BaseModel):
    name: str
    region: str | None = None  # the region (or node) it concerns; None: the service
    state: State
    reason: str = ""
    # What was measured, in the unit the reason names (bytes, seconds, a count).
    value: float | None = None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.region}" if self.region else self.name


class ReadinessReport(BaseModel):
    primary: str
    at: datetime
    checks: list[ReadinessCheck] = []
    # Set when the report could not be made at all (the activity did not run).
    error: str | None = None

    @computed_field
    @property
    def state(self) -> State:
        if not self.checks:
            return "unknown"
        return max((c.state for c in self.checks), key=lambda s: _RANK[s])

    def by_key(self) -> dict[str, ReadinessCheck]:
        return {c.key: c for c in self.checks}

    def line(self) -> str:
        if not self.checks:
            return f"readiness: unknown ({self.error or 'not assessed'})"
        bad = [c for c in self.checks if _RANK[c.state] > 0]
        if not bad:
            return f"readiness: ok ({len(self.checks)} checks)"
        return f"readiness: {self.state.upper()}; " + "; ".join(
            f"{c.key} {c.state}: {c.reason}" for c in sorted(bad, key=lambda c: -_RANK[c.state]))



def known_states(report: ReadinessReport | None) -> dict[str, str]:
    """Check key -> state, the comparison base for the next report (small enough to carry
    across the monitor's continue-as-new)."""
    return {c.key: c.state for c in report.checks} if report else {}


def through_unknown(before: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """``new``'s verdicts, with an "unknown" check keeping what ``before`` knew of it. Unknown
    is "could not look", not a state of its own: compared against it, a check that went warn
    -> unknown -> ok was never "recovered" (its pager incident stayed open for good), and one
    that went warn -> unknown -> warn was "degraded" a second time."""
    return {k: before[k] if s == "unknown" and k in before else s for k, s in new.items()}


def worse(before: dict[str, str], new: ReadinessReport) -> list[ReadinessCheck]:
    """Checks of ``new`` that are warn or fail and worse than ``before`` had them (ok, n/a,
    unknown or absent before; or warn before and fail now): "readiness degraded"."""
    return [c for c in new.checks if c.state in ("warn", "fail")
            and (c.key not in before or _RANK[c.state] > _RANK[before[c.key]])]


def better(before: dict[str, str], new: ReadinessReport) -> list[ReadinessCheck]:
    """Checks that ``before`` had warn or fail and ``new`` has ok (or n/a): recovered."""
    return [c for c in new.checks if _RANK[c.state] == 0 and before.get(c.key) in ("warn", "fail")]


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# -- PostgreSQL ----------------------------------------------------------------------------------


def check_standby(standby: RegionConfig, st: PgStatus) -> ReadinessCheck:
    c = ReadinessCheck(name="standby", region=standby.name, state="ok")
    if not st.reachable:
        c.state, c.reason = "fail", f"the failover target is unreachable: {st.error}"
    elif st.role != "standby":
        c.state, c.reason = "fail", f"the failover target is a {st.role}, not a standby"
    elif st.hold == "eagle-dr":
        c.state, c.reason = "fail", (f"the failover target is an old primary held by a stop fence, not a replica: "
                                     f"a failover to it is refused; eagle-dr failback --region {standby.name}")
    elif st.receiver_status != "streaming":
        # It can still be promoted, but it falls further behind every second.
        c.state, c.reason = "warn", f"not streaming from the primary (wal receiver: {st.receiver_status or 'none'})" + (
            "; whether it is a fenced old primary could not be read (pg_stat_file)" if st.hold is None else "")
    else:
        c.reason = f"streaming from {st.upstream}"
    return c


def check_lag(cfg: EagleConfig, standby: RegionConfig, primary: PgStatus, st: PgStatus) -> ReadinessCheck:
    guard = cfg.health.max_lag_bytes
    c = ReadinessCheck(name="replication_lag", region=standby.name, state="unknown")
    if not (primary.reachable and primary.lsn and st.reachable and st.role == "standby"):
        c.reason = "the primary or the standby cannot be read"
        return c
    # The failover guard counts WAL not *received* (received but not replayed is not lost).
    got = st.receive_lsn or st.lsn
    if got is None:
        c.reason = "the standby reports no received WAL"
        return c
    lag = max(0, _lsn(primary.lsn) - _lsn(got))
    c.value = float(lag)
    link = next((x for x in primary.replicas if x.application_name == standby.name or
                 x.slot_name == standby.postgres.slot_name), None)
    replay = link.replay_lag_seconds if link else None
    max_replay = cfg.readiness.max_replay_lag.total_seconds()
    if lag > guard:
        c.state, c.reason = "fail", (f"{_mib(lag)} not received, past the failover lag guard "
                                     f"health.max_lag_bytes ({_mib(guard)}): a failover now refuses without --force")
    elif lag > guard * cfg.readiness.lag_warn_fraction:
        c.state, c.reason = "warn", f"{_mib(lag)} not received, near the lag guard ({_mib(guard)})"
    elif replay is not None and replay > max_replay:
        c.state, c.reason = "warn", (f"replay {replay:.1f} s behind (readiness.max_replay_lag {max_replay:.0f} s): "
                                     "a promotion first replays it")
    else:
        c.state, c.reason = "ok", f"{lag} bytes not received" + (f", replay {replay:.3f} s" if replay else "")
    return c


_SLOT_SQL = """
select active, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
from pg_replication_slots where slot_name = %s
"""


def check_slot(primary: RegionConfig, standby: RegionConfig, timeout: float) -> ReadinessCheck:
    slot = standby.postgres.slot_name
    c = ReadinessCheck(name="replication_slot", region=standby.name, state="ok")
    try:
        with connect(primary.postgres, timeout) as conn:
            row = conn.execute(_SLOT_SQL, (slot,)).fetchone()
    except Exception as e:  # noqa: BLE001 - an unreachable primary is the monitor's finding, not this one's
        c.state, c.reason = "unknown", f"cannot read the primary's slots: {scrubbed_first_line(e)}"
        return c
    if row is None:
        c.state, c.reason = "fail", (f"slot {slot} does not exist on {primary.name}: nothing keeps the WAL the "
                                     "standby still needs after a disconnect")
        return c
    active, wal_status, retained = row
    c.value = float(retained) if retained is not None else None
    held = f"retains {_mib(retained)}" if retained is not None else "retains nothing"
    if wal_status == "lost":
        c.state, c.reason = "fail", f"slot {slot} lost WAL the standby needs: it must be re-cloned"
    elif wal_status == "unreserved":
        c.state, c.reason = "warn", f"slot {slot} {held}, past max_slot_wal_keep_size: WAL is about to be removed"
    elif not active:
        c.state, c.reason = "warn", f"slot {slot} is inactive (no standby attached), {held}"
    else:
        c.reason = f"slot {slot} active, {held}"
    return c


def check_rewind_safety(region: RegionConfig, timeout: float) -> ReadinessCheck:
    c = ReadinessCheck(name="rewind_safety", region=region.name, state="ok")
    try:
        with connect(region.postgres, timeout) as conn:
            hints, sums = conn.execute("select current_setting('wal_log_hints'),"
                                       " current_setting('data_checksums')").fetchone()
    except Exception as e:  # noqa: BLE001 - a node down cannot be assessed
        c.state, c.reason = "unknown", f"cannot read its settings: {scrubbed_first_line(e)}"
        return c
    if hints == "on" or sums == "on":
        c.reason = "wal_log_hints on" if hints == "on" else "data checksums on"
    else:
        c.state, c.reason = "fail", ("wal_log_hints off and no data checksums: pg_rewind refuses this node, "
                                     "so failing back to it needs a full re-clone")
    return c


def wal_dir(region: RegionConfig) -> Path | None:
    """The node's pg_wal, when its data directory is on this host."""
    if not region.postgres.data_dir:
        return None
    data = Path(region.postgres.data_dir)
    if not data.exists():
        return None
    wal = data / "pg_wal"
    try:
        return wal if wal.exists() else data
    except PermissionError:  # a 0700 data directory of another user: its filesystem is the same
        return data


def check_unlogged(primary: RegionConfig, timeout: float) -> ReadinessCheck:
    """Unlogged tables and sequences on the primary: no standby or backup has their rows, so
    any failover or switchover empties them. A warning, not a failure: a cache may be unlogged
    on purpose, but then someone should have said so."""
    c = ReadinessCheck(name="unlogged", region=primary.name, state="ok")
    try:
        with connect(primary.postgres, timeout) as conn:
            conn.execute(f"set statement_timeout = {int(timeout * 1000)}")
            rels = unlogged_relations(conn, sizes=True)
    except Exception as e:  # noqa: BLE001 - a node down cannot be assessed
        c.state, c.reason = "unknown", f"cannot read its catalog: {scrubbed_first_line(e)}"
        return c
    c.value = float(sum(u.bytes or 0 for u in rels))
    if rels:
        c.state, c.reason = "warn", (f"{len(rels)} unlogged relation(s), never replicated or backed up: "
                                     f"{describe(rels)}; a failover or switchover empties them "
                                     "(ALTER TABLE ... SET LOGGED to carry them)")
    else:
        c.reason = "no unlogged tables or sequences"
    return c


# A hold younger than this on a running primary is taken for a running switchover's own.
HOLD_GRACE_SECONDS = 120.0


def check_next_start(primary: RegionConfig, ps: PgStatus) -> ReadinessCheck:
    """The primary's data directory says 'standby' for its next start (``ps``: read with
    ``files=True``)."""
    c = ReadinessCheck(name="next_start", region=primary.name, state="ok")
    if not ps.reachable or ps.role != "primary":
        c.state, c.reason = "unknown", f"not a reachable primary ({ps.error or ps.role})"
    elif ps.hold is None:
        c.state, c.reason = "unknown", ("cannot stat files in its data directory (pg_stat_file needs superuser, or "
                                        "EXECUTE on pg_stat_file(text, boolean) granted to eagle-dr's role)")
    elif ps.hold == "none":
        c.reason = "no standby.signal: a restart comes up as the primary"
    elif ps.hold == "eagle-dr" and (ps.hold_age_seconds or 0) < HOLD_GRACE_SECONDS:
        # A switchover holds its source for the seconds between its hold and its stop: not a
        # finding (a check landing there would page and recover within the minute).
        c.reason = (f"a stop fence's hold {ps.hold_age_seconds or 0:.0f} s old (a switchover's own while it runs; "
                    f"a warning if it is still there after {HOLD_GRACE_SECONDS:.0f} s)")
    else:
        whose = ("a stop fence's hold (standby.signal and eagle-dr's marker)" if ps.hold == "eagle-dr" else
                 "a standby.signal eagle-dr did not write")
        fix = (f"eagle-dr unfence --region {primary.name} --local on its host lifts it in place" if ps.hold == "eagle-dr"
               else "remove the file on its host if it is to stay the primary")
        c.state, c.reason = "warn", (f"its data directory has {whose}: a crash restart or reboot brings it up as a "
                                     f"read-only standby of nothing (normal only while a switchover runs); {fix}")
    return c


def check_wal_headroom(cfg: EagleConfig, primary: RegionConfig, timeout: float) -> ReadinessCheck:
    """Only the primary's: its pg_wal is what fills when the standby's slot holds WAL or a
    bucket is down (the archive guard's case); a standby's only grows with its primary's."""
    from activities.backup.archive import read_archiver

    c = ReadinessCheck(name="wal_headroom", region=primary.name, state="unknown")
    where = wal_dir(primary)
    if where is None:
        c.reason = "the primary's data directory is not on this host"
        return c
    try:
        with connect(primary.postgres, timeout) as conn:
            (max_wal,) = conn.execute("select pg_size_bytes(current_setting('max_wal_size'))").fetchone()
    except Exception as e:  # noqa: BLE001
        c.reason = f"cannot read max_wal_size: {scrubbed_first_line(e)}"
        return c
    free = shutil.disk_usage(where).free
    c.value = float(free)
    # What the archive guard lets wait for a dead bucket before pgBackRest drops WAL, less
    # what already waits (it is on the disk, not in the free space).
    backlog = read_archiver(primary.postgres, timeout)
    waiting = backlog.ready_bytes if backlog.reachable else 0
    fail_below = cfg.readiness.wal_free_fail or max_wal
    warn_below = cfg.readiness.wal_free_warn or max_wal + max(0, cfg.backup.archive_queue_limit - waiting)
    if free < fail_below:
        c.state, c.reason = "fail", (f"{_mib(free)} free for pg_wal, less than {_mib(fail_below)}: a checkpoint "
                                     "cycle or a stalled slot fills the disk and stops the primary")
    elif free < warn_below:
        c.state, c.reason = "warn", (f"{_mib(free)} free for pg_wal, less than {_mib(warn_below)} (max_wal_size + "
                                     "the archive backlog allowed for a dead bucket)")
    else:
        c.state, c.reason = "ok", f"{_mib(free)} free for pg_wal"
    return c


# -- Redis, DNS, backups, workers ------------------------------------------------------------------


def check_sentinels(cfg: EagleConfig, timeout: float) -> ReadinessCheck:
    r = cfg.primary.redis
    c = ReadinessCheck(name="sentinel_quorum", state="ok")
    if not r.sentinels:
        c.state, c.reason = "n/a", "no Sentinels configured"
        return c
    views = [sentinel_view(r, ep, timeout) for ep in r.sentinels]
    ok = [v for v in views if v.reachable and v.quorum_ok]
    bad = [f"{v.address} {'unreachable' if not v.reachable else v.quorum_message}" for v in views if v not in ok]
    c.value = float(len(ok))
    if not ok:
        c.state, c.reason = "fail", "no Sentinel can reach its quorum: " + "; ".join(bad)
    elif bad:
        # The rest still authorise, but one more loss and nothing can.
        c.state, c.reason = "warn", f"{len(ok)}/{len(views)} Sentinels pass CKQUORUM; " + "; ".join(bad)
    else:
        c.reason = f"{len(ok)}/{len(views)} Sentinels pass CKQUORUM"
    return c


def check_encryption(cfg: EagleConfig) -> ReadinessCheck:
    """Every link that crosses regions encrypted and its server verified (config only): a
    PostgreSQL below verify-full can be read or impersonated on the way, a Redis without TLS
    sends its password and every key in clear. A warning, not a failure: a failover works."""
    c = ReadinessCheck(name="encryption", state="ok")
    weak = [f"{r.name} PostgreSQL sslmode={r.postgres.sslmode}" for r in cfg.regions
            if r.postgres.sslmode != "verify-full"]
    weak += [f"{r.name} Redis without TLS" for r in cfg.regions if not r.redis.tls]
    c.value = float(len(weak))
    if weak:
        c.state, c.reason = "warn", "not encrypted and verified across regions: " + "; ".join(weak)
    else:
        c.reason = "PostgreSQL verify-full and Redis TLS in every region"
    return c


def check_dns(cfg: EagleConfig, primary: RegionConfig) -> ReadinessCheck:
    c = ReadinessCheck(name="dns", region=primary.name, state="ok")
    if not cfg.routing.dns or primary.dns is None:
        c.state, c.reason = "n/a", "DNS routing is off"
        return c
    from activities.dns import Route53Failover

    d = primary.dns
    try:
        pair = Route53Failover(cfg.routing.dns_endpoint_url, d.zone).current(d.record)
    except Exception as e:  # noqa: BLE001 - the API down is "cannot tell", not "wrong"
        c.state, c.reason = "unknown", f"Route 53: {scrubbed_first_line(e)}"
        return c
    p = pair["primary"]
    max_ttl = int(cfg.readiness.max_dns_ttl.total_seconds())
    if p is None:
        c.state, c.reason = "fail", f"no PRIMARY failover record for {d.record}"
        return c
    c.value = float(p["ttl"]) if p["ttl"] is not None else None
    ident = d.set_identifier or primary.name
    if p["set_identifier"] != ident or p["value"] != d.value:
        c.state, c.reason = "fail", (f"{d.record} PRIMARY is {p['set_identifier']} ({p['value']}), not the primary "
                                     f"{ident} ({d.value})")
    elif p["ttl"] is not None and p["ttl"] > max_ttl:
        c.state, c.reason = "warn", (f"{d.record} TTL {p['ttl']} s > readiness.max_dns_ttl {max_ttl} s: clients keep "
                                     "the old address that long after a failover")
    elif pair["secondary"] is None:
        c.state, c.reason = "warn", f"{d.record} has no SECONDARY record"
    else:
        c.reason = f"{d.record} -> {p['value']} ({ident}), TTL {p['ttl']} s"
    return c


def check_backup_age(cfg: EagleConfig, primary: RegionConfig) -> ReadinessCheck:
    """By the restore drill's freshness rules (activities/backup/drill.py): a broken bucket
    fails, none yet or an old one warns. Backups never set up on this node: n/a."""
    from activities.backup.catalog import read_catalog
    from activities.backup.drill import freshness
    from activities.backup.pgbackrest import Stanza

    c = ReadinessCheck(name="backup_age", region=primary.name, state="ok")
    try:
        st = Stanza(cfg, primary.name)
        configured = Path(st.conf).exists()
    except Exception:  # noqa: BLE001 - no data directory here: no pgBackRest config to read from
        configured = False
    if not configured:
        c.state, c.reason = "n/a", "no pgBackRest configuration for the primary on this host"
        return c
    try:
        cat = read_catalog(st)
    except Exception as e:  # noqa: BLE001
        c.state, c.reason = "unknown", f"pgbackrest info: {scrubbed_first_line(e)}"
        return c
    f = freshness(cat, datetime.now(timezone.utc), cfg.backup.every, cfg.backup.full_every)
    if f.newest_age_seconds:
        c.value = min(f.newest_age_seconds.values())
    broken = [p for p in f.problems if "unreadable" in p]
    if broken:
        c.state, c.reason = "fail", "; ".join(broken)
    elif not cat.backups:
        c.state, c.reason = "warn", "backups are configured but none exists yet"
    elif f.problems:
        c.state, c.reason = "warn", "; ".join(f.problems)
    else:
        c.reason = "; ".join(f"{r}: newest {age / 60:.0f} min old" for r, age in sorted(f.newest_age_seconds.items()))
    return c


def check_backup_path(cfg: EagleConfig, primary: RegionConfig, timeout: float) -> ReadinessCheck:
    """Backups read from the standby reach the primary through its node's pgBackRest TLS
    server: a mutual-TLS handshake with it, as the backup client (the worker's certificate,
    the server's checked against the CA and its name). Down or refusing, the next scheduled
    backup reads the primary instead (and a ``--source standby`` one fails): a warning."""
    c = ReadinessCheck(name="backup_path", region=primary.name, state="ok")
    p, client = primary.postgres, cfg.backup.tls_client
    if cfg.backup.read_from != "standby" or not p.pgbackrest_host or client is None:
        c.state, c.reason = "n/a", "backups read the primary (backup.read_from)"
        return c
    from activities.backup.take import primary_server_unreachable

    where = f"{p.pgbackrest_host}:{p.pgbackrest_port}"
    if (why := primary_server_unreachable(cfg, primary.name, timeout)):
        # Why, as the look found it: a certificate is named only when it was the reason.
        c.state, c.reason = "warn", (f"{primary.name}'s pgBackRest server {where}: {why}; backups read the primary "
                                     "instead")
        return c
    c.reason = f"{primary.name}'s pgBackRest server {where} answers mutual TLS"
    return c


def check_workers(cfg: EagleConfig, alive: dict[str, bool | None]) -> ReadinessCheck:
    """``alive``: ``control`` and each region name -> whether its worker picked up a probe
    (None: not known). A region's worker runs its promotion, fence and rewind: without it a
    move to or from that region stalls."""
    c = ReadinessCheck(name="workers", state="ok")
    names = ["control", *cfg.region_names]
    down = [n for n in names if alive.get(n) is False]
    unknown = [n for n in names if alive.get(n) is None]
    c.value = float(len(down))
    if down:
        c.state, c.reason = "fail", f"no worker polls the queue of {', '.join(down)}"
    elif unknown:
        c.state, c.reason = "unknown", f"not probed: {', '.join(unknown)}"
    else:
        c.reason = f"a worker polls each of {len(names)} queues"
    return c


# -- all of them -----------------------------------------------------------------------------------


def assess(cfg: EagleConfig, primary_name: str, workers: dict[str, bool | None] | None = None,
           timeout: float = 3.0) -> ReadinessReport:
    """Every check, for ``primary_name`` as the primary (the monitor's watched region, or
    where status finds the writable one). ``workers=None`` leaves the workers check out."""
    primary = cfg.region(primary_name)
    standby = cfg.other(primary_name)
    ps, ss = pg_status(primary.postgres, timeout, files=True), pg_status(standby.postgres, timeout, files=True)
    checks = [check_standby(standby, ss), check_lag(cfg, standby, ps, ss), check_slot(primary, standby, timeout),
              *(check_rewind_safety(r, timeout) for r in cfg.regions), check_unlogged(primary, timeout),
              check_next_start(primary, ps), check_wal_headroom(cfg, primary, timeout),
              check_sentinels(cfg, timeout), check_dns(cfg, primary), check_backup_age(cfg, primary),
              check_backup_path(cfg, primary, timeout), check_encryption(cfg)]
    if workers is not None:
        checks.append(check_workers(cfg, workers))
    return ReadinessReport(primary=primary_name, at=datetime.now(timezone.utc), checks=checks)


# -- the activity ----------------------------------------------------------------------------------


class ReadinessRequest(BaseModel):
    primary: str
    # control / region name -> whether its worker answered the last probe round (the monitor
    # knows it from its vantage round); None: the workers check is left out.
    workers: dict[str, bool | None] | None = None
    timeout_seconds: float = Field(default=3.0, gt=0, le=30)


class ReadinessActivities:
    """Runs on the primary's regional worker: the WAL headroom and the backup catalog are
    read from that host; everything else over the network."""

    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def assess_readiness(self, req: ReadinessRequest) -> ReadinessReport:
        report = assess(self.cfg, req.primary, req.workers, req.timeout_seconds)
        metrics.readiness(activity.metric_meter(), self.cfg.service, report.checks)
        return report
