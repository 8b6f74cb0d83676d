"""`ray job submit` on a real Ray head started here, with Ray 2.60's token authentication."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import ray_ports, stop_process_group
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "pipeline" / "data" / "samples"
SAMPLES_LIST = sorted(SAMPLES.iterdir())


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # answering, if only to say a token is needed
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Ray head's dashboard did not come up")


@pytest.fixture()
def ray_head(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    # A private HOME: the token generated here (~/.ray/auth_token) is read by the head and by the
    # submitting client alike, and the user's own token is left alone.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    assert (tmp_path / ".ray" / "auth_token").is_file()
    taken: set[int] = set()
    dashboard = free_port(taken)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    # --block keeps the head's processes in this process group, so the test stops exactly this
    # head (`ray stop` would stop every Ray on the machine, the test session's own included).
    # Every port named: the test session's own Ray runtime already holds the defaults (its job
    # agent's 52365 among them), and a second head on them comes up without a job agent.
    ports = ray_ports("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                      "metrics-export-port", taken=taken)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", *ports, f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],  # short (socket paths), and no pointer to this head in /tmp/ray
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(url, head)
        yield env, url
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_segments_the_samples(ray_head, tmp_path):
    env, address = ray_head
    working_dir = tmp_path / "job"  # only the code: .venv and outputs stay behind
    shutil.copytree(REPO, working_dir, ignore=shutil.ignore_patterns(".venv", ".git", "*-output", "__pycache__"))
    output = tmp_path / "out"
    # The head's job agent comes up a few seconds after its dashboard; until then a submission
    # fails with "No available agent", or, while the agent is starting, "Server disconnected"
    # (the head could not reach it: no job was created).
    for _ in range(30):
        result = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", str(working_dir), "--",
             "python", "jobs/segment_bucket.py", "--input", str(SAMPLES), "--output", str(output)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        if "No available agent" not in result.stderr and "ServerDisconnectedError" not in result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert f"done: {len(SAMPLES_LIST)} segmented" in result.stdout
    assert "progress:" in result.stdout or "images already committed" in result.stdout  # the job log streams
    report = json.loads((output / "report.json").read_text())
    assert report["run"]["ok"] == len(SAMPLES_LIST) == len(list((output / "panoptic").rglob("*.png")))
    assert sum(report["dataset"]["segments_per_category"].values()) >= 2 * len(SAMPLES_LIST)  # real segments
