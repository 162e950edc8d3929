"""Health check: ask every region's own worker how its databases are.

A region whose worker does not pick the probe up within the schedule-to-start timeout is
reported as unreachable instead of blocking the check: a dead region must not stall the
workflow that is meant to notice it.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, RegionHealth
    from eagle_dr.temporal import DR_OUTCOME, DR_RUNBOOK, DR_SERVICE
    from workflows.validation import RawInput, invalid, validated


class RegionTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    task_queue: str = Field(min_length=1)


class HealthCheckInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = "eagle-alert"
    regions: list[RegionTarget]
    probe_timeout_seconds: float = Field(default=30, gt=0, le=600)


class RegionVerdict(BaseModel):
    region: str
    healthy: bool
    reason: str | None = None
    detail: RegionHealth | None = None


class HealthCheckResult(BaseModel):
    regions: list[RegionVerdict]

    @property
    def healthy(self) -> bool:
        return all(r.healthy for r in self.regions)


@workflow.defn
class HealthCheckWorkflow:
    @workflow.run
    async def run(self, raw: RawInput) -> HealthCheckResult:
        inp = validated(HealthCheckInput, raw)
        if not inp.regions:
            raise invalid("regions", "at least one region is required")
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("health-check"), DR_SERVICE.value_set(inp.service)])
        verdicts = []
        for target in inp.regions:
            workflow.set_current_details(f"Probing **{target.name}** on `{target.task_queue}`")
            try:
                health = await workflow.execute_activity_method(
                    HealthActivities.probe_region, target.name, task_queue=target.task_queue,
                    schedule_to_start_timeout=timedelta(seconds=inp.probe_timeout_seconds),
                    start_to_close_timeout=timedelta(seconds=inp.probe_timeout_seconds),
                    retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=timedelta(seconds=1)),
                )
            except ActivityError as e:
                verdicts.append(RegionVerdict(region=target.name, healthy=False,
                                              reason=f"worker did not answer: {e.cause or e}"))
                continue
            problems = []
            if not health.postgres.reachable:
                problems.append(f"postgres: {health.postgres.error}")
            if not health.redis.reachable:
                problems.append(f"redis: {health.redis.error}")
            verdicts.append(RegionVerdict(region=target.name, healthy=not problems,
                                          reason="; ".join(problems) or None, detail=health))
        result = HealthCheckResult(regions=verdicts)
        workflow.upsert_search_attributes([DR_OUTCOME.value_set("healthy" if result.healthy else "unhealthy")])
        workflow.set_current_details(
            "\n".join(f"- {v.region}: {'healthy' if v.healthy else 'UNHEALTHY: ' + (v.reason or '')}" for v in verdicts))
        return result
