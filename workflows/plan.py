"""A runbook's plan: what it would do now, step by step, from its own preflight's readings.

Built by pure functions from what the runbooks' preflight activities return, so the same
plan is printed by ``--plan`` (workflows/dry_run.py gathers the readings, changing nothing)
and shown at a runbook's approval gate (the runbook passes what its own preflight read).
A plan never decides differently from its runbook: the guards it reports are the
runbooks' own functions (failover.lag_guard, switchover's checks), called on the same data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.plan import RejoinView, RoutingView

Runbook = Literal["failover", "switchover", "failback", "split-brain", "restore"]


class PlanStep(BaseModel):
    action: str
    detail: str = ""


class Plan(BaseModel):
    runbook: Runbook
    service: str
    # The runbook would refuse now (its preflight's own error): why. None: it would proceed.
    blocked: str | None = None
    source_region: str | None = None
    target_region: str | None = None
    # Which node is fenced, and how; which is promoted.
    fence: str | None = None
    promote: str | None = None
    # The lag now and the runbook's guard (RPO it accepts, in WAL bytes).
    lag_bytes: int | None = None
    lag_basis: str = ""
    max_lag_bytes: int | None = None
    # Each routing mechanism: "lab: a -> b", "already b".
    routing: list[str] = []
    # Failback / split brain: pg_rewind or re-clone, and why; the fork; what would be reconciled.
    rewind: str | None = None
    reconcile: str | None = None
    steps: list[PlanStep] = []
    notes: list[str] = []

    def summary(self) -> str:
        """Plain text, one line per step: the CLI prints it and the approval gate shows it."""
        head = f"PLAN {self.runbook} {self.service}" + (
            f": {self.source_region} -> {self.target_region}" if self.source_region or self.target_region else "")
        lines = [head]
        if self.blocked:
            lines.append(f"WOULD REFUSE: {self.blocked}")
        if self.lag_bytes is not None or self.max_lag_bytes is not None:
            lines.append(f"lag now: {_bytes(self.lag_bytes)} ({self.lag_basis}); accepts up to "
                         f"{_bytes(self.max_lag_bytes)}")
        lines += [f"{i}. {s.action}" + (f": {s.detail}" if s.detail else "") for i, s in enumerate(self.steps, 1)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bytes(n: int | None) -> str:
    return "unknown" if n is None else f"{n} bytes"


def routing_changes(target: str, routing: RoutingView | None) -> list[str]:
    """What route_traffic would change for ``target``, per mechanism."""
    if routing is None:
        return [f"every configured mechanism (lab file, ConfigMap, DNS) -> {target}"]
    out = [f"{m}: already {target}" if now == target else f"{m}: {now or 'unset'} -> {target}"
           for m, now in routing.mechanisms.items()]
    out += [f"{u}: unreachable now (the runbook retries it)" for u in routing.unreachable]
    return out or ["no routing mechanism configured"]


def _route_step(target: str, routing: RoutingView | None) -> PlanStep:
    return PlanStep(action=f"route traffic to {target}", detail="; ".join(routing_changes(target, routing)))


def failover_plan(service: str, source: str, target: str, *, source_worker: bool, lag: int | None, basis: str,
                  max_lag_bytes: int, force: bool, routing: RoutingView | None = None,
                  blocked: str | None = None) -> Plan:
    how = (f"stop {source}'s PostgreSQL on its own worker (stop fence: standby.signal, no upstream)"
           if source_worker else
           f"{source}'s worker did not answer: read-only fence over the network; if unreachable it stays "
           "UNFENCED and must stay down until failback")
    fence = f"{how}; pause {source}'s Redis writes; scale {source}'s services to 0"
    promote = f"{target}'s PostgreSQL (pg_promote), record the new epoch; {target}'s Redis REPLICAOF NO ONE"
    return Plan(runbook="failover", service=service, blocked=blocked, source_region=source, target_region=target,
                fence=fence, promote=promote, lag_bytes=lag, lag_basis=basis,
                max_lag_bytes=None if force else max_lag_bytes, routing=routing_changes(target, routing), steps=[
                    PlanStep(action="take the next DR epoch", detail=f"read on {target}"),
                    PlanStep(action=f"fence {source}", detail=fence),
                    PlanStep(action=f"promote {target}", detail=promote),
                    _route_step(target, routing),
                    PlanStep(action=f"verify a write and read in {target}, measure RTO/RPO")],
                notes=["forced: any lag is accepted (data loss)"] if force else [])


def switchover_plan(service: str, source: str, target: str, *, lag: int | None, max_lag_bytes: int,
                    routing: RoutingView | None = None, blocked: str | None = None) -> Plan:
    fence = f"{source}'s PostgreSQL read-only, then stopped cleanly (its shutdown checkpoint is its last record)"
    promote = (f"{target}'s PostgreSQL once it replayed past that checkpoint; Redis switched {source} -> {target} "
               "with writes paused until the replica has every byte")
    return Plan(runbook="switchover", service=service, blocked=blocked, source_region=source, target_region=target,
                fence=fence, promote=promote, lag_bytes=lag, lag_basis="source LSN - target replayed LSN",
                max_lag_bytes=max_lag_bytes, routing=routing_changes(target, routing), steps=[
                    PlanStep(action="take the next DR epoch", detail=f"read on {source}"),
                    PlanStep(action=f"stop writes on {source}", detail=fence),
                    PlanStep(action=f"wait for {target} to replay everything", detail="zero data loss, proven"),
                    PlanStep(action=f"promote {target}", detail=promote),
                    _route_step(target, routing),
                    PlanStep(action=f"scale {source}'s services to 0, verify in {target}"),
                    PlanStep(action=f"{source} becomes a standby of {target}",
                             detail="no rewind: it stopped before the fork")],
                notes=["the lag guard bounds the write pause, not data loss: a switchover loses nothing"])


def rejoin_lines(region: str, primary: str, view: RejoinView | None) -> tuple[str, str, list[str]]:
    """(rewind, reconcile, notes) for bringing ``region`` back under ``primary``."""
    if view is None:
        return (f"pg_rewind {region} onto {primary} (pg_basebackup if impossible)",
                f"{region}'s post-fork rows, per table strategy, into {primary}", [])
    if view.rewind_possible is None:
        rewind = f"pg_rewind {region} onto {primary} (its settings could not be read: pg_basebackup if impossible)"
    elif view.rewind_possible:
        why = "wal_log_hints on" if view.wal_log_hints else "data checksums on"
        rewind = f"pg_rewind {region} onto {primary}'s timeline {view.primary_timeline} ({why})"
    else:
        rewind = (f"RE-CLONE {region} with pg_basebackup from {primary}: pg_rewind impossible (wal_log_hints off "
                  "and no data checksums)")
    if view.fork_lsn:
        rewind += f"; fork at {view.fork_lsn} (timeline {view.timeline} -> {view.primary_timeline})"
    if view.lost_commits is None:
        reconcile = f"{region}'s post-fork rows, per table strategy, into {primary} (its post-fork WAL unread now)"
    else:
        reconcile = (f"{view.lost_commits} commits ({_bytes(view.lost_bytes)}, {view.changed_relation_files} "
                     f"relation files) {region} wrote after the fork, decided per table strategy and applied to "
                     f"{primary}, every conflict audited")
        if view.changed_tables or view.unnamed_files:
            # From the WAL: what was written, per table. Which rows win is decided against the
            # loser started isolated, which a plan must not do.
            per = [f"{t} ({', '.join(f'{k} {n}' for k, n in sorted(ops.items()))})"
                   for t, ops in sorted(view.changed_tables.items())]
            if view.unnamed_files:
                per.append(f"{view.unnamed_files} relation file(s) {view.names_from or 'no'} catalog names "
                           "(a table made after the fork?)")
            reconcile += f"; rows written after the fork: {'; '.join(per)}"
        if view.lost_commits:
            reconcile += ("; which rows win is decided once it is stopped (with --require-approval the "
                          "counts are shown before anything is written)")
    return rewind, reconcile, list(view.notes)


def verify_step(rejoined: str, survivor: str, verify: str, reconciled: bool = True) -> PlanStep:
    """The rejoined node's data check, as verify_divergence / verify_by_data will run it."""
    if verify == "divergence" and reconciled:
        return PlanStep(action=f"verify the reconciled keys on {rejoined} against {survivor}",
                        detail="every key the reconcile audits, on both sides; a difference checks every table")
    return PlanStep(action=f"verify {rejoined}'s data against {survivor}", detail="every row of every table")


def failback_plan(service: str, region: str, primary: str, *, role: str | None, streaming_from: str | None,
                  switch_back: bool, view: RejoinView | None = None, routing: RoutingView | None = None,
                  blocked: str | None = None, verify: str = "divergence") -> Plan:
    steps: list[PlanStep] = []
    rewind = reconcile = fence = None
    notes: list[str] = []
    if streaming_from:
        steps.append(PlanStep(action=f"skip PostgreSQL: {region} already streams from {streaming_from}"))
    else:
        fence = f"stop {region}'s PostgreSQL (it is {role or 'down'}) and keep it fenced until its writes are kept"
        rewind, reconcile, notes = rejoin_lines(region, primary, view)
        steps += [PlanStep(action=f"stop {region}", detail=fence),
                  PlanStep(action=f"measure what {region} wrote after the fork", detail="pg_waldump of its WAL"),
                  PlanStep(action=f"reconcile into {primary}", detail=reconcile),
                  PlanStep(action=f"rewind {region} into a standby of {primary}", detail=rewind)]
    steps.append(PlanStep(action=f"Redis: snapshot {region}'s to S3, copy the keys only it has, REPLICAOF {primary}"))
    steps.append(verify_step(region, primary, verify, reconciled=not streaming_from))
    if switch_back:
        steps += [PlanStep(action=f"switch over back to {region}", detail=f"a zero-loss switchover {primary} -> "
                                                                           f"{region} once it caught up"),
                  _route_step(region, routing)]
    return Plan(runbook="failback", service=service, blocked=blocked, source_region=primary, target_region=region,
                fence=fence, promote=f"{region} (by the switch back)" if switch_back else None,
                routing=routing_changes(region, routing) if switch_back else [], rewind=rewind, reconcile=reconcile,
                steps=steps, notes=notes)


def split_brain_plan(service: str, *, findings: list[str], survivor: str | None, loser: str | None, why: str,
                     epoch: int | None, pg_split: bool, redis_split: bool, view: RejoinView | None = None,
                     routing: RoutingView | None = None, blocked: str | None = None,
                     verify: str = "divergence", unseen: str | None = None,
                     fenced_notes: list[str] | None = None) -> Plan:
    if not findings:
        # As the runbook ends: "unknown" while a node did not answer, never "no split brain".
        action = "nothing: split brain unknown (a node did not answer; see the notes)" if unseen else \
            "nothing: no split brain (no second writable primary or Redis master, routing agrees)"
        return Plan(runbook="split-brain", service=service, blocked=blocked, steps=[PlanStep(action=action)],
                    notes=([unseen] if unseen else []) + list(fenced_notes or []))
    fence = ", ".join(
        ([f"{loser}'s PostgreSQL read-only over the network (stopped on its worker if that fails)"] if pg_split else [])
        + ([f"{loser}'s Redis writes paused"] if redis_split else []) + [f"{loser}'s services scaled to 0"])
    steps = [PlanStep(action=f"{survivor} survives", detail=f"{why}; epoch {epoch}"),
             PlanStep(action=f"fence {loser}", detail=fence),
             _route_step(survivor, routing)]
    rewind = reconcile = None
    notes: list[str] = []
    if redis_split:
        steps.append(PlanStep(action=f"Redis: snapshot {loser}'s to S3, copy the keys only it has, REPLICAOF "
                                     f"{survivor}"))
    if pg_split:
        rewind, reconcile, notes = rejoin_lines(loser, survivor, view)
        steps += [PlanStep(action=f"reconcile into {survivor}", detail=reconcile),
                  PlanStep(action=f"rewind {loser} into a standby of {survivor}", detail=rewind),
                  verify_step(str(loser), str(survivor), verify)]
    steps.append(PlanStep(action="verify one primary, one master, routing on " + str(survivor)))
    return Plan(runbook="split-brain", service=service, blocked=blocked, source_region=loser, target_region=survivor,
                fence=fence, promote=f"{survivor} stays primary" + ("" if pg_split else "; its Redis becomes master"),
                routing=routing_changes(survivor, routing), rewind=rewind, reconcile=reconcile, steps=steps,
                notes=["findings: " + "; ".join(findings), *notes])


def restore_plan(service: str, mode: str, region: str, repo: str, *, target: str, backup: str | None,
                 oldest: str | None, fell_back: str | None, primary: str | None, tables: list[str],
                 keep_minutes: float, blocked: str | None = None) -> Plan:
    source = f"{repo}'s bucket (backups {oldest or '?'} .. {backup or '?'})"
    notes = [f"falls back to {repo}'s bucket: {fell_back}"] if fell_back else []
    if mode == "rebuild-standby":
        steps = [PlanStep(action=f"replace {region}'s PostgreSQL data directory",
                          detail=f"newest backup {backup or '?'} from {source}; the old directory kept aside until "
                                 "the new one streams"),
                 PlanStep(action=f"{region} streams from {primary}")]
        return Plan(runbook="restore", service=service, blocked=blocked, source_region=repo,
                    target_region=f"{region}'s standby", steps=steps, notes=notes)
    if mode == "verify":
        primary = primary or "the primary (none answers now)"
        steps = [PlanStep(action=f"restore the newest backup into a scratch hot standby on {region}",
                          detail=f"from {source}; a new cluster, nothing live touched"),
                 PlanStep(action="replay the archive alone to the primary's newest archived segment",
                          detail="a segment missing from the bucket fails the run (ArchiveGap)"),
                 PlanStep(action=f"stream from {primary} (no slot) and compare every table with it, key by key",
                          detail="as a standby: each range at one LSN on both sides"),
                 PlanStep(action="stop and delete the scratch instance")]
        return Plan(runbook="restore", service=service, blocked=blocked, source_region=repo,
                    target_region=f"a copy on {region}, following {primary}", steps=steps, notes=notes)
    steps = [PlanStep(action=f"restore into a scratch instance on {region}",
                      detail=f"to {target} from {source}; a new cluster, nothing live touched")]
    if mode == "recover-rows":
        steps += [PlanStep(action=f"decide the copy's rows against {primary}", detail=", ".join(tables)),
                  PlanStep(action=f"write them to {primary} after approval", detail="counts and a sample at the "
                                                                                   "approval gate; audited")]
        target_region = f"{primary} (rows from a copy on {region})"
    else:
        steps.append(PlanStep(action=f"keep it {keep_minutes:g} minutes (or until released)"))
        target_region = f"scratch on {region}"
    steps.append(PlanStep(action="stop and delete the scratch instance"))
    return Plan(runbook="restore", service=service, blocked=blocked, source_region=repo, target_region=target_region,
                steps=steps, notes=notes)
