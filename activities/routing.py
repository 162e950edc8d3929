"""Where traffic goes: the active region.

In production the active region is the ``active.region`` key of the Kubernetes ConfigMap
``multi-region-config`` (plus DNS); in the lab it is a small JSON file that the sample app
follows. Both sit behind the same two calls so runbooks don't care which one they move.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol


class StaleEpoch(RuntimeError):
    """A runbook with an older DR epoch tried to move routing: it has been superseded."""


class Router(Protocol):
    def active_region(self) -> str | None: ...

    def set_active_region(self, region: str, epoch: int | None = None) -> bool: ...


class LabRouter:
    """The lab's routing: ``<state_dir>/routing.json``, replaced atomically."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / "routing.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def active_region(self) -> str | None:
        return self.read().get("active_region")

    def set_active_region(self, region: str, epoch: int | None = None) -> bool:
        current = self.read()
        if epoch is not None and current.get("epoch") is not None and epoch < current["epoch"]:
            raise StaleEpoch(f"routing is at epoch {current['epoch']}, refusing epoch {epoch}")
        if current.get("active_region") == region and (epoch is None or current.get("epoch") == epoch):
            return False
        doc = {"active_region": region, "epoch": epoch if epoch is not None else current.get("epoch")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)
        return True
