"""How eagle-dr talks to Temporal: one place for the connection, the data converter and
the custom search attributes.

Connection settings come from ``temporalio.envconfig`` (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
TEMPORAL_API_KEY, TEMPORAL_TLS*, TEMPORAL_PROFILE, the shared temporal.toml), so the same code
runs against the lab's dev server, a self-hosted cluster or Temporal Cloud.
"""

from __future__ import annotations

import os
import shutil
import sysconfig

from temporalio.common import SearchAttributeKey

# Custom search attributes: what an operator filters on in the UI
# (e.g. `DrRunbook = "failover" AND DrOutcome = "failed"`).
DR_RUNBOOK = SearchAttributeKey.for_keyword("DrRunbook")
DR_SERVICE = SearchAttributeKey.for_keyword("DrService")
DR_SOURCE_REGION = SearchAttributeKey.for_keyword("DrSourceRegion")
DR_TARGET_REGION = SearchAttributeKey.for_keyword("DrTargetRegion")
DR_TRIGGER = SearchAttributeKey.for_keyword("DrTrigger")
DR_OUTCOME = SearchAttributeKey.for_keyword("DrOutcome")
DR_EPOCH = SearchAttributeKey.for_int("DrEpoch")
# Backups and restores: which backup, of what type, in whose bucket, how big, how long.
DR_BACKUP_TYPE = SearchAttributeKey.for_keyword("DrBackupType")
DR_BACKUP_LABEL = SearchAttributeKey.for_keyword_list("DrBackupLabel")
DR_BACKUP_REPO = SearchAttributeKey.for_keyword_list("DrBackupRepo")
DR_BACKUP_BYTES = SearchAttributeKey.for_int("DrBackupBytes")
DR_BACKUP_WAL = SearchAttributeKey.for_keyword("DrBackupWal")
DR_BACKUP_SECONDS = SearchAttributeKey.for_float("DrBackupSeconds")
# Restore drills: the backup RTO (restore + replay) and RPO (seconds since the newest archived WAL).
DR_RESTORE_SECONDS = SearchAttributeKey.for_float("DrRestoreSeconds")
DR_RPO_SECONDS = SearchAttributeKey.for_float("DrRpoSeconds")
# Consistency checks: how many differing keys (PostgreSQL rows + Redis keys), and in which tables.
DR_CHECK_DIFFERENCES = SearchAttributeKey.for_int("DrCheckDifferences")
DR_CHECK_TABLES = SearchAttributeKey.for_keyword_list("DrCheckTables")

SEARCH_ATTRIBUTES = [DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER, DR_OUTCOME, DR_EPOCH,
                     DR_BACKUP_TYPE, DR_BACKUP_LABEL, DR_BACKUP_REPO, DR_BACKUP_BYTES, DR_BACKUP_WAL,
                     DR_BACKUP_SECONDS, DR_RESTORE_SECONDS, DR_RPO_SECONDS, DR_CHECK_DIFFERENCES, DR_CHECK_TABLES]


def search_attribute_flags() -> list[str]:
    """``--search-attribute Name=Type`` arguments for ``temporal server start-dev``."""
    types = {"KEYWORD": "Keyword", "INT": "Int", "TEXT": "Text", "BOOL": "Bool", "DOUBLE": "Double",
             "KEYWORD_LIST": "KeywordList", "DATETIME": "Datetime"}
    out = []
    for key in SEARCH_ATTRIBUTES:
        out += ["--search-attribute", f"{key.name}={types[key.indexed_value_type.name.removeprefix('INDEXED_VALUE_TYPE_')]}"]
    return out


def find_bin(name: str) -> str | None:
    """The '-bin' wheels drop their executable into the environment's scripts directory."""
    p = os.path.join(sysconfig.get_path("scripts"), name)
    return p if os.path.exists(p) else shutil.which(name)


def connect_config(default_address: str | None = None) -> dict:
    from temporalio.envconfig import ClientConfig

    cfg = ClientConfig.load_client_connect_config()
    if default_address:
        cfg.setdefault("target_host", default_address)
    return cfg


def connection_summary(client) -> dict:
    """What a log line may say about a client's connection: where, which namespace, which TLS
    mode and whether an API key is set. Never the key itself, and never the TLS config (its
    repr carries the client's private key bytes)."""
    config = client.service_client.config
    tls = config.tls
    mode = "off" if not tls else ("mtls" if getattr(tls, "client_cert", None) else "on")
    return {"address": config.target_host, "namespace": client.namespace, "tls": mode,
            "api_key": "set" if config.api_key else "none"}


def data_converter(config=None):
    """The pydantic data converter, with the payload codec ``temporal.codec`` asks for.

    Every client eagle-dr makes (workers, CLI, alerts receiver, schedules, the monitor) comes
    through here, so none of them writes a payload in plain text when encryption is on, and
    all of them read what the others wrote. ``config``: the loaded config (default: the one
    ``EAGLE_DR_CONFIG`` names, as the CLI sets it)."""
    import dataclasses

    from temporalio.contrib.pydantic import pydantic_data_converter

    from eagle_dr.codec import codec_from_config
    from eagle_dr.config import load_config

    cfg = config if config is not None else load_config()
    codec = codec_from_config(cfg.temporal.codec)
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


async def connect(default_address: str | None = None, *, config=None, **kwargs):
    """A client with the pydantic data converter (and the config's payload codec), connection
    settings from the environment."""
    from temporalio.client import Client

    cfg = connect_config(default_address)
    cfg.update(kwargs)
    if "data_converter" not in cfg:
        cfg["data_converter"] = data_converter(config)
    return await Client.connect(**cfg)


async def poller_ages(client, queue: str, *, workflow: bool) -> dict[str, float]:
    """Each worker the server lists as a recent poller of ``queue`` (its workflow or activity
    tasks): identity -> seconds since its last poll. Raises what the call raises."""
    from datetime import datetime, timezone

    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    kind = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW if workflow else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind))
    now = datetime.now(timezone.utc)
    return {p.identity: (now - p.last_access_time.ToDatetime(timezone.utc)).total_seconds() for p in resp.pollers}


async def move_running(address: str, service: str, config=None) -> bool | None:
    """Whether a runbook holds ``dr-move-<service>`` now: True, False, or None when Temporal
    cannot say (down, unreachable). Callers treat None as "maybe": ``status`` claims no
    leftovers and ``unfence`` refuses, since a running move owns its fences."""
    import asyncio

    from temporalio.client import WorkflowExecutionStatus
    from temporalio.service import RPCError, RPCStatusCode

    try:
        client = await asyncio.wait_for(connect(address, config=config), 5)
        desc = await client.get_workflow_handle(f"dr-move-{service}").describe()
    except RPCError as e:
        return False if e.status == RPCStatusCode.NOT_FOUND else None
    except Exception:  # noqa: BLE001 - Temporal down: unknown, and no leftovers are claimed
        return None
    return desc.status == WorkflowExecutionStatus.RUNNING
