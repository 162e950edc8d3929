"""structlog set-up: JSON in production, readable in a terminal.

Every line carries the Temporal workflow id, run id and activity type when it is emitted
from inside a workflow or an activity, so one ``grep <workflow id>`` over every worker's
log tells the whole story of a runbook run.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def _temporal_context(_logger, _name, event_dict):
    # Imported lazily: this processor runs inside the workflow sandbox as well.
    from temporalio import activity, workflow

    try:
        info = activity.info()
    except Exception:  # not in an activity
        info = None
    if info is not None:
        event_dict.setdefault("workflow_id", info.workflow_id)
        event_dict.setdefault("run_id", info.workflow_run_id)
        event_dict.setdefault("activity", info.activity_type)
        event_dict.setdefault("attempt", info.attempt)
        return event_dict
    try:
        winfo = workflow.info()
    except Exception:  # not in a workflow either
        return event_dict
    event_dict.setdefault("workflow_id", winfo.workflow_id)
    event_dict.setdefault("run_id", winfo.run_id)
    event_dict.setdefault("workflow", winfo.workflow_type)
    return event_dict


def configure(component: str, fmt: str | None = None, level: str | None = None) -> None:
    """``fmt`` is 'json' or 'console'; default: console on a TTY, JSON otherwise
    (overridable with EAGLE_DR_LOG_FORMAT)."""
    fmt = fmt or os.environ.get("EAGLE_DR_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    level_no = logging.getLevelName((level or os.environ.get("EAGLE_DR_LOG_LEVEL") or "INFO").upper())
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _temporal_context,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(component=component)
    # The SDK's own stdlib logging goes to the same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


def get(name: str | None = None):
    return structlog.get_logger(name)
