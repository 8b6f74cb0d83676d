"""Segment every image under --input with a MaskFormer checkpoint; write COCO panoptic outputs.

    python jobs/segment_bucket.py --input IMAGES --output OUT [options]
    ray job submit --working-dir . -- python jobs/segment_bucket.py --input s3://b/in --output s3://b/out

Outputs under --output: panoptic/<key>.png, tables/images/*.parquet, tables/errors/*.parquet,
coco/panoptic.json, report.json; with --tasks semantic,instance also semantic/<key>.png and
coco/instances.json. Rerunning the same command resumes: committed images are skipped.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ray.exceptions import RayError  # noqa: E402

from pipeline.config import PostprocessConfig, canonical_tasks  # noqa: E402
from pipeline.labels import LabelMapError  # noqa: E402
from pipeline.lease import OutputBusy  # noqa: E402
from pipeline.listing import MANIFEST_EXTENSIONS as MANIFESTS, InputError  # noqa: E402
from pipeline.local_paths import NotOnEveryNode  # noqa: E402
from pipeline.model import BUNDLED, ModelError  # noqa: E402
from pipeline.state import NotAnOutput, SettingsMismatch  # noqa: E402
from pipeline.remote import (S3_SCHEMES, UNREACHABLE, StorageConfig, StorageTimeout, UnsupportedURL,  # noqa: E402
                             redact, storage_error_message, unreachable_message)
from pipeline.run import ClusterTooSmall, ExecutionConfig, RunConfig, Terminated, TooManyErrors, run  # noqa: E402
from pipeline.storage import DamagedOutput, UnwritableOutput  # noqa: E402

USER_ERRORS = (InputError, ModelError, LabelMapError, SettingsMismatch, TooManyErrors, ClusterTooSmall, OutputBusy,
               UnsupportedURL, NotOnEveryNode, NotAnOutput, DamagedOutput, UnwritableOutput, StorageTimeout)


def user_error_message(exc: BaseException) -> str | None:
    """One line for a mistake the user can fix (bad input, model, storage); None for a bug."""
    if isinstance(exc, RayError):
        return _remote_user_error(str(exc))
    return _user_error_message(exc)


# the last line of a Python traceback: "[pipeline.module.|botocore.exceptions.]ErrorName: message"
_RAISED = re.compile(r"^(?:pipeline\.\w+\.|botocore\.exceptions\.)?(\w+): (.+)$", re.MULTILINE)
_OS_ERRORS = {"OSError", *(c.__name__ for c in (PermissionError, FileNotFoundError, IsADirectoryError,
                                              NotADirectoryError, FileExistsError, ConnectionError, TimeoutError))}


def _remote_user_error(text: str) -> str | None:
    """A user mistake raised in a Ray task or actor (a model that cannot be loaded, a full disk
    under a write task): Ray passes it on as the text of its traceback. Only the error the task
    died of counts, the last one raised (Ray's own lines name theirs with dots): a bug raised
    while handling an OSError stays a bug."""
    raised = _RAISED.findall(text)
    if not raised:
        return None
    name, message = raised[-1]
    if name in {e.__name__ for e in USER_ERRORS}:
        return message
    if name in UNREACHABLE:  # the storage went away under a task
        return unreachable_message(message)
    return _os_error(name, message) if name in _OS_ERRORS else None


def _os_error(name: str, message: str) -> str:
    """An operating system's refusal (a full disk, a permission): what the user fixes, and that
    nothing committed is lost."""
    return f"{name}: {message} (committed shards are kept: rerun the same command once it is fixed)"


def _user_error_message(exc: BaseException) -> str | None:
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    storage = storage_error_message(exc)
    if storage is not None:
        return storage
    if isinstance(exc, FileNotFoundError):
        return f"does not exist: {exc}"
    if isinstance(exc, OSError):  # unwritable output, full disk, read-only file system
        return _os_error(exc.__class__.__name__, str(exc))
    return None


def _number(text: str, kind: type, ok: Callable[[Any], bool], expected: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(expected)
    return value


def _concurrency(text: str) -> tuple[int, int]:
    expected = "expected N or MIN,MAX with 1 <= MIN <= MAX"
    parts = [_number(p, int, lambda _: True, expected) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(expected)
    return parts[0], parts[1]


def _labels_to_fuse(text: str) -> tuple[frozenset[int], bool]:
    """Comma-separated label ids, and the word `stuff` for every stuff class -> (ids, stuff named)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return frozenset(int(p) for p in parts if p != "stuff"), "stuff" in parts
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated label ids and/or the word stuff, e.g. 0,1 "
                                         "or stuff") from None


def _tasks(text: str) -> tuple[str, ...]:
    try:
        return canonical_tasks([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "expected a number between 0 and 1")


def _positive(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "expected a positive integer")


def _count(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "expected 0 or a positive integer")


def _endpoint(text: str) -> str:
    """botocore takes only a URL with its scheme: `127.0.0.1:9000` fails deep in the first request."""
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is no number from 0 to 65535; an IPv6 address without its closing bracket
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL with a host, e.g. "
                                         f"http://127.0.0.1:8333, got {text!r}")
    return text


def _path(text: str) -> str:
    if not text.strip():  # an unset shell variable: would mean the current folder
        raise argparse.ArgumentTypeError("expected a path or URL, got an empty string")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=_path,
                   help="folder of images (local path or fsspec URL such as s3://bucket/prefix), a single image, "
                        "or a manifest file of URIs (.parquet with a 'uri' column, .csv, or .txt one per line)")
    p.add_argument("--output", required=True, type=_path, help="output folder (local path or fsspec URL); rerun to resume")
    p.add_argument("--model", default=BUNDLED, type=_path,
                   help="checkpoint: a Hugging Face hub id (e.g. facebook/maskformer-swin-base-coco), a local "
                        "directory, or an s3:// directory; safetensors only (default: the bundled model)")
    p.add_argument("--label-map", type=_path, help="JSON label map giving isthing/COCO id/colour per model label "
                                       "(default: the checkpoint's label_map.json, else the COCO panoptic map)")
    p.add_argument("--endpoint-url", default=None, type=_endpoint,
                   help="S3-compatible endpoint for s3:// URLs (default: AWS, or $AWS_ENDPOINT_URL)")
    p.add_argument("--anonymous", action="store_true",
                   help="read s3:// input without credentials (public buckets)")
    p.add_argument("--batch-size", type=_positive, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--concurrency", type=_concurrency, default=(1, 1),
                   help="inference actors, N or MIN,MAX (default: 1); one GPU each when GPUs exist")
    p.add_argument("--shard-size", type=_positive, default=64,
                   help="images per committed shard: the unit of resume (default: 64)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="inference precision (default: auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in each inference actor: compiles for minutes at start-up; "
                        "only for long GPU runs of large checkpoints (slower on a CPU)")
    p.add_argument("--tasks", type=_tasks, default=("panoptic",),
                   help="outputs to make, comma-separated: panoptic (required in the list), semantic (class-id "
                        "PNGs), instance (COCO RLE masks of things, coco/instances.json) (default: panoptic)")
    p.add_argument("--threshold", type=_fraction, default=0.5,
                   help="minimum class score for a query to become a segment (default: 0.5)")
    p.add_argument("--mask-threshold", type=_fraction, default=0.5,
                   help="mask probability above which a pixel belongs to a query's mask (default: 0.5)")
    p.add_argument("--overlap-mask-area-threshold", type=_fraction, default=0.8,
                   help="minimum visible/total area ratio for a query's mask to be kept (default: 0.8)")
    p.add_argument("--label-ids-to-fuse", type=_labels_to_fuse, default=(frozenset(), False),
                   help="comma-separated label ids whose instances merge into one segment per image; the word "
                        "stuff names every stuff class, one segment each, as in COCO panoptic")
    p.add_argument("--limit", type=_positive, help="process at most this many inputs (in listing order)")
    p.add_argument("--max-error-ratio", type=_fraction, default=0.5,
                   help="stop (after committing what is done) once more than this share of images failed, "
                        "counted from the 20th image on (default: 0.5)")
    p.add_argument("--previews", type=_count, default=0, metavar="N",
                   help="write overlays of the first N images this run processes (none for those that fail), "
                        "and previews/index.html, a contact sheet of every overlay the output holds")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing output first; needed to change model or parameters on it")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo the images that earlier runs on this output committed as failed "
                        "(e.g. read errors while the bucket was unreachable)")
    args = p.parse_args(argv)
    variable = _endpoint_variable(args)
    if variable:
        try:
            _endpoint(os.environ[variable])
        except argparse.ArgumentTypeError as exc:
            p.error(f"${variable}: {exc}")
    return args


def _endpoint_variable(args: argparse.Namespace) -> str | None:
    """The environment variable botocore takes the S3 endpoint from, when this run may reach S3 (an
    s3:// URL, or a manifest, whose entries may be) and --endpoint-url does not name one; checked as
    the flag is."""
    urls = [str(url) for url in (args.input, args.output, args.model, args.label_map) if url]
    reaches_s3 = any(url.startswith(S3_SCHEMES) for url in urls) or args.input.lower().endswith(MANIFESTS)
    if args.endpoint_url or not reaches_s3:
        return None
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return next((name for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(name)), None)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    fuse, fuse_stuff = args.label_ids_to_fuse
    return RunConfig(
        input=args.input, output=args.output, model=args.model, label_map=args.label_map, dtype=args.dtype,
        limit=args.limit, overwrite=args.overwrite, retry_failed=args.retry_failed, previews=args.previews,
        max_error_ratio=args.max_error_ratio,
        storage=StorageConfig(endpoint_url=args.endpoint_url, anonymous=args.anonymous),
        postprocess=PostprocessConfig(args.threshold, args.mask_threshold, args.overlap_mask_area_threshold,
                                      fuse, args.tasks),
        fuse_stuff=fuse_stuff,
        execution=ExecutionConfig(batch_size=args.batch_size, concurrency=args.concurrency,
                                  shard_size=args.shard_size, compile=args.compile),
    )


class _Interrupts:
    """Ctrl-C: KeyboardInterrupt at the first press. What the job then does on its way out (record
    what the run committed, release the output, shut Ray down) is bounded in time, and a second
    press would cut it short, with a traceback where it lands in Ray's shutdown at exit: a second
    press says so, and a third quits at once (the output's lease then expires by itself)."""

    def __init__(self) -> None:
        self.presses = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.presses += 1
        if self.presses == 1:
            raise KeyboardInterrupt
        if self.presses > 2:
            os._exit(130)
        print("stopping: recording what the run committed and shutting down; Ctrl-C again quits at once",
              file=sys.stderr, flush=True)

    def exiting(self) -> None:
        """Ray shuts down at exit, after a run that ended by itself too: a press then stops nothing."""
        self.presses = max(self.presses, 1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Ray Data logs an error that ends the plan (a write task's full disk, an actor that cannot
    # load the model, a damaged part the listing reads), with its stack trace and advice on
    # DataContext settings, before re-raising it: here it becomes one error line, or, for a bug,
    # Python's own traceback. The executor's other warnings (a stage with no output for long) stay.
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").addFilter(
        lambda record: "Dataset execution will now abort" not in record.getMessage())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = config_from_args(parse_args(argv))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # unless started ignoring it (`&` in a script)
        interrupts = _Interrupts()
        signal.signal(signal.SIGINT, interrupts)
        atexit.register(interrupts.exiting)  # registered after `import ray` registered its shutdown: runs before it
    try:
        run(config)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}: committed shards are kept; rerun the same command "
              "to resume", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
