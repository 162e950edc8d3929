"""Running a worker process: ``eagle-dr worker --region R`` or ``eagle-dr worker --control``.

SIGTERM drains: the worker stops polling, lets running activities finish (up to the
graceful timeout) and exits 0. SIGINT is handled the same way because background
processes started from scripts inherit SIGINT as ignored.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from eagle_dr import logs
from eagle_dr.config import EagleConfig
from eagle_dr.temporal import connect, connection_summary
from workers.registry import WORKFLOWS, control_activities, regional_activities
from workers.scrub import ScrubSecrets
from workers.thread_start import install as shield_thread_starts

PASSTHROUGH = ("pydantic", "structlog", "eagle_dr", "activities", "annotated_types", "pydantic_core")


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))


# A cancel reaches an activity only in the answer to one of its heartbeats, and the SDK sends
# them at most every 0.8 x the heartbeat timeout (48 s for a backup's 60 s): a cancelled backup
# ran on and finished for that long, and a cancelled move waited as long for its step in flight
# before it could undo it. One heartbeat request every few seconds per running step is cheap.
HEARTBEAT_THROTTLE = timedelta(seconds=3)


def build_worker(client, cfg: EagleConfig, region: str | None, executor: ThreadPoolExecutor) -> Worker:
    shield_thread_starts()  # a cancel must not land in a thread being started (workers/thread_start.py)
    if region:
        queue = cfg.region(region).temporal.task_queue
        return Worker(client, task_queue=queue, activities=regional_activities(cfg), activity_executor=executor,
                      graceful_shutdown_timeout=timedelta(seconds=15), identity=f"eagle-dr@{region}/{os.getpid()}",
                      interceptors=[ScrubSecrets()], max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE)
    return Worker(client, task_queue=cfg.temporal.control_task_queue, workflows=WORKFLOWS,
                  activities=control_activities(cfg), activity_executor=executor, workflow_runner=sandbox_runner(),
                  graceful_shutdown_timeout=timedelta(seconds=15), identity=f"eagle-dr@control/{os.getpid()}",
                  interceptors=[ScrubSecrets()], max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE, **versioning(cfg))


def versioning(cfg: EagleConfig) -> dict:
    """The control worker's Worker Versioning options (config.TemporalConfig.deployment_name).
    Regional workers run activities only, on their own queues, and stay unversioned."""
    name = cfg.temporal.deployment_name
    if not name:
        return {}
    from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
    from temporalio.worker import WorkerDeploymentConfig

    build_id = os.environ.get("EAGLE_DR_BUILD_ID", "").strip()
    if not build_id:
        raise ValueError(f"temporal.deployment_name is {name!r} (Worker Versioning on), but EAGLE_DR_BUILD_ID is not set: "
                         "the deploy must name the build (the image tag)")
    return {"deployment_config": WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(name, build_id), use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.AUTO_UPGRADE)}


def metrics_address(cfg: EagleConfig, region: str | None) -> str | None:
    """host:port of this worker's Prometheus endpoint, or None when the config gives it none."""
    port = cfg.region(region).temporal.metrics_port if region else cfg.temporal.metrics_port
    return f"{cfg.temporal.metrics_host}:{port}" if port else None


def log_started(log, client, task_queue: str, region: str | None) -> None:
    # Where the worker connected, so a worker polling the wrong cluster or namespace shows in its
    # first line; connection_summary keeps the API key and TLS key material out of it.
    log.info("worker.started", task_queue=task_queue, region=region or "control", **connection_summary(client))


async def serve(cfg: EagleConfig, region: str | None, pidfile: str | None = None) -> None:
    log = logs.get("worker")
    extra = {}
    if address := metrics_address(cfg, region):
        from eagle_dr.metrics import worker_runtime

        # The SDK's metrics and eagle-dr's (eagle_dr/metrics.py) on one endpoint: the client's
        # runtime is the worker's, so activities' and workflows' meters export through it.
        try:
            extra["runtime"] = worker_runtime(address)
            log.info("worker.metrics", endpoint=f"http://{address}/metrics")
        except Exception as e:  # noqa: BLE001 - metrics must never keep a worker from running runbooks
            # A taken port (a second worker of the region on this host, a stale exporter) costs
            # the metrics, loudly, never the worker: it may be the one a failover needs.
            log.error("worker.metrics_unavailable", endpoint=f"http://{address}/metrics", error=str(e))
    client = await connect(f"127.0.0.1:{cfg.lab.dev_server.grpc_port}", config=cfg, **extra)
    with ThreadPoolExecutor(max_workers=16) as executor:
        worker = build_worker(client, cfg, region, executor)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (log.info("worker.stopping", signal=s.name),
                                                        asyncio.ensure_future(worker.shutdown())))
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        log_started(log, client, worker.task_queue, region)
        watches = []
        if region and cfg.health.self_fence_after is not None:
            from workers.self_fence import SelfFence

            watches.append(asyncio.create_task(SelfFence(cfg, region, client).run()))
        if region:
            from activities.postgres.sessions import keep_warm

            # A session to the node ready for the steps inside a write outage (sessions.py).
            watches.append(asyncio.create_task(keep_warm(cfg.region(region).postgres)))
        try:
            await worker.run()
        finally:
            for w in watches:
                w.cancel()
        log.info("worker.stopped", task_queue=worker.task_queue)


def main(cfg: EagleConfig, region: str | None, pidfile: str | None = None) -> None:
    logs.configure("worker-" + (region or "control"))
    code = 0
    try:
        asyncio.run(serve(cfg, region, pidfile))
    except Exception as e:  # noqa: BLE001 - reported, then a non-zero exit
        logs.get("worker").error("worker.failed", error=str(e))
        code = 1
    # The SDK can crash at interpreter exit (sdk-python#300); leave without running finalizers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
