"""Exactly once: kill the job anywhere, rerun, and the committed outputs equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.run import ExecutionConfig, RunConfig, run
from pipeline.scenes import generate_scenes
from tests.integration.conftest import coco, images_table, segment_maps

JOB = Path(__file__).resolve().parents[2] / "jobs" / "segment_bucket.py"


# Runs a script with torch, torchvision and transformers unimportable in this process only (Ray's
# workers are processes of their own): they load in the inference actor, and importing them in the
# driver held up the start of every run by seconds.
DRIVER_WITHOUT_TORCH = ("import runpy, sys; sys.modules.update(torch=None, torchvision=None, transformers=None); "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def start_job(images: Path, output: Path) -> subprocess.Popen:
    """The job as a user starts it, but with a driver that cannot import torch (see above)."""
    # Batch size 1: each image's result then cannot depend on which images a resumed run batches it with.
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER_WITHOUT_TORCH, str(JOB), "--input", str(images), "--output", str(output),
         "--batch-size", "1", "--shard-size", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group: the driver and the local Ray it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    time.sleep(2)  # Ray's own processes share the driver's fate (and its process group)


def committed_rows(output: Path) -> int:
    parts = (output / "tables" / "images").glob("*.parquet")
    return sum(pq.read_metadata(p).num_rows for p in parts if not p.name.endswith(".tmp"))


SCENES = 600  # ~4 s of work after ~13 s of start-up: room for kills between, and during, shard writes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes"), count=SCENES, seed=21) / "images"


def test_sigkill_anywhere_then_rerun_gives_every_image_exactly_once(scenes, tmp_path):
    reference, tortured = tmp_path / "reference", tmp_path / "tortured"
    assert start_job(scenes, reference).wait(timeout=900) == 0
    rng = random.Random(7)
    committed_at_kill: list[int] = []
    for _ in range(3):  # SIGKILL at a random moment after the run has committed something new
        process = start_job(scenes, tortured)
        before = committed_at_kill[-1] if committed_at_kill else 0
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and committed_rows(tortured) <= before:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.0))  # before, between or in the middle of shard writes
        if process.poll() is not None:
            break
        kill_job(process)
        committed_at_kill.append(committed_rows(tortured))
    assert len(committed_at_kill) >= 2, "the job finished before it could be killed twice: nothing was tested"
    assert committed_at_kill[0] < committed_at_kill[-1] < SCENES
    assert start_job(scenes, tortured).wait(timeout=900) == 0

    ref_rows, rows = images_table(reference), images_table(tortured)
    assert len(rows) == len({r["key"] for r in rows}) == SCENES  # one row per key
    assert {r["key"] for r in rows} == {r["key"] for r in ref_rows}
    ref_maps, maps = segment_maps(reference), segment_maps(tortured)
    for key, ids in ref_maps.items():
        assert np.array_equal(maps[key], ids), key
    data = coco(tortured)
    ids = [im["id"] for im in data["images"]]
    assert len(ids) == len(set(ids)) == SCENES and len(data["annotations"]) == SCENES
    errors = list((tortured / "tables" / "errors").glob("*.parquet"))
    assert {p.name for p in errors} == {p.name for p in (tortured / "tables" / "images").glob("*.parquet")}
    assert pq.read_table(tortured / "tables" / "errors").num_rows == 0  # no orphaned error parts


def test_grown_input_processes_only_new_images(ray_runtime, tmp_path):
    images = tmp_path / "images"
    generate_scenes(tmp_path / "first", count=10, seed=31)
    generate_scenes(tmp_path / "second", count=5, seed=31, first=10)
    images.mkdir()
    for p in (tmp_path / "first" / "images").iterdir():
        p.rename(images / p.name)
    output = tmp_path / "out"
    first = run(RunConfig(input=str(images), output=str(output)), progress=lambda _: None)
    for p in (tmp_path / "second" / "images").iterdir():
        p.rename(images / p.name)
    second = run(RunConfig(input=str(images), output=str(output)), progress=lambda _: None)
    assert first["run"]["processed"] == 10
    assert second["run"]["processed"] == 5 and second["run"]["committed_before"] == 10
    data = coco(output)
    assert sorted(im["file_name"] for im in data["images"]) == sorted(p.name for p in images.iterdir())
    assert len({im["id"] for im in data["images"]}) == 15
    history = sorted((output / "_state" / "runs").glob("*.json"))
    assert [json.loads(p.read_text())["counts"]["processed"] for p in history] == [10, 5]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        third = run(RunConfig(input=str(images), output=str(output)), progress=lambda _: None)
    assert third["run"]["processed"] == 0 and third["dataset"]["images"] == 15
    # nothing new is no mistake: not Ray Data's warning that the actor pool got no input
    assert not [w for w in warned if "concurrent actors" in str(w.message)]


@pytest.mark.parametrize("error, ending", [("Terminated", "interrupted"), ("OSError", "failed")])
def test_a_run_stopped_while_it_rebuilds_coco_is_kept_in_the_history(ray_runtime, tmp_path, image_dir, monkeypatch,
                                                                      error, ending):
    """The rebuild of a large output takes minutes: a SIGTERM or a failure then must not lose the run's record."""
    import pipeline.run
    from pipeline.run import Terminated

    raised = {"Terminated": Terminated, "OSError": OSError}[error]

    def stopped(*args, **kwargs):
        raise raised

    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.run, "rebuild", stopped)
        with pytest.raises(raised):
            run(RunConfig(input=str(image_dir), output=str(output)), progress=lambda _: None)
    [record] = [json.loads(p.read_text()) for p in (output / "_state" / "runs").glob("*.json")]
    assert record[ending] and "finished" not in record
    assert record.get("error_type") == (error if ending == "failed" else None)
    images = len(list(image_dir.rglob("img_*")))
    assert record["counts"]["ok"] + record["counts"]["failed"] == images > 0
    assert run(RunConfig(input=str(image_dir), output=str(output)), progress=lambda _: None)["dataset"]["images"] == images


def test_changed_settings_are_refused_unless_overwrite(ray_runtime, tmp_path, image_dir):
    from pipeline.config import PostprocessConfig
    from pipeline.state import SettingsMismatch

    output = tmp_path / "out"
    run(RunConfig(input=str(image_dir), output=str(output), limit=2), progress=lambda _: None)
    changed = RunConfig(input=str(image_dir), output=str(output), limit=2, postprocess=PostprocessConfig(0.7))
    with pytest.raises(SettingsMismatch, match="postprocess"):
        run(changed, progress=lambda _: None)
    report = run(RunConfig(input=str(image_dir), output=str(output), limit=2, overwrite=True,
                           postprocess=PostprocessConfig(0.7)), progress=lambda _: None)
    assert report["run"]["processed"] == 2 and report["settings"]["postprocess"]["threshold"] == 0.7
    # `auto` is recorded as what it ran as (float32 on this CPU machine): naming it is no change
    assert report["settings"]["dtype"] == "float32"
    same = RunConfig(input=str(image_dir), output=str(output), limit=3, dtype="float32",
                     postprocess=PostprocessConfig(0.7))
    assert run(same, progress=lambda _: None)["run"]["processed"] == 1
    with pytest.raises(SettingsMismatch, match='dtype: "float32" -> "bfloat16"'):
        run(RunConfig(input=str(image_dir), output=str(output), dtype="bfloat16", postprocess=PostprocessConfig(0.7)),
            progress=lambda _: None)
    # another folder's keys would be taken for this one's: refused; the same folder by a link is the same
    other = tmp_path / "day2"
    shutil.copytree(image_dir, other)
    with pytest.raises(SettingsMismatch, match=f'input_root: "{image_dir.resolve()}" -> "{other.resolve()}"'):
        run(RunConfig(input=str(other), output=str(output), postprocess=PostprocessConfig(0.7)), progress=lambda _: None)
    (tmp_path / "link").symlink_to(image_dir)
    again = RunConfig(input=f"{tmp_path / 'link'}/", output=str(output), limit=3, postprocess=PostprocessConfig(0.7))
    assert run(again, progress=lambda _: None)["run"]["committed_before"] == 3
    # the same weights with images resized otherwise by the processor: refused
    from pipeline.model import BUNDLED_DIR

    model = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR, model)
    processor = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps(processor | {"size": {"shortest_edge": 96, "longest_edge": 192}}))
    with pytest.raises(SettingsMismatch, match="processor.size.shortest_edge: 128 -> 96"):
        run(RunConfig(input=str(image_dir), output=str(output), model=str(model), postprocess=PostprocessConfig(0.7)),
            progress=lambda _: None)


def _predictor_pids() -> list[int]:
    """Ray names an actor's process after it: `ray::MapWorker(MapBatches(InferenceActor))...`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and "InferenceActor" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_killed_predictor_actor_is_restarted_and_nothing_is_lost(ray_runtime, tmp_path):
    images = generate_scenes(tmp_path / "scenes", count=60, seed=41) / "images"
    output = tmp_path / "out"
    killed: list[int] = []
    rows_at_kill: list[int] = []

    def kill_predictor_once() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            rows = committed_rows(output)
            if rows >= 8:  # inference is well under way, and more is to come
                rows_at_kill.append(rows)
                for pid in _predictor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_predictor_once)
    killer.start()
    report = run(RunConfig(input=str(images), output=str(output),
                           execution=ExecutionConfig(batch_size=2, shard_size=4)), progress=lambda _: None)
    killer.join()
    assert killed, "no Predictor actor process was found: nothing was tested"
    assert rows_at_kill[0] < 60  # killed mid-run, with images still to infer
    assert report["run"]["ok"] == 60 and report["run"]["failed"] == 0
    keys = [r["key"] for r in images_table(output)]
    assert sorted(keys) == sorted(p.name for p in images.iterdir())  # each exactly once


def test_failed_images_are_redone_only_when_asked(ray_runtime, tmp_path, image_dir):
    images = tmp_path / "images"
    images.mkdir()
    good = (image_dir / "img_0.jpg").read_bytes()
    for i in range(3):
        (images / f"ok_{i}.jpg").write_bytes(good)
    (images / "late.jpg").write_bytes(good[: len(good) // 3])  # still uploading when the run read it
    output = tmp_path / "out"
    config = RunConfig(input=str(images), output=str(output), max_error_ratio=1.0)
    first = run(config, progress=lambda _: None)
    assert first["run"]["failed"] == 1 and first["dataset"]["errors"] == 1
    (images / "late.jpg").write_bytes(good)
    messages: list[str] = []
    assert run(config, progress=messages.append)["run"]["processed"] == 0  # a failure is committed
    assert messages[-1] == "1 images failed in earlier runs and are not retried; --retry-failed retries them"
    messages.clear()
    retried = run(RunConfig(input=str(images), output=str(output), retry_failed=True), progress=messages.append)
    assert retried["run"]["processed"] == 1 and retried["run"]["ok"] == 1
    assert retried["dataset"]["images"] == 4 and retried["dataset"]["errors"] == 0
    assert any("retrying 1 images" in m for m in messages) and "failed in earlier runs" not in messages[-1]
    assert pq.read_table(output / "tables" / "errors").num_rows == 0
    assert sorted(im["file_name"] for im in coco(output)["images"]) == ["late.jpg", "ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]


def test_a_stop_for_too_many_errors_reports_what_was_committed(ray_runtime, tmp_path):
    """The report counts exactly what is committed once the stop has ended every write, and
    nothing half-written is left (errors parts of shards that never committed)."""
    from pipeline.run import TooManyErrors

    images = tmp_path / "images"
    images.mkdir()
    for i in range(300):
        (images / f"{i:04d}.jpg").write_bytes(b"not an image")
    output = tmp_path / "out"
    with pytest.raises(TooManyErrors, match="images failed"):
        run(RunConfig(input=str(images), output=str(output), max_error_ratio=0.1,
                      execution=ExecutionConfig(shard_size=4)), progress=lambda _: None)
    report = json.loads((output / "report.json").read_text())
    parts = list((output / "tables" / "errors").glob("*.parquet"))
    assert all((output / "tables" / "images" / p.name).exists() for p in parts)  # each its shard's commit
    committed = sum(pq.read_metadata(p).num_rows for p in parts)
    assert 20 <= committed <= 300
    assert report["run"]["failed"] == report["run"]["processed"] == report["dataset"]["errors"] == committed


@pytest.mark.parametrize("sig, presses, status, line", [(signal.SIGINT, 1, 130, "interrupted"),
                                                         (signal.SIGINT, 2, 130, "interrupted"),
                                                         (signal.SIGTERM, 1, 143, "terminated")])
def test_ctrl_c_or_sigterm_prints_one_line_keeps_the_run_in_the_history_and_resumes(scenes, tmp_path, sig, presses,
                                                                                     status, line):
    """Ctrl-C in a terminal (pressed twice by an impatient user: the second lands while the run
    records itself or Ray shuts down), or SIGTERM from `timeout`, systemd, Slurm or Kubernetes."""
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for path in sorted(scenes.iterdir())[:120]:
        (images / path.name).symlink_to(path)
    process = subprocess.Popen(
        [sys.executable, str(JOB), "--input", str(images), "--output", str(output), "--batch-size", "1",
         "--shard-size", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # as from a terminal: a shell's background job (e.g. CI under nohup) ignores SIGINT, and
        # children inherit that, so Python would never see the Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and committed_rows(output) == 0:
        time.sleep(0.2)
    assert process.poll() is None, "the job ended before it could be interrupted"
    for press in range(presses):
        time.sleep(0.3 * press)
        os.killpg(process.pid, sig)  # what Ctrl-C in a terminal (and a scheduler) sends: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr and f"{line}: committed shards are kept" in stderr
    assert "SIGTERM received" not in stderr  # Ray's own handler's stack dump
    (record,) = [json.loads(p.read_text()) for p in (output / "_state" / "runs").glob("*.json")]
    assert record["interrupted"] and "finished" not in record
    assert 0 < committed_rows(output) < 120
    assert 0 < record["counts"]["ok"] + record["counts"]["failed"] <= committed_rows(output)  # what it had committed
    if (sig, presses) != (signal.SIGINT, 1):
        return  # the resume is the same whichever signal stopped the run: checked once
    assert start_job(images, output).wait(timeout=900) == 0
    assert len(images_table(output)) == 120 and len(list((output / "_state" / "runs").glob("*.json"))) == 2


def test_two_jobs_started_at_once_on_one_output_one_runs_the_other_is_refused(scenes, tmp_path):
    """A scheduled run that starts while the last one still runs must not segment its images again."""
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for path in sorted(scenes.iterdir())[:24]:
        (images / path.name).symlink_to(path)
    jobs = [subprocess.Popen([sys.executable, str(JOB), "--input", str(images), "--output", str(output)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}) for _ in range(2)]
    outcomes = sorted((job.wait(timeout=600), job.stderr.read()) for job in jobs)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    refused = outcomes[1][1]
    assert "Traceback" not in refused and "is being written by run" in refused
    keys = [row["key"] for row in images_table(output)]
    assert len(keys) == len(set(keys)) == 24
    assert not (output / "_state" / "lease.json").exists()


def test_more_inference_actors_than_the_machine_holds_is_refused(ray_runtime, tmp_path, image_dir):
    """Two actors of one CPU each on two CPUs leave listing no room: Ray would wait forever."""
    from pipeline.run import ClusterTooSmall

    with pytest.raises(ClusterTooSmall, match="--concurrency 2 needs 2.75 CPUs, the cluster has 2"):
        run(RunConfig(input=str(image_dir), output=str(tmp_path / "out"),
                      execution=ExecutionConfig(concurrency=(2, 2))), progress=lambda _: None)
    assert not (tmp_path / "out").exists()  # refused before it took the output's lease
