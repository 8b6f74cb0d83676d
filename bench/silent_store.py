"""An S3 output whose store stops answering mid-run: how long until the job stops, and is a rerun exact?

    .venv/bin/python bench/silent_store.py [--images 200]

Starts SeaweedFS and, in front of it, a TCP proxy that can go silent: it keeps every connection
open and forwards nothing (a hung proxy or load balancer). Generates N scenes and starts the job
(`jobs/segment_bucket.py`, as users do) on them with its output on S3 through the proxy. Once two
shards are committed the proxy goes silent. Prints how long the job took to stop after that, its
exit status and error line; then the proxy answers again, the same command runs again, and it
prints the rerun's exit status and whether every input is committed exactly once.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from pipeline.scenes import generate_scenes  # noqa: E402
from tests import s3_server  # noqa: E402
from tests.ports import free_port  # noqa: E402

JOB = Path(__file__).resolve().parent.parent / "jobs" / "segment_bucket.py"


class SilentProxy:
    """127.0.0.1:<port> forwarded to `upstream`; while `silent` is set, nothing is forwarded."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.port, self.silent = upstream, free_port(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        while self.silent.is_set():
            time.sleep(0.1)
        server = socket.create_connection(("127.0.0.1", self.upstream))
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.silent.is_set():
                    time.sleep(0.1)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def committed_keys(fs, prefix: str) -> list[str]:
    keys = []
    for table in ("images", "errors"):
        for part in fs.ls(f"{prefix}/tables/{table}") if fs.exists(f"{prefix}/tables/{table}") else []:
            keys += pq.read_table(io.BytesIO(fs.cat(part)), columns=["key"]).column("key").to_pylist()
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        images = generate_scenes(Path(work) / "scenes", args.images, seed=5) / "images"
        server = s3_server.start(Path(work) / "s3")
        try:
            proxy = SilentProxy(int(server.endpoint.rsplit(":", 1)[1]))
            fs = server.filesystem()
            fs.mkdir("out")
            env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                   "HF_HUB_OFFLINE": "1"}
            command = [sys.executable, str(JOB), "--input", str(images), "--output", "s3://out/run",
                       "--shard-size", "8"]
            job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            while not fs.exists("out/run/tables/images") or len(fs.ls("out/run/tables/images", refresh=True)) < 2:
                if job.poll() is not None:
                    raise SystemExit(f"the job ended before the store went silent:\n{job.stderr.read()[-2000:]}")
                time.sleep(0.2)
            proxy.silent.set()
            silent_at = time.monotonic()
            _, stderr = job.communicate(timeout=900)
            stopped = time.monotonic() - silent_at
            error = next((line for line in stderr.splitlines() if line.startswith("error:")), "(no error line)")
            print(f"store silent after 2 commits; the job stopped {stopped:.1f} s later, exit status "
                  f"{job.returncode}: {error}")
            proxy.silent.clear()
            start = time.monotonic()
            rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            keys = committed_keys(fs, "out/run")
            print(f"rerun: exit status {rerun.returncode} in {time.monotonic() - start:.1f} s; {len(keys)} committed "
                  f"rows, {len(set(keys))} distinct keys, {args.images} inputs")
        finally:
            s3_server.stop(server)


if __name__ == "__main__":
    main()
