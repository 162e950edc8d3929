"""What each kind of worker runs.

Regional workers run the activities that touch their own region's disks and processes;
the control worker runs the workflows (the runbooks) and the activities that touch no
region in particular (DNS, ...). A runbook reaches a region by scheduling on its queue.
"""

from __future__ import annotations

from activities.health import HealthActivities
from eagle_dr.config import EagleConfig
from workflows.health import HealthCheckWorkflow

WORKFLOWS = [HealthCheckWorkflow]


def regional_activities(cfg: EagleConfig) -> list:
    health = HealthActivities(cfg)
    return [health.probe_region]


def control_activities(cfg: EagleConfig) -> list:
    return []
