"""From a notification to incidents: which rule each alert matches, which workflow records
it, and what that workflow starts.

An incident is (rule, Alertmanager group key): its workflow id is derived from both, so every
retry, repeat or concurrent post of the same group reaches the same workflow run, and the
alerts of one notification that match different rules go to one incident per rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from eagle_dr.config import AlertRule, EagleConfig, UnknownRegion
from eagle_dr.monitor import monitor_input
from alerts.payload import Notification
from workflows.alert_incident import SIGNAL_CHUNK, ActionSpec, AlertBatch, AlertRecord, IncidentInput
from workflows.runbook import monitor_id, move_id

UNMATCHED = "unmatched"


@dataclass
class Incident:
    rule: str
    workflow_id: str
    input: IncidentInput
    alerts: list[AlertRecord]

    def batches(self) -> list[AlertBatch]:
        """The alerts in signals of SIGNAL_CHUNK, the firing ones first. The incident closes
        after a signal that leaves none of its alerts firing: a first chunk of resolved alerts
        closed it before the next chunk's firing ones arrived, and those opened a new incident,
        which acted again (a second failover request, say)."""
        ordered = sorted(self.alerts, key=lambda a: a.status != "firing")  # stable: firing, then resolved
        return [AlertBatch(alerts=ordered[i:i + SIGNAL_CHUNK]) for i in range(0, len(ordered), SIGNAL_CHUNK)]


def incident_id(service: str, rule: str, group_key: str) -> str:
    # The group key is Alertmanager's route path and group labels: hashed, it is id-safe and short.
    digest = hashlib.sha256(f"{rule}\n{group_key}".encode()).hexdigest()[:16]
    return f"dr-alert-{service}-{rule}-{digest}"


def _action(cfg: EagleConfig, rule: AlertRule | None, labels: list[dict[str, str]]) -> ActionSpec:
    """``labels``: each firing alert's (with the group's), else the first alert's alone."""
    if rule is None or rule.action == "record":
        return ActionSpec(kind="record")
    queue = cfg.temporal.control_task_queue
    approval = {"required": True, "timeout_seconds": rule.approval_timeout.total_seconds()}
    if rule.action == "monitor":
        # The config's whole health section, as `eagle-dr monitor start` gives it: a monitor an
        # alert started holds the fixed id, so a later start finds it running and changes
        # nothing; started with three fields, it ran without automatic failover, readiness
        # checks or fast confirmation until someone stopped it.
        return ActionSpec(kind="monitor", workflow="MonitorWorkflow", workflow_id=monitor_id(cfg.service),
                          task_queue=queue, input=monitor_input(cfg).model_dump(mode="json", exclude_none=True))
    if rule.action == "split-brain":
        return ActionSpec(kind="split-brain", workflow="SplitBrainWorkflow", workflow_id=move_id(cfg.service),
                          task_queue=queue, input={"service": cfg.service, "trigger": "alert", "approval": approval})
    target = rule.target_region
    if target is None:
        named = sorted({x[rule.region_label] for x in labels if x.get(rule.region_label)})
        if len(named) > 1:
            # A group not grouped by region: which one failed is not for the receiver to guess.
            return ActionSpec(kind="failover", refused=f"failover not started: the firing alerts name more than "
                                                       f"one region in {rule.region_label!r} ({', '.join(named)})")
        down = named[0] if named else None
        if not down:
            return ActionSpec(kind="failover", refused=f"failover not started: the alert has no "
                                                       f"{rule.region_label!r} label naming the failed region")
        try:
            target = cfg.other(down).name
        except UnknownRegion:
            return ActionSpec(kind="failover", refused=f"failover not started: {rule.region_label}={down!r} is "
                                                       "not a configured region")
    return ActionSpec(kind="failover", workflow="FailoverWorkflow", workflow_id=move_id(cfg.service),
                      task_queue=queue, input={"service": cfg.service, "target_region": target, "trigger": "alert",
                                               "approval": approval})


def plan(cfg: EagleConfig, n: Notification) -> tuple[list[Incident], int]:
    """The incidents of one notification, and how many alerts no rule took (ignored)."""
    by_rule: dict[str, tuple[AlertRule | None, list[AlertRecord], dict[str, str]]] = {}
    ignored = 0
    for a in n.alerts:
        rule = cfg.alerts.rule_for(a.labels)
        if rule is None and cfg.alerts.unmatched == "ignore":
            ignored += 1
            continue
        name = rule.name if rule else UNMATCHED
        rec = AlertRecord(fingerprint=a.fingerprint, status=a.status, labels=a.labels, starts_at=a.startsAt,
                          ends_at=a.ends)
        entry = by_rule.setdefault(name, (rule, [], []))
        entry[1].append(rec)
        entry[2].append((a.status, {**a.labels, **n.groupLabels}))
    out = []
    for name, (rule, records, labelled) in by_rule.items():
        wid = incident_id(cfg.service, name, n.groupKey)
        # What the action is taken on: the firing alerts. A resolved one (the other region's,
        # in a group not grouped by region) named the failover's target when it came first.
        firing = [x for status, x in labelled if status == "firing"] or [labelled[0][1]]
        out.append(Incident(rule=name, workflow_id=wid, alerts=records, input=IncidentInput(
            service=cfg.service, rule=name, group_key=n.groupKey, group_labels=n.groupLabels,
            action=_action(cfg, rule, firing))))
    return out, ignored
