"""The one module that knows Ray: wires the stages into a Ray Data plan and drives it.

list (driver) -> prepare (CPU tasks) -> Predictor (actor pool) -> write_shard (CPU tasks)
-> rebuild coco/panoptic.json + report.json from all committed shards (driver).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import pyarrow as pa

from pipeline.coco import write_panoptic_json
from pipeline.config import PostprocessConfig
from pipeline.labels import load_categories
from pipeline.listing import InputError, iter_inputs
from pipeline.model import BUNDLED, ModelSource, load_config, local_dir, weights_digest
from pipeline.prepare import PrepareConfig
from pipeline.remote import StorageConfig
from pipeline.report import RunCounts, build_report, write_report
from pipeline.previews import preview_path, write_index
from pipeline.shards import ShardOutput, committed_keys, remove_uncommitted
from pipeline.state import check_settings, clear_outputs, record_run
from pipeline.storage import OutputStore

log = logging.getLogger(__name__)
LIST_BLOCK_ROWS = 16  # rows per listed block: the unit of parallel read + decode
# Differs from prepare_cpus on purpose: Ray fuses adjacent map stages with equal resources, which
# would run decoding serially inside the inference actor instead of in parallel tasks.
PREDICTOR_CPUS = 1.0


@dataclass(frozen=True)
class ExecutionConfig:
    batch_size: int = 8  # images per forward pass
    concurrency: tuple[int, int] = (1, 1)  # (min, max) inference actors
    shard_size: int = 64  # images per committed shard
    prepare_cpus: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.concurrency
        if self.batch_size < 1 or self.shard_size < 1 or not 1 <= low <= high:
            raise ValueError("batch size and shard size must be >= 1, and concurrency 1 <= min <= max")


@dataclass(frozen=True)
class RunConfig:
    input: str
    output: str
    model: str = BUNDLED
    label_map: str | None = None
    dtype: str = "auto"
    limit: int | None = None
    previews: int = 0  # overlays for the first N images of this run
    overwrite: bool = False  # delete an existing output first (e.g. to change model)
    postprocess: PostprocessConfig = PostprocessConfig()
    execution: ExecutionConfig = ExecutionConfig()
    storage: StorageConfig = StorageConfig()


def _block(keys: list[str], uris: list[str], first_index: int, previews: int) -> pa.Table:
    preview = [first_index + i < previews for i in range(len(keys))]
    return pa.table({"key": keys, "uri": uris, "preview": preview})


def _preview_keys(blocks: list[pa.Table]) -> list[str]:
    return [key for block in blocks for key, preview in zip(block["key"].to_pylist(), block["preview"].to_pylist())
            if preview]


def _pending_blocks(config: RunConfig, done: set[str], counts: RunCounts) -> list[pa.Table]:
    """(key, uri, preview) blocks of the inputs not yet committed; keys de-duplicated."""
    blocks, keys, uris, seen, pending = [], [], [], set(), 0
    for key, uri in iter_inputs(config.input, config.storage):
        if key in seen:
            continue
        seen.add(key)
        counts.listed += 1
        if key in done:
            counts.already_done += 1
        else:
            keys.append(key)
            uris.append(uri)
            if len(keys) == LIST_BLOCK_ROWS:
                blocks.append(_block(keys, uris, pending, config.previews))
                pending, keys, uris = pending + len(keys), [], []
        if config.limit is not None and counts.listed >= config.limit:
            break
    if keys:
        blocks.append(_block(keys, uris, pending, config.previews))
    if counts.listed == 0:
        raise InputError(f"no images found under {config.input}")
    return blocks


def _plan(blocks: list[pa.Table], config: RunConfig, out: ShardOutput):
    import ray
    import torch
    from ray.data import ActorPoolStrategy

    from pipeline.predictor import InferenceConfig, Predictor
    from pipeline.prepare import prepare_batch
    from pipeline.shards import write_shard

    execution = config.execution
    low, high = execution.concurrency
    on_gpu = torch.cuda.is_available() or bool(ray.cluster_resources().get("GPU"))
    prepare = PrepareConfig(model=config.model, storage=config.storage)
    inference = InferenceConfig(model=config.model, dtype=config.dtype, postprocess=config.postprocess,
                                storage=config.storage)
    return (
        ray.data.from_arrow(blocks)
        .map_batches(prepare_batch, fn_kwargs={"config": prepare}, batch_size=None, num_cpus=execution.prepare_cpus)
        .map_batches(Predictor, fn_constructor_kwargs={"config": inference}, batch_size=execution.batch_size,
                     compute=ActorPoolStrategy(min_size=low, max_size=high),
                     num_gpus=1 if on_gpu else 0, num_cpus=PREDICTOR_CPUS)
        .map_batches(write_shard, fn_kwargs={"out": out},
                     batch_size=execution.shard_size, num_cpus=0.5)
    )


def _drive(results: Iterator[dict], counts: RunCounts, total: int, progress: Callable[[str], None],
           every_seconds: float = 5.0) -> None:
    start = last = time.monotonic()
    for batch in results:
        ok = int(batch["ok"].sum())
        counts.ok += ok
        counts.failed += len(batch["ok"]) - ok
        now = time.monotonic()
        if now - last >= every_seconds:
            last = now
            rate = counts.processed / (now - start)
            progress(f"progress: {counts.processed}/{total} images, {rate:.2f} images/s, {counts.failed} errors")


def _settings(config: RunConfig, model_dir, categories) -> dict:
    """What changes results: recorded with the output, compared on every later run."""
    return {"model": config.model, "model_digest": weights_digest(model_dir),
            "categories": [c.coco() | {"label_id": c.label_id} for c in categories], "dtype": config.dtype,
            "postprocess": {**asdict(config.postprocess),
                            "label_ids_to_fuse": sorted(config.postprocess.label_ids_to_fuse)}}


def run(config: RunConfig, progress: Callable[[str], None] = print) -> dict:
    """Segment every not-yet-committed input; rebuild COCO JSON and report.json. Returns the report."""
    started, started_at = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store = OutputStore(config.output, config.storage)
    store.check_writable()
    model_dir = local_dir(ModelSource(config.model, config.storage))
    categories = load_categories(load_config(model_dir).id2label, model_dir, config.label_map,
                                 config.storage.options(config.label_map or ""))
    if config.overwrite:
        clear_outputs(store)
    settings = _settings(config, model_dir, categories)
    check_settings(store, settings)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]

    remove_uncommitted(store)
    counts = RunCounts()
    blocks = _pending_blocks(config, committed_keys(store), counts)
    pending = sum(b.num_rows for b in blocks)
    progress(f"{counts.listed} images listed, {counts.already_done} already done, {pending} to segment")
    if blocks:
        import ray

        ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
        out = ShardOutput(store, categories, run_id, config.model, config.storage)
        dataset = _plan(blocks, config, out)
        _drive(dataset.iter_batches(batch_size=None, batch_format="numpy"), counts, pending, progress)
    if config.previews:
        write_index(store, [key for key in _preview_keys(blocks) if store.exists(preview_path(key))])
    totals = write_panoptic_json(store, categories)
    counts.wall_seconds = time.monotonic() - started
    record = {"run_id": run_id, "started": started_at, "input": config.input,
              "execution": asdict(config.execution), **settings}
    report = build_report(counts, totals, store, categories, record)
    write_report(store, report)
    record_run(store, record | {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "counts": report["run"]})
    progress(f"done: {counts.ok} segmented, {counts.failed} failed, {counts.already_done} already done, "
             f"{counts.images_per_second:.2f} images/s; outputs under {config.output}")
    return report
