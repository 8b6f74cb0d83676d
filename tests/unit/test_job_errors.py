"""How the job tells a user's mistake raised in a Ray task or actor (one error line) from a bug (a traceback)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("segment_bucket", Path(__file__).resolve().parents[2] / "jobs" / "segment_bucket.py")
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)

WRAPPED = "\n\nThe above exception was the direct cause of the following exception:\n\n" \
          "ray::MapBatches(write_shard)() (pid=1, ip=127.0.0.1)\nray.exceptions.UserCodeException: UDF failed.\n" \
          "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"


@pytest.mark.parametrize("text, expected", [
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nOSError: [Errno 28] No space left on device" + WRAPPED,
     "OSError: [Errno 28] No space left on device (committed shards are kept: rerun the same command once it is "
     "fixed)"),
    ("RuntimeError: size mismatch\n\nThe above exception was the direct cause of the following exception:\n\n"
     "pipeline.model.ModelError: model in /m cannot be loaded: RuntimeError: size mismatch" + WRAPPED,
     "model in /m cannot be loaded: RuntimeError: size mismatch"),
    # a bug raised while handling a user's error is the bug: a traceback, not an error line
    ("FileNotFoundError: [Errno 2] gone: '/x'\n\nDuring handling of the above exception, another exception "
     "occurred:\n\nTypeError: 'NoneType' object is not iterable" + WRAPPED, None),
    ("ValueError: a bug of ours" + WRAPPED, None),
    # the storage went away under a write task (botocore's errors are dotted, as Ray's own)
    ("botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: "
     "\"http://127.0.0.1:1/out/x\"" + WRAPPED,
     "cannot reach the storage endpoint: Could not connect to the endpoint URL: \"http://127.0.0.1:1/out/x\""),
    # a store that took the connection and never answered
    ("pipeline.remote.StorageTimeout: a request to the storage endpoint did not finish within 60 s (pipe_file of "
     "s3://b/o/p.png)" + WRAPPED,
     "a request to the storage endpoint did not finish within 60 s (pipe_file of s3://b/o/p.png)"),
])
def test_only_the_error_a_task_died_of_decides(text, expected):
    assert job._remote_user_error(text) == expected


@pytest.mark.parametrize("text, fuse, stuff", [("", frozenset(), False), ("1,5", {1, 5}, False),
                                               ("stuff", frozenset(), True), ("stuff, 7", {7}, True)])
def test_label_ids_to_fuse_takes_ids_and_the_word_stuff(text, fuse, stuff):
    config = job.config_from_args(job.parse_args(["--input", "in", "--output", "out", "--label-ids-to-fuse", text]))
    assert (config.postprocess.label_ids_to_fuse, config.fuse_stuff) == (fuse, stuff)


def test_label_ids_to_fuse_refuses_other_words(capsys):
    with pytest.raises(SystemExit) as stopped:
        job.parse_args(["--input", "in", "--output", "out", "--label-ids-to-fuse", "sky"])
    assert stopped.value.code == 2 and "ids and/or the word stuff" in capsys.readouterr().err


@pytest.mark.parametrize("text, got", [("", "got an empty list"), (" , ", "got an empty list"),
                                       ("semantic,instance", "got semantic, instance")])
def test_tasks_without_panoptic_are_refused_saying_what_was_given(text, got, capsys):
    with pytest.raises(SystemExit) as stopped:
        job.parse_args(["--input", "in", "--output", "out", "--tasks", text])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.endswith(f"tasks must include panoptic and be among panoptic, semantic, instance, "
                                            f"{got}\n")


@pytest.mark.parametrize("value", ["127.0.0.1:9000", "minio:9000", "http://", "ftp://host", "http://[::1",
                                   "http://127.0.0.1:abc", "http://127.0.0.1:99999"])
def test_an_endpoint_without_scheme_or_host_is_refused_at_parse_time(value, capsys, monkeypatch):
    """botocore fails such an endpoint with a ValueError deep in the first request to the output."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        job.parse_args(["--input", "in", "--output", "s3://b/out", "--endpoint-url", value])
    assert stopped.value.code == 2 and "expected an http:// or https:// URL with a host" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", value)
    with pytest.raises(SystemExit) as stopped:
        job.parse_args(["--input", "in", "--output", "s3://b/out"])
    assert stopped.value.code == 2 and "$AWS_ENDPOINT_URL: expected" in capsys.readouterr().err
    assert not job.parse_args(["--input", "in", "--output", "out"]).endpoint_url  # no s3:// URL: botocore unused
    with pytest.raises(SystemExit):  # a manifest's entries may be s3:// URLs
        job.parse_args(["--input", "list.txt", "--output", "out"])
    assert job.parse_args(["--input", "in", "--output", "s3://b/o", "--endpoint-url", "http://[::1]:8333"]).endpoint_url


def test_ctrl_c_stops_the_run_says_it_is_stopping_then_quits(monkeypatch, capsys):
    """The first press stops the run; a second, while the job records what was committed and
    shuts Ray down, would cut that short, so it only says so; a third quits at once."""
    monkeypatch.setattr(job.os, "_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))
    interrupts = job._Interrupts()
    with pytest.raises(KeyboardInterrupt):
        interrupts(2, None)
    interrupts(2, None)
    assert "Ctrl-C again quits at once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as quit_:
        interrupts(2, None)
    assert quit_.value.code == 130
    at_exit = job._Interrupts()
    at_exit.exiting()  # Ray shuts down after a run that ended by itself: a press there stops nothing
    at_exit(2, None)
    assert "quits at once" in capsys.readouterr().err


def test_an_http_answer_that_is_not_s3s_is_a_storage_error():
    from botocore.exceptions import HTTPClientError
    from botocore.parsers import ResponseParserError

    from pipeline.remote import storage_error_message

    for exc in (HTTPClientError(error="400, message='Data after Connection: close'"),
                ResponseParserError("Unable to parse response, invalid XML received")):
        assert storage_error_message(exc).startswith("the storage endpoint does not answer as S3 does (check the endpoint URL): ")
