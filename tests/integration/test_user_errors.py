"""User mistakes the job meets before or while it runs: one `error:` line, exit status 2, no traceback.

Those found in a Ray task or actor (a model the actors cannot load, a disk that fills up under
the write tasks) reach the driver as the text of their traceback only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.model import BUNDLED_DIR

JOB = Path(__file__).resolve().parents[2] / "jobs" / "segment_bucket.py"
SAMPLES = BUNDLED_DIR.parent / "samples"


def job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]  # where Ray prints a failed actor's
    assert "DataContext" not in result.stderr, result.stderr[-3000:]  # Ray's advice, not a user's to take
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line and "ERROR" not in line]
    return line


@pytest.mark.parametrize("flag", ["--input", "--output", "--model", "--label-map"])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, flag):
    args = {"--input": str(SAMPLES), "--output": str(tmp_path / "out")} | {flag: ""}
    line = one_error_line(job(*[item for pair in args.items() for item in pair]))
    assert f"argument {flag}: expected a path or URL, got an empty string" in line
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_named_as_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(afile)))
    assert line == f"error: --output {afile} is a file, not a folder"
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(afile / "out")))
    assert line == f"error: --output {afile / 'out'} cannot be made: {afile} is a file, not a folder"
    assert afile.read_text() == "mine"


@contextmanager
def tmpfs(tmp_path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted with `options` for the body of the `with`; the test is skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_read_only_output_is_named_not_the_probe_written_to_it(tmp_path):
    with tmpfs(tmp_path, "ro") as disk:
        for output in (disk, disk / "out"):
            line = one_error_line(job("--input", str(SAMPLES), "--output", str(output)))
            assert line == f"error: --output {output} cannot be written: Read-only file system"


def test_a_local_model_that_does_not_exist_is_named_and_not_fetched(tmp_path):
    result = job("--input", str(SAMPLES), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "nope"))
    assert one_error_line(result) == f"error: model directory {tmp_path / 'nope'} does not exist"
    assert "fetching" not in result.stdout


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["run", "overwrite"])
def test_a_folder_no_run_made_is_refused_and_nothing_in_it_touched(tmp_path, overwrite):
    """A run deletes errors parts it finds uncommitted, --overwrite every name runs write: neither
    may take a user's own files in a mistyped --output."""
    folder = tmp_path / "mine"
    for name in ("coco/my_annotations.json", "tables/errors/mine.parquet", "report.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("precious")
    before = sorted(folder.rglob("*"))
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(folder), *overwrite))
    assert "is not an output of this pipeline" in line and "nothing in it was changed" in line
    assert sorted(folder.rglob("*")) == before  # no lease, no probe, no _state/ left
    for name in ("coco/my_annotations.json", "tables/errors/mine.parquet", "report.json"):
        assert (folder / name).read_text() == "precious"


def test_label_ids_to_fuse_the_model_lacks_are_refused(tmp_path):
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(tmp_path / "out" / "new"),
                              "--label-ids-to-fuse", "1,99"))
    assert "--label-ids-to-fuse: the model has no label ids [99] (its label ids: 0 to 4" in line
    assert not (tmp_path / "out").exists()  # the output check's probe leaves no folders behind


def test_a_model_the_inference_actors_cannot_load(tmp_path, untrained_model):
    mismatched = tmp_path / "mismatched"  # another architecture's config beside the bundled weights
    shutil.copytree(untrained_model, mismatched)
    shutil.copy(BUNDLED_DIR / "model.safetensors", mismatched / "model.safetensors")
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(tmp_path / "out"), "--model", str(mismatched)))
    assert line.startswith(f"error: model in {mismatched} cannot be loaded: its weights do not fit its config: ")
    assert "above report" not in line  # transformers' report went to the actor's log


def test_a_disk_that_fills_up_under_the_write_tasks(tmp_path):
    with tmpfs(tmp_path, "size=120k") as disk:
        (disk / "filler").write_bytes(b"\0" * 70_000)
        line = one_error_line(job("--input", str(SAMPLES), "--output", str(disk / "out"), "--shard-size", "2"))
        assert line == ("error: OSError: [Errno 28] No space left on device (committed shards are kept: rerun the "
                        "same command once it is fixed)")
        assert not list(disk.rglob("*.tmp"))  # no half-written temporaries beside the outputs


def test_a_processor_config_transformers_cannot_apply(tmp_path):
    """Refused at start-up, not committed as a failure of every image."""
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR, model)
    config = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps(config | {"size": 384}))  # no longest edge
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(tmp_path / "out"), "--model", str(model)))
    assert line.startswith(f"error: model in {model} cannot segment a test image: ValueError: Size must contain")
    assert not (tmp_path / "out" / "tables").exists()


def test_a_committed_part_damaged_since_is_one_line_naming_it(tmp_path):
    """Found by the listing, a Ray task: Ray Data logs its stack trace unless the job says otherwise."""
    import pyarrow.parquet as pq

    output = tmp_path / "out"
    assert job("--input", str(SAMPLES), "--output", str(output), "--limit", "2").returncode == 0
    (part,) = (output / "tables" / "images").glob("*.parquet")
    chunk = pq.read_metadata(part).row_group(0).column(0)
    assert chunk.path_in_schema == "key"
    data = bytearray(part.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + chunk.total_compressed_size - 1] ^= 0xFF  # the last page's last byte: its CRC fails
    part.write_bytes(bytes(data))
    line = one_error_line(job("--input", str(SAMPLES), "--output", str(output)))
    assert line.startswith(f"error: {part} cannot be read (OSError: ") and "damaged after it was committed" in line
