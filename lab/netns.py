"""Network partitions for the lab: each region's PostgreSQL, Redis, Sentinel and worker in a
network namespace.

The lab's servers all listen on 127.0.0.1, and the config names every one of them there. To put
a region behind a real network without changing any server, address or certificate, each
region's namespace gets a veth pair to the root namespace (and a route to the other region's
through it, with forwarding on), and small TCP relays make "127.0.0.1:port" mean the same
server from every namespace:

- in a region's namespace: its own PostgreSQL, Redis and Sentinel ports are the real servers
  (``owned_ports``); every other lab port is relayed to where that server lives (the other
  region's namespace, directly, or the root);
- in the root: each region's own ports are relayed into that region's namespace, and the
  root's servers (Temporal, the witness Sentinel, S3, pgBackRest servers) are relayed to from
  the regions' veth addresses.

A partition is then a kernel one: blackhole routes drop the packets (SYNs go unanswered,
established connections stall) between a region and the other region, between a region and
the root (the control plane), or both. Nothing in eagle-dr knows it runs in a namespace.

Needs root and ``ip`` (Debian iproute2). ``tc netem`` is not available on this kind of
machine, so loss and delay are not simulated; blackholes are.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from eagle_dr.config import EagleConfig


def available() -> str | None:
    """None when this machine can make namespaces, else why not."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no `ip` command (Debian iproute2)"
    probe = f"edr-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def lab_ports(cfg: EagleConfig) -> set[int]:
    """Every TCP port the lab's config names (servers all listen on 127.0.0.1)."""
    found: set[int] = set()

    def walk(v, key: str = "") -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, int) and not isinstance(v, bool) and key.endswith("port") and 0 < v < 65536 \
                and key != "s3_base_port":  # SeaweedFS's internal ports: no client of ours uses them
            found.add(v)
        elif isinstance(v, str):
            found.update(int(m) for m in re.findall(r"://[^/:\s]+:(\d+)", v))

    walk(cfg.model_dump(mode="json"))
    found.add(cfg.lab.dev_server.grpc_port)
    return found


def owned_ports(cfg: EagleConfig, region: str) -> set[int]:
    """Ports a region's namespace serves itself: its PostgreSQL, its Redis, the Sentinel the
    lab places there (``lab.sentinel_placement``) and its worker's metrics."""
    r = cfg.region(region)
    sentinels = {ep.port for place, ep in zip(cfg.lab.sentinel_placement, cfg.primary.redis.sentinels)
                 if place == region}
    return {r.postgres.port, r.redis.port} | sentinels | ({r.temporal.metrics_port} if r.temporal.metrics_port else set())


@dataclass
class Region:
    name: str
    netns: str
    root_dev: str
    ns_dev: str
    root_ip: str  # the root's end of the link
    ns_ip: str  # the region's end
    subnet: str


class Partitions:
    """Namespaces, links, routes and relays for every region named in ``cfg.lab.netns``."""

    def __init__(self, cfg: EagleConfig, state: Path, index: int):
        self.cfg, self.state = cfg, state
        self.regions: dict[str, Region] = {}
        for i, (region, netns) in enumerate(sorted(cfg.lab.netns.items())):
            third = 100 + 2 * index + i
            self.regions[region] = Region(region, netns, f"{netns}r", f"{netns}n", f"169.254.{third}.1",
                                          f"169.254.{third}.2", f"169.254.{third}.0/30")
        self._saved = state / "netns" / "ip_forward.saved"

    # -- links ---------------------------------------------------------------------------------

    def up(self) -> None:
        self.down()  # what a killed run left (and the forwarding setting it found)
        # Forwarding on for the regions' traffic through the root: the value found is kept on
        # disk, so a run killed before its teardown is undone by the next one's down().
        self._saved.parent.mkdir(parents=True, exist_ok=True)
        self._saved.write_text(Path("/proc/sys/net/ipv4/ip_forward").read_text())
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        for r in self.regions.values():
            _ip("netns", "add", r.netns)
            _ip("link", "add", r.root_dev, "type", "veth", "peer", "name", r.ns_dev)
            _ip("link", "set", r.ns_dev, "netns", r.netns)
            _ip("addr", "add", f"{r.root_ip}/30", "dev", r.root_dev)
            _ip("link", "set", r.root_dev, "up")
            _ip("-n", r.netns, "addr", "add", f"{r.ns_ip}/30", "dev", r.ns_dev)
            _ip("-n", r.netns, "link", "set", r.ns_dev, "up")
            _ip("-n", r.netns, "link", "set", "lo", "up")
        for r in self.regions.values():
            for o in self.regions.values():
                if o is not r:
                    _ip("-n", r.netns, "route", "add", o.subnet, "via", r.root_ip)

    def down(self) -> None:
        for r in self.regions.values():
            _ip("netns", "del", r.netns, check=False)
            _ip("link", "del", r.root_dev, check=False)
        if self._saved.exists():
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self._saved.read_text())
            self._saved.unlink()

    # -- partitions ----------------------------------------------------------------------------

    def _blackhole(self, netns: str | None, dest: str, on: bool) -> None:
        args = (["-n", netns] if netns else []) + ["route", "replace" if on else "del", "blackhole", dest]
        _ip(*args, check=on)

    def cut_from_root(self, region: str, on: bool = True) -> None:
        """The region and the control plane (Temporal, the control worker, the witness
        Sentinel, S3) lose each other; the other region still reaches it."""
        # In the region's namespace only: its packets to the root's address on its link are
        # dropped, which also drops its answers to connections the root opens (they come from
        # that address). A blackhole in the root would drop what the root forwards between the
        # regions too.
        r = self.regions[region]
        self._blackhole(r.netns, f"{r.root_ip}/32", on)

    def cut_between(self, a: str, b: str, on: bool = True) -> None:
        """The two regions lose each other; both still reach the control plane."""
        ra, rb = self.regions[a], self.regions[b]
        # The blackhole takes the place of the route to the other region (same prefix):
        # healing puts that route back rather than deleting it.
        for x, y in ((ra, rb), (rb, ra)):
            if on:
                _ip("-n", x.netns, "route", "replace", "blackhole", y.subnet)
            else:
                _ip("-n", x.netns, "route", "replace", y.subnet, "via", x.root_ip)

    def isolate(self, region: str, on: bool = True) -> None:
        """The region loses everyone."""
        r = self.regions[region]
        for o in self.regions.values():
            if o is not r:
                self.cut_between(region, o.name, on)
        self.cut_from_root(region, on)

    def heal(self) -> None:
        names = list(self.regions)
        for r in names:
            with contextlib.suppress(RuntimeError):
                self.cut_from_root(r, on=False)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                with contextlib.suppress(RuntimeError):
                    self.cut_between(a, b, on=False)

    # -- relays --------------------------------------------------------------------------------

    def relays(self) -> dict[str, tuple[str | None, list[str]]]:
        """relay name -> (namespace, None: the root; its specs ``listen_ip:port=target_ip:port``).
        In the root, ``root-in`` relays each region's own ports into its namespace and
        ``root-out`` serves the root's servers to the regions' links."""
        ports = lab_ports(self.cfg)
        owned = {name: owned_ports(self.cfg, name) for name in self.regions}
        root_served = ports - set().union(*owned.values())
        out: dict[str, tuple[str | None, list[str]]] = {"root-in": (None, []), "root-out": (None, [])}
        for name, r in self.regions.items():
            out["root-in"][1].extend(f"127.0.0.1:{p}={r.ns_ip}:{p}" for p in sorted(owned[name]))
            out["root-out"][1].extend(f"{r.root_ip}:{p}=127.0.0.1:{p}" for p in sorted(root_served))
            # The region: its own ports reachable from outside; everything else relayed out.
            specs = [f"{r.ns_ip}:{p}=127.0.0.1:{p}" for p in sorted(owned[name])]
            specs += [f"127.0.0.1:{p}={r.root_ip}:{p}" for p in sorted(root_served)]
            for other, o in self.regions.items():
                if other != name:
                    specs += [f"127.0.0.1:{p}={o.ns_ip}:{p}" for p in sorted(owned[other])]
            out[r.netns] = (r.netns, specs)
        return out

    def start_relays(self, *names: str) -> None:
        """Start the named relays (default: all) and wait until they listen."""
        import time

        from lab.processes import spawn

        for name in names or list(self.relays()):
            netns, specs = self.relays()[name]
            argv = [sys.executable, "-m", "lab.netns", *specs]
            if netns:
                argv = ["ip", "netns", "exec", netns, *argv]
            log = self.state / "netns" / f"relay-{name}.log"
            log.unlink(missing_ok=True)
            spawn(argv, pidfile=log.with_suffix(".pid"), logfile=log)
            deadline = time.monotonic() + 30
            while "relaying" not in (log.read_text() if log.exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay {name} did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)

    def stop_relays(self) -> None:
        from lab.processes import kill_tree, read_pid

        for name in self.relays():
            kill_tree(read_pid(self.state / "netns" / f"relay-{name}.pid"))


# -- the relay process -------------------------------------------------------------------------


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:  # noqa: BLE001 - a reset ends this direction
        pass
    finally:
        with contextlib.suppress(Exception):
            w.close()


async def _relay(listen: tuple[str, int], target: tuple[str, int]) -> asyncio.Server:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*target)
        except OSError:
            w.close()  # the far side refused or is unreachable: so is this connection
            return
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

    return await asyncio.start_server(serve, *listen, reuse_address=True)


async def _main(specs: list[str]) -> None:
    servers = []
    for spec in specs:
        listen, target = spec.split("=")
        lh, lp = listen.rsplit(":", 1)
        th, tp = target.rsplit(":", 1)
        servers.append(await _relay((lh, int(lp)), (th, int(tp))))
    print(f"relaying {len(servers)} ports", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
