"""What each kind of worker runs.

Regional workers run the activities that touch their own region's disks and processes;
the control worker runs the workflows (the runbooks) and the activities that only talk to
APIs (Redis and PostgreSQL over the network, Kubernetes, DNS, the lab's routing). A
runbook reaches a region by scheduling on that region's queue.
"""

from __future__ import annotations

from activities.alert_probe import AlertProbeActivities
from activities.backup.activities import BackupActivities, RestoreActivities
from activities.backup.drill import RestoreDrillActivities
from activities.backup.readers import RepoReaderActivities
from activities.backup.redis import RedisBackupActivities
from activities.consistency.activities import ConsistencyActivities
from activities.failback import FailbackActivities
from activities.health import HealthActivities
from activities.lab_hooks import LabHooks
from activities.notify.activities import NotifyActivities
from activities.plan import PlanActivities
from activities.postgres.activities import PostgresActivities
from activities.readiness import ReadinessActivities
from activities.redis.activities import RedisActivities
from activities.split_brain import SplitBrainActivities
from activities.topology import TopologyActivities
from activities.traffic import TrafficActivities
from eagle_dr.config import EagleConfig
from workflows.alert_incident import AlertIncidentWorkflow
from workflows.archive_guard import ArchiveGuardWorkflow
from workflows.backup import BackupWorkflow
from workflows.consistency import ConsistencyCheckWorkflow
from workflows.data_sync import DataSyncWorkflow
from workflows.drill import DrillWorkflow
from workflows.dry_run import PlanWorkflow
from workflows.expire import ExpireWorkflow
from workflows.failback import FailbackWorkflow
from workflows.failover import FailoverWorkflow
from workflows.health import HealthCheckWorkflow
from workflows.monitor import MonitorWorkflow
from workflows.redis_snapshot import RedisSnapshotWorkflow
from workflows.repo_lock import RepoLockWorkflow
from workflows.restore_drill import RestoreDrillWorkflow
from workflows.restore import RestoreWorkflow
from workflows.split_brain import SplitBrainWorkflow
from workflows.switchover import SwitchoverWorkflow

WORKFLOWS = [HealthCheckWorkflow, MonitorWorkflow, FailoverWorkflow, SwitchoverWorkflow, FailbackWorkflow,
             DrillWorkflow, SplitBrainWorkflow, BackupWorkflow, RestoreWorkflow, ExpireWorkflow, RedisSnapshotWorkflow,
             ArchiveGuardWorkflow, RestoreDrillWorkflow, AlertIncidentWorkflow, PlanWorkflow,
             ConsistencyCheckWorkflow, DataSyncWorkflow, RepoLockWorkflow]


def _methods(obj, *names: str) -> list:
    return [getattr(obj, n) for n in names]


def _postgres(cfg: EagleConfig) -> list:
    return _methods(PostgresActivities(cfg), "postgres_status", "read_epoch", "read_highest_epoch", "fence_postgres", "unfence_postgres",
                    "promote_postgres", "record_epoch", "wait_replayed", "rejoin_as_standby",
                    "abort_promotion", "lift_postgres_stop_fence", "flush_init_forks", "reserve_rejoin_slots",
                    "drop_rejoin_slots", "promote_when_replayed")


def regional_activities(cfg: EagleConfig) -> list:
    return [*_methods(HealthActivities(cfg), "probe_region", "probe_regions_from_here"), *_postgres(cfg),
            *_methods(PostgresActivities(cfg), "measure_lost_wal", "lift_postgres_fence"),
            *_methods(FailbackActivities(cfg), "measure_divergence", "reconcile_diverged_rows", "rewind_old_primary",
                      "preserve_redis_and_rejoin"),
            *_methods(BackupActivities(cfg), "ensure_backup_config", "ensure_stanza", "take_backup",
                      "read_backup_catalog", "expire_backups", "guard_archive",
                      "wait_repo_writers_gone"),
            *_methods(RestoreActivities(cfg), "read_wal_gaps", "check_restore_target", "restore_scratch", "drop_scratch",
                      "find_left_copies", "drop_left_copies", "rebuild_standby", "undo_rebuild", "recover_rows", "restore_following_scratch"),
            # Restore mode verify: the scratch copy listens on its host only, so its side of the
            # comparison is read there, the primary's over the network.
            *_methods(ConsistencyActivities(cfg), "compare_table"),
            *_methods(RestoreDrillActivities(cfg), "check_backup_freshness", "scratch_checksums"),
            # The RDB file is on the master's disk: its region's worker uploads it.
            RedisBackupActivities(cfg).snapshot_redis,
            # On the primary's worker: its pg_wal's disk and its pgBackRest config are local there.
            ReadinessActivities(cfg).assess_readiness,
            # --plan: the rejoining node's data directory and pg_wal are read on its own host.
            PlanActivities(cfg).inspect_rejoin]


def control_activities(cfg: EagleConfig, config_path: str | None = None) -> list:
    # probe_regions_from_here on every worker: each is a vantage point for the monitor.
    acts = [TopologyActivities(cfg).describe_topology, SplitBrainActivities(cfg).detect_split_brain,
            HealthActivities(cfg).probe_regions_from_here, *_postgres(cfg),
            *_methods(RedisActivities(cfg), "fence_redis", "unfence_redis", "promote_redis", "switchover_redis",
                      "demote_redis"),
            *_methods(RedisBackupActivities(cfg), "find_redis_master", "prune_redis_snapshots"),
            # Temporal's visibility: which restores read the buckets (the expiry lock's check).
            *_methods(RepoReaderActivities(), "list_repo_readers", "wait_listed_as_reader",
                     "copies_in_use"),
            *_methods(TrafficActivities(cfg), "scale_down_region", "route_traffic", "wait_region_ready",
                      "verify_service"),
            # SQL on the primary over the network, as postgres_status.
            *_methods(RestoreDrillActivities(cfg), "read_archiver_state", "mark_consistent_point",
                      "wait_wal_archived"),
            # Both sides over the network: each range hashed on the primary and the standby at once.
            *_methods(ConsistencyActivities(cfg), "list_check_tables", "tables_on_one_side", "compare_table",
                      "compare_redis", "record_consistency_run", "read_consistency_run", "sync_table",
                      "check_synced_foreign_keys", "compare_audited_keys"),
            # Notifications go out from the control worker, beside the workflows that send them.
            NotifyActivities(cfg).send_notification,
            # --plan: where each routing mechanism points now (APIs only).
            PlanActivities(cfg).read_routing]
    if cfg.routing.lab_file:
        acts += _methods(LabHooks(cfg, config_path), "kill_region", "heal_region", "count_missing_acked_writes",
                         "client_outage")
        # The drill's alert -> workflow latency: through the lab's Alertmanager and receiver.
        acts.append(AlertProbeActivities(cfg).measure_alert_latency)
    return acts
