"""Prometheus metrics of a worker: the Temporal SDK's own and eagle-dr's DR metrics, on one endpoint.

Both go through the worker's ``temporalio.runtime.Runtime``: its Prometheus exporter serves the
SDK's metrics (task latencies, pollers, sticky cache, ...) and every metric created on its
meter, so eagle-dr needs no second HTTP server and no new dependency (prometheus_client would
serve a second port beside the SDK's, with nothing gained).

Who records what:
- activities, from what they already measure: each vantage point's probe of each region
  (``activities/health.py``: availability, probe latency, replication lag in bytes and seconds,
  Redis offset lag), through ``activity.metric_meter()``;
- workflows, from their results (runbook outcomes, the last RTO and RPO, the monitor's state),
  through ``workflow.metric_meter()``: it does no I/O from the workflow (the values go to the
  worker's in-process exporter), adds no command to the history (so no replay patch), and
  records nothing while a history is replayed, so a counter counts each run once.

Every DR metric carries ``service``; probe metrics also ``vantage`` (the worker that looked:
``control`` or a region) and ``region`` (the one looked at). The SDK adds ``namespace``,
``task_queue`` and the activity or workflow type.
"""

from __future__ import annotations

import functools

import structlog
from temporalio.common import MetricMeter

PREFIX = "eagle_dr_"

log = structlog.get_logger(__name__)


def _never_fails(fn):
    """A metric must never fail what it measures: a runbook past its point of no return, or
    a probe, goes on and the metric is logged as lost. (The SDK rejects e.g. negative gauge
    values by raising, which inside a workflow would fail its task over and over.)"""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("metric not recorded", metric=fn.__name__, error=str(e))

    return wrapper


def worker_runtime(bind_address: str):
    """A runtime whose Prometheus exporter listens on ``host:port`` (its metrics and ours)."""
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind_address)))


def _gauge(meter: MetricMeter, name: str, description: str, unit: str | None, value: float | None,
           **attrs) -> None:
    """``value`` None: not measured, set as NaN (Prometheus's "no value"), never left out: a
    gauge keeps its last value, which would then read as this one."""
    if value is None:
        value = float("nan")
    if value < 0:
        return  # Temporal's gauges take no negative values; none of ours has a meaning below 0
    meter.create_gauge_float(PREFIX + name, description, unit).with_additional_attributes(
        {k: str(v) for k, v in attrs.items()}).set(float(value))


def _count(meter: MetricMeter, name: str, description: str, **attrs) -> None:
    meter.create_counter(PREFIX + name, description).with_additional_attributes(
        {k: str(v) for k, v in attrs.items()}).add(1)


# -- what a vantage point saw (activities) ----------------------------------------------------------


@_never_fails
def probe(meter: MetricMeter, service: str, vantage: str, region: str, *, postgres_up: bool, redis_up: bool,
          seconds: float) -> None:
    where = dict(service=service, vantage=vantage, region=region)
    _gauge(meter, "region_available", "1 when this vantage point reached the region's PostgreSQL with a real "
                                      "query, else 0", None, 1 if postgres_up else 0, **where)
    _gauge(meter, "redis_available", "1 when this vantage point's Redis command got an answer, else 0", None,
           1 if redis_up else 0, **where)
    _gauge(meter, "probe_latency_seconds", "How long this vantage point's probe of the region took "
                                           "(PostgreSQL query + Redis command)", "s", seconds, **where)


@_never_fails
def replication_lag(meter: MetricMeter, service: str, vantage: str, standby: str, *, lag_bytes: int | None,
                    lag_seconds: float | None) -> None:
    """None: not measured this round (NaN, see activities/health.py _record)."""
    where = dict(service=service, vantage=vantage, region=standby)
    _gauge(meter, "replication_lag_bytes", "WAL the primary wrote that this standby has not replayed (NaN: "
                                           "unknown)", "By", lag_bytes, **where)
    _gauge(meter, "replication_lag_seconds", "The primary's replay_lag for this standby (0 when idle and caught up; "
                                             "NaN: unknown)", "s", lag_seconds, **where)


@_never_fails
def redis_offset_lag(meter: MetricMeter, service: str, vantage: str, replica: str, lag: int | None) -> None:
    _gauge(meter, "redis_offset_lag_bytes", "Master replication offset minus this replica's (NaN: unknown)", "By",
           lag, service=service, vantage=vantage, region=replica)


@_never_fails
def conflicts_resolved(meter: MetricMeter, service: str, table: str, strategy: str, *, conflicts: int,
                       flagged: int) -> None:
    """Keys both sides changed, resolved by the table's strategy (and those flagged for review)."""
    where = dict(service=service, table=table, strategy=strategy)
    for name, n, what in (("conflicts_total", conflicts, "Keys both sides changed after a fork, by strategy"),
                          ("conflicts_flagged_total", flagged, "Keys left for human review, by strategy")):
        if n > 0:
            meter.create_counter(PREFIX + name, what).with_additional_attributes(where).add(n)


@_never_fails
def alert_request(meter: MetricMeter | None, service: str, code: int, seconds: float, *, firing: int = 0,
                  resolved: int = 0) -> None:
    """One webhook request the receiver answered, by HTTP code, and the alerts it carried."""
    if meter is None:
        return
    where = dict(service=service, code=str(code))
    meter.create_counter(PREFIX + "alert_requests_total", "Alertmanager webhook requests by answer code") \
        .with_additional_attributes(where).add(1)
    meter.create_histogram_float(PREFIX + "alert_request_seconds", "Time to answer a webhook request", "s") \
        .with_additional_attributes(where).record(seconds)
    for status, n in (("firing", firing), ("resolved", resolved)):
        if n:
            meter.create_counter(PREFIX + "alerts_received_total", "Alerts received, by status") \
                .with_additional_attributes(dict(service=service, status=status)).add(n)


# -- what a runbook or the monitor decided (workflows) ----------------------------------------------


@_never_fails
def runbook_finished(meter: MetricMeter, service: str, runbook: str, outcome: str) -> None:
    _count(meter, "runbook_runs_total", "Runbook runs by outcome (failover, switchover, failback, ...)",
           service=service, runbook=runbook, outcome=outcome)


@_never_fails
def move_measured(meter: MetricMeter, service: str, runbook: str, rto, rpo) -> None:
    """The last move's RTO and RPO beside their targets. A figure this move could not measure
    is set to NaN, never left out: a gauge keeps its last value, and the previous move's RTO or
    "met" then read as this move's."""
    where = dict(service=service, runbook=runbook)
    # A move whose routing failed never reached "serving": its steps' time is no RTO.
    serving = rto.total_s if rto.serving_basis is None else None
    for name, value, what in (("last_rto_seconds", serving, "Detection to serving in the last move"),
                              ("rto_target_seconds", rto.target_s, "The RTO objective"),
                              ("last_rpo_wal_bytes", rpo.lost_wal_bytes, "WAL lost in the last move"),
                              ("last_rpo_seconds", rpo.loss_window_s, "How far back the last move's lost writes "
                                                                      "reach"),
                              ("rpo_target_seconds", rpo.target_s, "The RPO objective"),
                              ("last_redis_offset_gap", rpo.redis_offset_gap, "Redis offset gap in the last move")):
        _gauge(meter, name, what, None, value, **where)
    for what, met in (("rto", rto.met), ("rpo", rpo.met)):
        # Unknown is never "met" and never silently absent: a gauge of its own says it.
        _gauge(meter, f"last_{what}_unknown", f"1 when the last move's {what.upper()} could not be proven", None,
               int(met is None), **where)
        _gauge(meter, f"last_{what}_met", f"1 met, 0 missed, NaN unknown (see last_{what}_unknown)", None,
               None if met is None else int(met), **where)


@_never_fails
def monitor_round(meter: MetricMeter, service: str, *, paused: bool, failures: int, workers_down: int) -> None:
    where = dict(service=service)
    _gauge(meter, "monitor_paused", "1 while the monitor is paused (watching, never failing over)", None,
           int(paused), **where)
    _gauge(meter, "monitor_consecutive_failures", "Failed rounds in a row of the watched primary", None, failures,
           **where)
    _gauge(meter, "monitor_workers_down", "Vantage points whose worker did not pick up its probe", None,
           workers_down, **where)


@_never_fails
def consistency_table(meter: MetricMeter, service: str, table: str, *, differences: int, in_flight: int, rows: int,
                      seconds: float, throttled_seconds: float) -> None:
    """The last consistency check of a table (workflows/consistency.py)."""
    where = dict(service=service, table=table)
    _gauge(meter, "consistency_differences", "Differing keys (inserted + updated + deleted) the last check found",
           None, differences, **where)
    _gauge(meter, "consistency_in_flight", "Keys still being written at the last check's re-check (not counted "
                                           "as differences)", None, in_flight, **where)
    _gauge(meter, "consistency_rows", "Rows on the first side at the last check", None, rows, **where)
    _gauge(meter, "consistency_seconds", "How long the last check of the table took", "s", seconds, **where)
    _gauge(meter, "consistency_throttled_seconds", "How long the last check paused for replica lag", "s",
           throttled_seconds, **where)


@_never_fails
def consistency_run(meter: MetricMeter, service: str, *, differences: int, redis_differences: int | None,
                    at: float) -> None:
    where = dict(service=service)
    _count(meter, "consistency_checks_total", "Consistency checks run, by whether they found differences",
           service=service, found="yes" if differences else "no")
    _gauge(meter, "consistency_last_check_timestamp_seconds", "When the last consistency check finished (Unix time)",
           "s", at, **where)
    _gauge(meter, "consistency_total_differences", "Differing keys in all tables and Redis at the last check",
           None, differences, **where)
    if redis_differences is not None:
        _gauge(meter, "consistency_redis_differences", "Redis keys (sampled) and per-db counts that differed at the "
                                                       "last check", None, redis_differences, **where)


# -- readiness checks (activities/readiness.py) -----------------------------------------------------

# ok 1, warn 0.5, fail 0. Unknown cannot be -1 (Temporal's gauges refuse negative values):
# it is 0 here, as "not ready", with eagle_dr_readiness_unknown 1 beside it, so a rule can
# tell "found a fault" (unknown 0) from "could not look" (unknown 1). n/a is not exported.
READINESS_VALUE = {"ok": 1.0, "warn": 0.5, "fail": 0.0, "unknown": 0.0}


@_never_fails
def readiness(meter: MetricMeter, service: str, checks) -> None:
    for c in checks:
        if c.state not in READINESS_VALUE:
            continue
        where = dict(service=service, check=c.name, region=c.region or "all")
        _gauge(meter, "readiness", "Readiness check: 1 ok, 0.5 warn, 0 fail or unknown (see readiness_unknown)",
               None, READINESS_VALUE[c.state], **where)
        _gauge(meter, "readiness_unknown", "1 when the readiness check could not be assessed", None,
               int(c.state == "unknown"), **where)


@_never_fails
def readiness_assessed(meter: MetricMeter, service: str, assessed: bool) -> None:
    """From the monitor (control worker): whether its last readiness run made a report. The
    check gauges come from the primary's worker and keep their last value when it stops
    reporting; this one says they are stale."""
    _gauge(meter, "readiness_assessed", "1 when the monitor's last readiness run produced a report, else 0", None,
           int(assessed), service=service)
