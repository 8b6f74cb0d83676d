"""A run on a real two-node Ray cluster whose second node has its own disk at one of the paths.

The second node runs in a private mount namespace with a tmpfs over `node_local/`: it sees an
empty folder there where the driver sees the run's files, as a machine without the driver's
disk would. Both nodes share everything else, as machines on one shared file system do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ray_ports, stop_process_group
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "pipeline" / "data" / "samples"
JOB = REPO / "jobs" / "segment_bucket.py"


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _wait_for_nodes(address: str, env: dict, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run(["ray", "status", "--address", address], env=env, capture_output=True, text=True)
        if status.stdout.count(" node_") >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not reach {count} nodes:\n{status.stdout}{status.stderr}")


@pytest.fixture()
def two_nodes(tmp_path):
    """(env for a driver on the cluster, the folder only the driver's node sees)."""
    if not _can_unshare_mounts():
        pytest.skip("this kernel does not let the test give a Ray node a mount namespace of its own")
    bin_dir = str(Path(sys.executable).parent)
    node_local = tmp_path / "node_local"
    node_local.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    temp_dir = tempfile.mkdtemp(prefix="raynodes-", dir="/tmp")  # short: socket paths
    taken: set[int] = set()  # the ports of every node: all on this machine
    port = free_port(taken)
    common = ["--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    agents = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={port}", *ray_ports("ray-client-server-port", *agents, taken=taken), *common,
         "--include-dashboard=false", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = [head]
    try:
        _wait_for_nodes(f"127.0.0.1:{port}", env, 1)
        worker = " ".join(["exec", "ray", "start", f"--address=127.0.0.1:{port}", *ray_ports(*agents, taken=taken), *common])
        nodes.append(subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs tmpfs '{node_local}' && {worker}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for_nodes(f"127.0.0.1:{port}", env, 2)
        yield env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, node_local
    finally:
        for node in reversed(nodes):
            stop_process_group(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_local_path_one_node_lacks_is_refused_and_a_shared_one_works(two_nodes, tmp_path):
    env, node_local = two_nodes

    # on the driver's disk alone: refused before any work, with one line naming the flag
    unseen = node_local / "out"
    refused = _job(env, tmp_path, "--input", str(SAMPLES), "--output", str(unseen))
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --output: node ") and "sees nothing" in errors[0]
    assert "Traceback" not in refused.stderr
    assert not [p for p in unseen.rglob("*") if p.is_file()]  # no probe, no lease, nothing segmented

    copied = node_local / "images"  # the input on the driver's disk alone
    shutil.copytree(SAMPLES, copied)
    refused = _job(env, tmp_path, "--input", str(copied), "--output", str(tmp_path / "elsewhere"))
    assert refused.returncode == 2 and "error: --input: node " in refused.stderr, refused.stderr[-2000:]

    # shared by both nodes, and relative: the tasks get the path as the driver means it
    done = _job(env, tmp_path, "--input", str(SAMPLES), "--output", "out")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    count = len(list(SAMPLES.iterdir()))
    assert f"done: {count} segmented, 0 failed" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["run"]["ok"] == count == len(list((tmp_path / "out" / "panoptic").rglob("*.png")))
    assert sum(report["dataset"]["segments_per_category"].values()) >= 2 * count  # real segments
    assert not list((tmp_path / "out").glob(".probe-*"))
