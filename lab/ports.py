"""A copy of the default config with every port moved, for a second lab beside the first
(the test suite's, a benchmark's), so it never collides with a running ``make lab``."""

from __future__ import annotations

from pathlib import Path

import yaml

from eagle_dr.config import DEFAULT_CONFIG

_PORT_KEYS = {"port", "s3_port", "s3_base_port", "grpc_port", "ui_port", "http_port", "metrics_port", "scratch_port",
              "alertmanager_port",
              "pgbackrest_port"}


def _shift(doc, shift: int):
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in _PORT_KEYS and isinstance(v, int):
                out[k] = v + shift
            elif k in ("endpoint_url", "ui_url") and isinstance(v, str):
                host, _, port = v.rpartition(":")
                out[k] = f"{host}:{int(port) + shift}"
            else:
                out[k] = _shift(v, shift)
        return out
    if isinstance(doc, list):
        return [_shift(v, shift) for v in doc]
    return doc


def write_shifted_config(directory: Path, shift: int, **overrides) -> Path:
    """Keep shifted ports below 32768: the kernel hands out ephemeral ports above it, and an
    outgoing connection can take a port a server is about to listen on."""
    doc = _shift(yaml.safe_load(DEFAULT_CONFIG.read_text()), shift)
    doc["lab"]["state_dir"] = str(directory / "state")
    doc.update(overrides)
    path = directory / "eagle-dr.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
