"""`ray job submit` on a real Ray head started here, with Ray 2.60's token authentication."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.s3_server import _free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ray_head(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    # A private HOME: the token generated here (~/.ray/auth_token) is read by the head and by the
    # submitting client alike, and the user's own token is left alone.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    assert (tmp_path / ".ray" / "auth_token").is_file()
    dashboard = _free_port()
    subprocess.run(["ray", "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_segments_the_samples(ray_head, tmp_path, image_dir, untrained_model):
    env, address = ray_head
    working_dir = tmp_path / "job"  # only the code: .venv and outputs stay behind
    shutil.copytree(REPO, working_dir, ignore=shutil.ignore_patterns(".venv", ".git", "*-output", "__pycache__"))
    output = tmp_path / "out"
    result = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(working_dir), "--",
         "python", "jobs/segment_bucket.py", "--input", str(image_dir), "--output", str(output),
         "--model", str(untrained_model)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert "done: 6 segmented" in result.stdout
    report = json.loads((output / "report.json").read_text())
    assert report["run"]["ok"] == 6 and len(list((output / "panoptic").rglob("*.png"))) == 6
