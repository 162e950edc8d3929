"""A throw-away Kubernetes API for adapter tests: kmock's emulator plus a fake controller.

kmock is an in-memory JSON store behind aiohttp. It ignores label selectors, has no
``/version/`` answer the official client accepts, and never touches ``status``. This module
fills exactly those gaps (measured in the shared integration notes, section 4) and nothing more.

Usage from any sync test::

    from tests.kmock_cluster import kmock_cluster

    def test_something():
        with kmock_cluster() as k8s:
            k8s.add_deployment("api", labels={"tier": "web"}, replicas=2)
            adapter = KubernetesCluster(KubernetesConfig(api_url=k8s.api_url, namespace=k8s.namespace))
            ...

Each ``kmock_cluster()`` is a fresh emulator: kmock rescans its whole request log on every
request, so sharing one across tests makes later tests slower and slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import kmock
from kubernetes import client, watch

log = logging.getLogger(__name__)

PORTS = range(19500, 19600)
NAMESPACE = "eagle-alert"
_VERSION = {
    # The client's pydantic VersionInfo rejects a document with any field missing.
    "major": "1",
    "minor": "30",
    "emulationMajor": "1",
    "emulationMinor": "30",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "29",
    "gitVersion": "v1.30.0-kmock",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


# -- label selectors (kmock ignores them) ------------------------------------------------------


def selector_matches(selector: str | None, labels: Mapping[str, str] | None) -> bool:
    """Equality-based selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma = AND."""
    labels = labels or {}
    for term in (t.strip() for t in (selector or "").split(",")):
        if not term:
            continue
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif " in " in term or " notin " in term or "(" in term:
            # Set-based selectors are not needed by the adapter; failing loudly beats matching wrongly.
            raise ValueError(f"set-based label selector not supported by the test harness: {term!r}")
        elif term not in labels:
            return False
    return True


def _selector_lister(emulator: kmock.KubernetesEmulator, resource: kmock.resource):
    def lister(request: kmock.Request) -> dict[str, Any]:
        # Runs on the emulator's loop between awaits, so the object store cannot change under it.
        selector = request.params.get("labelSelector")
        items = [
            obj.raw
            for (res, namespace, _), obj in emulator.objects.items()
            if res == resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
            and selector_matches(selector, (obj.raw.get("metadata") or {}).get("labels"))
        ]
        return {"apiVersion": f"{resource.group}/{resource.version}", "kind": "List", "metadata": {}, "items": items}

    return lister


# -- server-side apply (kmock answers an apply to a missing object with 404) --------------------


class _ApplyingEmulator(kmock.KubernetesEmulator):
    """A real API server creates the object a server-side apply names when it does not exist;
    kmock only patches existing ones. This creates it first (as a POST would), then lets kmock
    merge the apply into it, so an apply answers with the object either way. Field ownership
    and the removal of fields an apply no longer sets are not emulated."""

    async def _handle(self, request):
        content_type = request.headers.get("Content-Type") or request.headers.get("content-type") or ""
        if (request.resource is not None and request.name is not None
                and str(request.method.value).upper() == "PATCH" and content_type.startswith("application/apply-patch")
                and request.params.get("dryRun") is None):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self._objects:
                    self._objects[key] = request.data
                elif self._objects[key].deleted:
                    self._objects[key].create(request.data)
                else:
                    key = None
                if key is not None:
                    await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].last.raw})
        return await super()._handle(request)


# -- the server thread -------------------------------------------------------------------------


class _EmulatorThread:
    """kmock on its own thread and loop: the sync client would deadlock on a shared loop."""

    def __init__(self, host: str = "127.0.0.1", ports: range = PORTS) -> None:
        self._host = host
        self._ports = ports
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._emulator: kmock.KubernetesEmulator | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.port: int | None = None
        self.errors: list[Exception] = []

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def requests(self, timeout_s: float = 5.0) -> list[tuple[str, str]]:
        """(method, path) of every request so far, read on the emulator's own loop."""
        assert self._loop is not None and self._emulator is not None

        async def snapshot() -> list[tuple[str, str]]:
            return [(str(r.method.value).upper(), r.url.path) for r in self._emulator]

        return asyncio.run_coroutine_threadsafe(snapshot(), self._loop).result(timeout_s)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("kmock did not start in time")
        if self._error is not None:
            raise RuntimeError(f"kmock failed to start: {self._error}") from self._error

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError("kmock thread did not stop in time")

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced to start(); after start it is a test failure anyway
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with _ApplyingEmulator() as emulator:
            self._emulator = emulator
            deployments = kmock.resource("apps/v1/deployments")
            jobs = kmock.resource("batch/v1/jobs")
            emulator[kmock.action.LIST, deployments] << _selector_lister(emulator, deployments)
            emulator[kmock.action.LIST, jobs] << _selector_lister(emulator, jobs)
            emulator["get /version/"] << _VERSION
            async with self._bind(emulator):
                self._ready.set()
                await self._stop.wait()
            # Reaction errors are swallowed into 500s; keep them so a test can show them.
            self.errors = list(emulator.errors)

    @contextlib.asynccontextmanager
    async def _bind(self, emulator: kmock.KubernetesEmulator):
        last: OSError | None = None
        for port in self._ports:
            # Probe first: aiohttp leaks its socket when the bind fails. The probe can still
            # lose a race with another test run, so a failed start moves on to the next port.
            if not _port_free(self._host, port):
                continue
            server = kmock.Server(emulator, host=self._host, port=port)
            try:
                await server.__aenter__()
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                last = e
                with contextlib.suppress(Exception):
                    await server.server.close()
                continue
            self.port = port
            try:
                yield server
            finally:
                await server.__aexit__(None, None, None)
            return
        raise OSError(errno.EADDRINUSE, f"no free port in {self._ports}") from last


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds it
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# -- the fake controller -----------------------------------------------------------------------


class FakeController:
    """Plays the deployment controller: ``ready = spec.replicas`` a little after each change.

    One thread watches (one long request, cheap for kmock), another applies status patches
    when they fall due, re-reading the deployment so a quick 3 -> 0 -> 3 ends at 3.
    """

    def __init__(self, api_client: client.ApiClient, namespace: str, delay_s: float = 0.2) -> None:
        self._apps = client.AppsV1Api(api_client)
        self._namespace = namespace
        self._delay_s = delay_s
        self._due: queue.Queue[tuple[float, str]] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._current: watch.Watch | None = None
        self.patched: list[tuple[str, int]] = []

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._watch, name="fake-controller-watch", daemon=True),
            threading.Thread(target=self._patch, name="fake-controller-patch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._current is not None:
            self._current.stop()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                raise RuntimeError(f"{t.name} did not stop in time")
        self._threads = []

    def _watch(self) -> None:
        while not self._stopping.is_set():
            w = self._current = watch.Watch()
            try:
                # kmock ignores timeoutSeconds, so the stream never ends by itself. stop() cuts it
                # via Watch.stop() (which shuts the socket down); the read timeout only bounds the
                # rare case of stop() landing between two streams.
                for event in w.stream(
                    self._apps.list_namespaced_deployment, self._namespace, _request_timeout=(2, 2)
                ):
                    if self._stopping.is_set():
                        break
                    dep = event["object"]
                    desired = (dep.spec.replicas if dep.spec else None) or 0
                    ready = (dep.status.ready_replicas if dep.status else None) or 0
                    if event["type"] != "DELETED" and desired != ready:
                        self._due.put((time.monotonic() + self._delay_s, dep.metadata.name))
            except Exception as e:  # read timeouts, the socket shut by stop(), server shutdown
                log.debug("fake controller watch restarts: %r", e)
                self._stopping.wait(0.05)
            finally:
                w.stop()

    def _patch(self) -> None:
        while not self._stopping.is_set():
            try:
                due, name = self._due.get(timeout=0.1)
            except queue.Empty:
                continue
            if self._stopping.wait(max(0.0, due - time.monotonic())):
                return
            try:
                dep = self._apps.read_namespaced_deployment(name, self._namespace)
                desired = dep.spec.replicas or 0
                status = {"replicas": desired, "readyReplicas": desired, "availableReplicas": desired,
                          "updatedReplicas": desired}
                self._apps.patch_namespaced_deployment_status(name, self._namespace, {"status": status})
                self.patched.append((name, desired))
            except Exception as e:
                log.warning("fake controller could not patch %s: %r", name, e)


# -- what a test gets --------------------------------------------------------------------------


@dataclass
class KmockCluster:
    api_url: str
    namespace: str
    api_client: client.ApiClient
    controller: FakeController
    _server: _EmulatorThread = field(repr=False)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)

    def add_deployment(
        self, name: str, labels: Mapping[str, str] | None = None, replicas: int = 1, ready: int | None = None
    ) -> None:
        """Created ready (``ready`` defaults to ``replicas``), as a running cluster would show it."""
        ready = replicas if ready is None else ready
        pod_labels = {"app": name}
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.namespace, "labels": dict(labels or {})},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": pod_labels},
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {"containers": [{"name": name, "image": f"example.invalid/{name}:1"}]},
                },
            },
            "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": ready},
        }
        self.apps.create_namespaced_deployment(self.namespace, body)

    def add_config_map(self, name: str, data: Mapping[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace}, "data": dict(data)}
        self.core.create_namespaced_config_map(self.namespace, body)

    def add_cron_job(self, name: str, schedule: str = "*/15 * * * *", image: str = "example.invalid/job:1") -> str:
        """Returns the CronJob's uid; kmock assigns none, so the helper plays the API server."""
        uid = str(uuid.uuid4())
        body = {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": name, "namespace": self.namespace, "uid": uid, "labels": {"app": name}},
            "spec": {
                "schedule": schedule,
                "jobTemplate": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "backoffLimit": 1,
                        "template": {
                            "metadata": {"labels": {"app": name}},
                            "spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": name, "image": image, "args": ["run", name]}],
                            },
                        },
                    },
                },
            },
        }
        self.batch.create_namespaced_cron_job(self.namespace, body)
        return uid

    def deployment(self, name: str) -> client.V1Deployment:
        return self.apps.read_namespaced_deployment(name, self.namespace)

    def requests(self, method: str | None = None) -> list[tuple[str, str]]:
        """What the API server received, e.g. ``requests("PATCH")`` to prove a no-op."""
        return [r for r in self._server.requests() if method is None or r[0] == method.upper()]

    def server_errors(self) -> list[Exception]:
        """Failures inside the emulator or our reactions (complete only after the cluster stopped).

        kmock files its ordinary API answers (404, 409) here too; those are left out.
        """
        return [e for e in self._server.errors if not isinstance(e, kmock.KubernetesError)]


@contextlib.contextmanager
def kmock_cluster(
    namespace: str = NAMESPACE, controller: bool = True, ready_delay_s: float = 0.2
) -> Iterator[KmockCluster]:
    """A fresh emulator on 127.0.0.1:195xx, plus the fake controller unless ``controller=False``.

    Everything started here is stopped on exit, controller first: its watch would otherwise
    hold a streaming request open while the server shuts down.
    """
    server = _EmulatorThread()
    server.start()
    cfg = client.Configuration()
    cfg.host = server.url
    api_client = client.ApiClient(cfg)
    fake = FakeController(client.ApiClient(cfg), namespace, delay_s=ready_delay_s)
    cluster = KmockCluster(server.url, namespace, api_client, fake, server)
    try:
        if controller:
            fake.start()
        yield cluster
    finally:
        try:
            fake.stop()
        finally:
            fake._apps.api_client.close()
            api_client.close()
            server.stop()
