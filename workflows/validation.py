"""Validating runbook input inside the workflow.

Input typed into the Temporal UI is arbitrary JSON. Had the run method declared the
pydantic model, a bad document would fail in the data converter, i.e. as a workflow *task*
failure that Temporal retries forever. Declaring a plain mapping and validating here turns
it into a non-retryable ApplicationError that names the field and the reason, at once.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio.exceptions import ApplicationError

M = TypeVar("M", bound=BaseModel)

# What a run method declares. Any, not dict: with dict a non-object (a bare string typed
# into the UI) would again fail in the converter and retry forever.
RawInput = Any


def invalid(field: str, reason: str) -> ApplicationError:
    return ApplicationError(f"invalid input: {field}: {reason}", {"field": field, "reason": reason},
                            type="InvalidInput", non_retryable=True)


def validated(model: type[M], raw: Any) -> M:
    if isinstance(raw, model):
        return raw
    if not isinstance(raw, dict):
        raise invalid("(input)", f"expected a JSON object for {model.__name__}, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(input)"
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            reason = "unknown field"
        raise invalid(field, reason) from None
