"""Render a kustomization (deploy/overlays/<region>) without a kustomize binary.

``eagle-dr deploy`` runs where kubectl may not be installed (an operator's laptop, a CI image), so
it renders the overlay itself. This is not kustomize: it implements exactly the features the
manifests in deploy/ use, and refuses any other key, so a manifest change that needs more fails
loudly instead of rendering wrong. tests/test_deploy.py compares its output with
``kubectl kustomize`` object for object wherever kubectl exists.

Supported: ``resources`` (files, or directories holding a kustomization), ``namespace``,
``labels`` (``pairs`` on metadata.labels only: no selectors, no templates), ``configMapGenerator``
(``files``, with kustomize's name hash and the references to it rewritten) and ``patches``
(inline JSON 6902 with a ``target`` of kind and name).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator", "patches"}
# Kinds that live in no namespace (the only cluster-scoped kinds a kustomization here could hold).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(ValueError):
    pass


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects the kustomization in ``directory`` produces, in resource order."""
    objs, _ = _build(Path(directory))
    return objs


def _build(d: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Objects plus the generated ConfigMaps' renames (name -> name-hash) for reference fixing."""
    path = d / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{d}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{path}: unsupported kustomize keys {sorted(unknown)} (see eagle_dr/kustomize.py)")
    objs: list[dict[str, Any]] = []
    renames: dict[str, str] = {}
    for res in k.get("resources") or []:
        p = (d / res).resolve()
        if p.is_dir():
            sub, sub_renames = _build(p)
            objs += sub
            renames.update(sub_renames)
        else:
            objs += [o for o in yaml.safe_load_all(p.read_text()) if o]
    for gen in k.get("configMapGenerator") or []:
        cm = _config_map(d, gen)
        renames[gen["name"]] = cm["metadata"]["name"]
        objs.append(cm)
    _fix_config_map_refs(objs, renames)
    if ns := k.get("namespace"):
        for o in objs:
            _set_namespace(o, ns)
    for spec in k.get("labels") or []:
        if set(spec) - {"pairs"}:
            raise KustomizeError(f"{path}: labels support only `pairs` (no includeSelectors/includeTemplates)")
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(spec["pairs"])
    for patch in k.get("patches") or []:
        _patch(path, objs, patch)
    return objs, renames


def _config_map(d: Path, gen: dict[str, Any]) -> dict[str, Any]:
    if set(gen) - {"name", "files"}:
        raise KustomizeError(f"configMapGenerator {gen.get('name')}: only name and files are supported")
    data: dict[str, str] = {}
    for f in gen["files"]:
        key, _, rel = f.partition("=") if "=" in f else (Path(f).name, "", f)
        data[key] = (d / rel).read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{gen['name']}-{config_map_hash(gen['name'], data)}"}, "data": data}


def config_map_hash(name: str, data: dict[str, str]) -> str:
    """kustomize's suffix (api/hasher): sha256 of Go's JSON of {data, kind, name}, 10 hex digits
    with 0 1 3 a e replaced so the suffix can never read as a number or a bad word.

    The name in the hashed document is empty: kustomize 5 (kubectl 1.32's) hashes the generated
    object before it is named. tests/test_deploy.py checks the result against kubectl."""
    del name
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True,
                         separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these in strings; the hash is over its bytes.
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        encoded = encoded.replace(ch, esc)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _fix_config_map_refs(objs: list[dict[str, Any]], renames: dict[str, str]) -> None:
    if not renames:
        return
    for o in objs:
        spec = ((o.get("spec") or {}).get("template") or {}).get("spec") or {}
        for vol in spec.get("volumes") or []:
            if (cm := vol.get("configMap")) and cm.get("name") in renames:
                cm["name"] = renames[cm["name"]]
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            for ef in c.get("envFrom") or []:
                if (ref := ef.get("configMapRef")) and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref.get("name") in renames:
                    ref["name"] = renames[ref["name"]]


def _set_namespace(o: dict[str, Any], ns: str) -> None:
    if o.get("kind") in CLUSTER_SCOPED:
        return
    old = o.setdefault("metadata", {}).get("namespace")
    o["metadata"]["namespace"] = ns
    # As kustomize's namespace transformer: a binding's subjects that followed the object's
    # namespace follow it to the new one.
    for s in o.get("subjects") or []:
        if s.get("kind") == "ServiceAccount" and s.get("namespace") in (None, old):
            s["namespace"] = ns


def _patch(path: Path, objs: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    target = spec.get("target") or {}
    if set(target) - {"kind", "name"} or set(spec) - {"target", "patch"}:
        raise KustomizeError(f"{path}: patches support only an inline `patch` with a target of kind and name")
    ops = yaml.safe_load(spec["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{path}: only JSON 6902 patches (a list of operations) are supported")
    hits = [o for o in objs if o.get("kind") == target.get("kind", o.get("kind"))
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
    if not hits:
        raise KustomizeError(f"{path}: patch target {target} matches no object")
    for o in hits:
        for op in ops:
            _apply_op(o, op)


def _apply_op(obj: dict[str, Any], op: dict[str, Any]) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = obj
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    kind = op["op"]
    if kind not in ("add", "replace", "remove"):
        raise KustomizeError(f"JSON patch op {kind!r} is not supported")
    if isinstance(parent, list):
        i = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(i, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[i] = copy.deepcopy(op["value"])
        else:
            del parent[i]
    else:
        if kind in ("replace", "remove") and last not in parent:
            raise KustomizeError(f"JSON patch {kind} of missing path {op['path']}")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
