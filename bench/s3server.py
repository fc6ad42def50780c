"""The benchmarks' S3 server: the tests' SeaweedFS launcher (`tests/s3server.py`), with one bucket, for one run."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.s3server import S3Server, WeedServer

__all__ = ["S3Server", "s3_server"]

log = logging.getLogger(__name__)


@contextmanager
def s3_server(bucket: str) -> Iterator[S3Server]:
    """Start `weed mini` with a fresh data dir and one identity, create `bucket`, yield; stop it afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bench-weed-"))
    weed = WeedServer(base)
    try:
        server = weed.start()
        server.create_bucket(bucket)
        log.info("SeaweedFS S3 at %s (logs in %s)", server.endpoint_url, weed.log_dir)
        yield server
    finally:
        weed.stop()
        shutil.rmtree(base, ignore_errors=True)
