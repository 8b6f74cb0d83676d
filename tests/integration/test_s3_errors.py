"""Storage and input mistakes give one clear error line and exit status 2, never a traceback or a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import s3_server as s3_server_module

JOB = Path(__file__).resolve().parents[2] / "jobs" / "segment_bucket.py"


def run_job(args: list[str], env: dict[str, str], model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), "--model", str(model), *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture(scope="module")
def bucket(s3_server, image_dir):
    fs = s3_server.filesystem()
    fs.mkdir("inputs")
    fs.put(str(image_dir / "img_0.jpg"), "inputs/images/img_0.jpg")
    fs.mkdir("outputs")
    return "inputs"


def assert_one_clear_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0].lower(), result.stderr[-2000:]
    for secret in (s3_server_module.SECRET_KEY,):
        assert secret not in result.stdout + result.stderr


def test_wrong_endpoint(s3_server, bucket, untrained_model):
    env = s3_server.env() | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = run_job(["--input", f"s3://{bucket}/images", "--output", "s3://outputs/x"], env, untrained_model)
    assert_one_clear_error(result, "cannot reach")


@pytest.fixture
def web_server_not_s3():
    """An endpoint where some other HTTP service answers (a wrong port): 404 and an HTML page."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            page = b"<html><body>Not Found</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(page)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_an_endpoint_that_is_no_s3_api_is_named_with_the_output(s3_server, web_server_not_s3, untrained_model,
                                                                  image_dir):
    env = s3_server.env() | {"AWS_ENDPOINT_URL": web_server_not_s3}
    result = run_job(["--input", str(image_dir), "--output", "s3://outputs/x"], env, untrained_model)
    assert_one_clear_error(result, "--output s3://outputs/x cannot be written: ")
    assert "(check the bucket and the endpoint url)" in result.stderr.lower()


def test_wrong_credentials(s3_server, bucket, untrained_model):
    env = s3_server.env() | {"AWS_SECRET_ACCESS_KEY": "wrong-" + s3_server_module.SECRET_KEY[::-1]}
    result = run_job(["--input", f"s3://{bucket}/images", "--output", "s3://outputs/x"], env, untrained_model)
    assert_one_clear_error(result, "denied")


def test_missing_bucket(s3_server, bucket, untrained_model):
    result = run_job(["--input", "s3://no-such-bucket-here/images", "--output", "s3://outputs/x"],
                     s3_server.env(), untrained_model)
    assert_one_clear_error(result, "does not exist")


def test_empty_prefix(s3_server, bucket, untrained_model):
    result = run_job(["--input", f"s3://{bucket}/nothing-here/", "--output", "s3://outputs/x"],
                     s3_server.env(), untrained_model)
    assert_one_clear_error(result, "no images")


@pytest.mark.parametrize("input, output, expected", [
    ("bad.parquet", None, "magic bytes"), ("empty.parquet", None, "0 bytes"), ("latin1.csv", None, "utf-8"),
    ("foo://x/images", None, "protocol not known"), ("gs://bucket/images", None, "install gcsfs"),
    (None, "foo://x/out", "protocol not known"), (None, "gs://bucket/out", "install gcsfs"),
])
def test_unreadable_manifests_and_unknown_schemes(input, output, expected, tmp_path, image_dir, untrained_model):
    (tmp_path / "bad.parquet").write_text("not a parquet file")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "latin1.csv").write_bytes("uri\n/data/café.jpg\n".encode("latin-1"))
    input = str(image_dir) if input is None else input if "://" in input else str(tmp_path / input)
    result = run_job(["--input", input, "--output", output or str(tmp_path / "out")], {}, untrained_model)
    assert_one_clear_error(result, expected)
