"""Alertmanager's webhook payload, version 4, as it arrives.

Only what eagle-dr acts on is required (version, status, groupKey, and per alert its status,
labels, startsAt and fingerprint); fields Alertmanager adds later are ignored. A document
that is not usable is refused with the JSON path of the first bad field
(``alerts[3].startsAt: ...``): Alertmanager does not retry a 400 within a flush, so the
message is what an operator reads in its log.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Alertmanager's "no end yet": the zero time of Go.
_GO_ZERO_YEAR = 1


class Malformed(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: datetime
    endsAt: datetime | None = None
    fingerprint: str = Field(min_length=1)

    @field_validator("startsAt", "endsAt")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must carry a time zone (RFC 3339)")
        return v

    @property
    def ends(self) -> datetime | None:
        return None if self.endsAt is None or self.endsAt.year <= _GO_ZERO_YEAR else self.endsAt


class Notification(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupKey: str = Field(min_length=1)
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    truncatedAlerts: int = 0
    externalURL: str = ""
    alerts: list[Alert] = Field(min_length=1)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def parse(body: bytes) -> Notification:
    """The notification in ``body``, or ``Malformed`` naming the field."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Malformed("(body)", f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise Malformed("(body)", f"expected a JSON object, got {type(doc).__name__}")
    try:
        return Notification.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        raise Malformed(_path(first["loc"]) or "(body)", first["msg"].removeprefix("Value error, ")) from None
