"""The one module that knows Ray: wires the stages into a Ray Data plan and drives it.

pending inputs (one streaming read task) -> prepare (CPU tasks) -> InferenceActor (actor pool)
-> write_shard (CPU tasks) -> rebuild coco/panoptic.json + report.json from all committed shards.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.coco import rebuild
from pipeline.config import InferenceConfig, PostprocessConfig, resolved_dtype
from pipeline.labels import Category, load_categories
from pipeline.lease import CLOCK_MARGIN_SECONDS, EXPIRES_SECONDS, OutputBusy, check_free, hold_lease
from pipeline.listing import InputError, iter_inputs, keys_root
from pipeline.local_paths import absolute, check_every_node_sees, probes, seen
from pipeline.model import (BUNDLED, CHECKPOINT_SUFFIXES, ModelError, ModelSource, local_dir, model_labels,
                            processor_settings, weights_digest)
from pipeline.pending import BLOCK_ROWS, PendingConfig, pending_blocks
from pipeline.prepare import PrepareConfig
from pipeline.previews import PREVIEWS_DIR, write_index
from pipeline.remote import StorageConfig
from pipeline.report import RunCounts, build_report, write_report
from pipeline.shards import (NOT_COMMITTED, STAGE_SECONDS, ShardOutput, committed_counts, committed_errors,
                             committed_parts, forget_failures, remove_uncommitted)
from pipeline.state import RUNS_DIR, check_is_output, check_settings, clear_outputs, record_run
from pipeline.storage import OutputStore

# Differs from prepare_cpus on purpose: Ray fuses adjacent map stages with equal resources, which
# would run decoding serially inside the inference actor instead of in parallel tasks.
PREDICTOR_CPUS = 1.0
# Listing mostly waits on storage. At a full CPU it would hold a core for as long as a large prefix
# takes to list, and on a small node decoding could not start until listing ended.
LISTING_CPUS = 0.25
MAX_BLOCK_BYTES = 16 << 20  # about 17 decoded 640x480 images
NODE_ANSWER_SECONDS = 60.0  # a node's first task may wait for a worker process to start
WRITE_CPUS = 0.5


@dataclass(frozen=True)
class ExecutionConfig:
    batch_size: int = 8  # images per forward pass
    concurrency: tuple[int, int] = (1, 1)  # (min, max) inference actors
    shard_size: int = 64  # images per committed shard
    prepare_cpus: float = 0.5
    compile: bool = False  # torch.compile the model in each inference actor

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
    max_error_ratio: float = 0.5  # stop once more than this share of images failed (after 20)
    overwrite: bool = False  # delete an existing output first (e.g. to change model)
    retry_failed: bool = False  # redo the images that earlier runs committed as failed
    postprocess: PostprocessConfig = PostprocessConfig()
    # also fuse every stuff class of the label map (COCO panoptic's one segment per stuff class):
    # run() adds their ids to postprocess.label_ids_to_fuse, which is what outputs record
    fuse_stuff: bool = False
    execution: ExecutionConfig = ExecutionConfig()
    storage: StorageConfig = StorageConfig()


class PendingDatasource(Datasource):
    """One read task that lists the input and streams the not-yet-committed keys."""

    def __init__(self, config: PendingConfig) -> None:
        self.config = config

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        config = self.config
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(lambda: pending_blocks(config), metadata)]


class ClusterTooSmall(ValueError):
    """The inference actors asked for leave no room for listing, decoding and writing."""


def _check_room(execution: ExecutionConfig, on_gpu: bool, can_grow: bool, progress: Callable[[str], None]) -> None:
    """Refuse (on a local runtime) or warn (on a cluster, which may grow) when the minimum of
    inference actors and one task of every other stage do not fit: Ray would wait forever."""
    low = execution.concurrency[0]
    need = {"CPU": low * PREDICTOR_CPUS + LISTING_CPUS + max(execution.prepare_cpus, WRITE_CPUS)}
    if on_gpu:
        need["GPU"] = low
    have = ray.cluster_resources()
    short = [f"{need[r]:g} {r}s, the cluster has {have.get(r, 0):g}" for r in need if need[r] > have.get(r, 0)]
    if not short:
        return
    message = (f"--concurrency {low} needs {'; '.join(short)} (each inference actor takes {PREDICTOR_CPUS:g} CPU"
               f"{' and a GPU' if on_gpu else ''}; listing, decoding and writing need the rest)")
    if not can_grow:
        raise ClusterTooSmall(f"{message}: lower --concurrency")
    progress(f"warning: {message}; the run waits until the cluster grows")


def _check_nodes_see(paths: list[tuple[str, str]], store: OutputStore, run_id: str,
                     progress: Callable[[str], None]) -> None:
    """On a cluster of several nodes, refuse the run unless each node sees the run's local paths
    ((flag, path) pairs) and a file the driver writes in a local output as the driver does
    (local_paths.py). Nodes that join the cluster later are not checked."""
    # the nodes tasks can run on (a head node without CPUs runs none), the driver's own aside
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
    if not set(nodes) - {ray.get_runtime_context().get_node_id()} or not (paths or store.is_local):
        return
    probe = f".probe-{run_id}"  # a new name: seen on a node only if that node shares the driver's disk
    if store.is_local:
        store.write_bytes(probe, b"")
        paths = [*paths, ("--output", store.path(probe))]
    try:
        checks = probes(paths)
        look = ray.remote(num_cpus=0)(seen)
        answers = {f"{address} ({node_id[:8]})": look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote([c.path for c in checks])
            for node_id, address in nodes.items()}
        ready, _ = ray.wait(list(answers.values()), num_returns=len(answers), timeout=NODE_ANSWER_SECONDS)
        answered, views = set(ready), {}
        for node, ref in answers.items():
            try:
                if ref in answered:
                    views[node] = ray.get(ref)
            except ray.exceptions.RayError:  # the node left the cluster meanwhile (autoscaler, spot)
                pass
        if len(views) < len(answers):
            progress(f"warning: {len(answers) - len(views)} of {len(answers)} nodes did not say within "
                     f"{NODE_ANSWER_SECONDS:.0f} s whether they see the run's local paths")
        check_every_node_sees(checks, views)
    finally:
        if store.is_local:
            store.delete(probe)


def _on_gpu() -> bool:
    """Whether the cluster has GPUs (Ray finds a node's GPUs when the node starts): each
    inference actor then takes one."""
    return bool(ray.cluster_resources().get("GPU"))


class InferenceActor:
    """The inference stage's callable class: a `pipeline.predictor.Predictor`, imported in the
    actor. The driver only names this class, and importing torch, torchvision and transformers
    there held up the start of every run by seconds (measured: 6.5 s on 2 cores)."""

    def __init__(self, config: InferenceConfig) -> None:
        from pipeline.model import ModelError
        from pipeline.predictor import Predictor

        # A model the actor cannot load or run fails the run at the actor's first batch, with
        # the job's one error line. Raised here, Ray would also print each failed actor's
        # traceback to the driver's stdout (its error listener, whatever log_to_driver says).
        try:
            self.predictor, self.error = Predictor(config), None
        except ModelError as exc:
            self.predictor, self.error = None, exc

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise self.error
        return self.predictor(batch)


def _plan(config: RunConfig, out: ShardOutput, dtype: str, on_gpu: bool) -> ray.data.Dataset:
    from pipeline.prepare import prepare_batch
    from pipeline.shards import write_shard

    execution = config.execution
    low, high = execution.concurrency
    pending = PendingConfig(config.input, out.store, config.storage, config.limit, config.previews,
                            run_id=out.run_id)
    prepare = PrepareConfig(storage=config.storage)
    inference = InferenceConfig(model=config.model, dtype=dtype, postprocess=config.postprocess,
                                compile=execution.compile, storage=config.storage.signed(), actors=high)
    # One block per 16 keys as pending.py makes them: left to itself Ray splits the single read
    # task's blocks toward 200 blocks, one key each (measured: ~25 s of overhead per 1,000 keys).
    # (`override_num_blocks=1` stops the split too, but then no shard committed before the last
    # image was inferred: a kill lost the whole run's work.)
    context = ray.data.DataContext.get_current()
    context.read_op_min_num_blocks = 1
    # Blocks are the unit of Ray Data's object-store accounting and backpressure. At Ray's default
    # (128 MiB) a decode task's output was ~140 decoded images per block, and the queue in front of
    # the inference actor grew in such steps for as long as decoding outran inference (measured,
    # 1,000 vs 10,000 images: peak memory 3.2 vs 4.3 GiB). At 16 MiB it stays near 0.6 GiB and
    # the peak no longer grows with the run: 3.1 vs 3.3 GiB.
    context.target_max_block_size = MAX_BLOCK_BYTES
    # a rerun with fewer pending images than --concurrency's minimum (none: a scheduled rerun that
    # finds nothing new) is no mistake, but Ray Data warns about concurrency left unused
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    return (
        ray.data.read_datasource(PendingDatasource(pending), num_cpus=LISTING_CPUS)
        # decoded in batches of BLOCK_ROWS: a task's batch of full-size images is all in its memory
        .map_batches(prepare_batch, fn_kwargs={"config": prepare}, batch_size=BLOCK_ROWS,
                     num_cpus=execution.prepare_cpus)
        .map_batches(InferenceActor, fn_constructor_kwargs={"config": inference}, batch_size=execution.batch_size,
                     compute=ActorPoolStrategy(min_size=low, max_size=high),
                     num_gpus=1 if on_gpu else 0, num_cpus=PREDICTOR_CPUS)
        .map_batches(write_shard, fn_kwargs={"out": out}, batch_size=execution.shard_size, num_cpus=WRITE_CPUS)
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, as `timeout`, systemd, Slurm and Kubernetes stop a job: handled as Ctrl-C is."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises Terminated in the body, then the handler before it is back. Entered after
    ray.init: Ray's own handler exits at once, without the run's record, and dumps a stack."""
    if threading.current_thread() is not threading.main_thread():  # only there can a handler be set
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TooManyErrors(RuntimeError):
    """More images failed than --max-error-ratio allows; what was done is committed."""


MIN_IMAGES_FOR_ERROR_RATIO = 20
# What recording a run that stopped early may take (see _record_stopped): the footers of the
# shards it committed are read for its counts.
RECORD_SECONDS = 30.0


def _drive(results: Iterator[dict], counts: RunCounts, progress: Callable[[str], None], max_error_ratio: float,
           still_held: Callable[[], None], every_seconds: float = 5.0) -> bool:
    """Consume shard results, printing progress every `every_seconds`; False if stopped for too
    many errors. `still_held` raises once the output's lease is lost (see lease.hold_lease).

    The progress line comes from a timer, not from the results: the first shard commits only once
    its images are listed, decoded and segmented, which a large model's start-up delays by minutes."""
    start = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every_seconds):
            elapsed = time.monotonic() - start
            progress(f"progress: {counts.processed} images done in {elapsed:.0f} s, "
                     f"{counts.processed / elapsed:.2f} images/s, {counts.failed} errors")

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        for batch in results:
            still_held()
            if (batch["error_type"] == NOT_COMMITTED).any():  # its write task found the lease lost or ending
                raise OutputBusy(f"stopped: a shard's writes could not land while this run surely held the "
                                 f"output's lease (the store did not take them in time, or the run went unseen "
                                 f"for over {EXPIRES_SECONDS - CLOCK_MARGIN_SECONDS:.0f} s and another run may "
                                 "have taken the output over); what it committed is kept, and its shards in "
                                 "flight were not committed")
            ok = int(batch["ok"].sum())
            counts.ok += ok
            counts.failed += len(batch["ok"]) - ok
            counts.error_types.update(t for t in batch["error_type"].tolist() if t)
            counts.stage_seconds.update({name: float(batch[name].sum()) for name in STAGE_SECONDS})
            if counts.processed >= MIN_IMAGES_FOR_ERROR_RATIO and counts.failed > max_error_ratio * counts.processed:
                return False
        return True
    finally:
        stop.set()
        ticker.join()


def _stop(dataset: ray.data.Dataset, results: Iterator[dict]) -> None:
    """End the plan early: no task starts after this, and every running one has ended.

    Closing the iterator alone cancels the running tasks without waiting for them, and a write
    task cancelled mid-way could commit after the run had counted its commits (measured: 170
    counted, 174 committed). Shutting the executor down with `force` kills them but does not
    wait for them either: it waits with `ray.get`, which returns a streaming generator (what a
    map task is) at once (Ray 2.60). So each running task's end is awaited here; a killed write
    task has committed all or nothing."""
    executor = getattr(dataset, "_current_executor", None)  # set by iter_batches in Ray 2.60
    if executor is not None:
        running = [task.get_waitable() for op in executor._topology for task in op.get_active_tasks()]
        executor.shutdown(force=True)
        for waitable in running:
            try:
                ray.get(waitable.completed() if isinstance(waitable, ray.ObjectRefGenerator) else waitable)
            except ray.exceptions.RayError:  # killed, as intended, or failed on its own
                pass
    results.close()


def _settings(config: RunConfig, model_dir, categories, dtype: str) -> dict:
    """What changes results, and what the keys are relative to: recorded with the output,
    compared on every later run."""
    return {"input_root": keys_root(config.input, config.storage),
            "model": config.model, "model_digest": weights_digest(model_dir), "processor": processor_settings(model_dir),
            "categories": [c.coco() | {"label_id": c.label_id} for c in categories], "dtype": dtype,
            "postprocess": {**asdict(config.postprocess),
                            "label_ids_to_fuse": sorted(config.postprocess.label_ids_to_fuse),
                            "tasks": list(config.postprocess.tasks)}}


def _record_stopped(store: OutputStore, record: dict, before: tuple[str, ...], progress: Callable[[str], None]) -> None:
    """Record a run that stopped early, with what it committed; within RECORD_SECONDS, or not at
    all: the store may be what stopped it, the error that did is the one to report, and Ctrl-C
    and SIGTERM must not wait long on it."""
    failed: list[BaseException] = []

    def write() -> None:
        try:
            record_run(store, record | {"counts": _committed_since(store, before)})
        except Exception as exc:
            failed.append(exc)

    recorder = threading.Thread(target=write, name="record", daemon=True)
    recorder.start()
    recorder.join(RECORD_SECONDS)
    if recorder.is_alive() or failed:
        why = f"{type(failed[0]).__name__}: {failed[0]}" if failed else f"not written within {RECORD_SECONDS:.0f} s"
        progress(f"warning: this run's record in {store.url(RUNS_DIR)} is missing ({why})"[:500])


def _committed_since(store: OutputStore, before: tuple[str, ...]) -> dict:
    """What the shards committed since `before` hold: a stopped run's counts. (The driver's count
    of streamed results lags: shards commit before their results reach it.)"""
    earlier = set(before)
    segmented, failed = committed_counts(store, [p for p in committed_parts(store) if p not in earlier])
    return {"ok": segmented, "failed": failed}


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run(config: RunConfig, progress: Callable[[str], None] = print) -> dict:
    """Segment every not-yet-committed input; rebuild COCO JSON and report.json. Returns the report."""
    started, started_at = time.monotonic(), _utc()
    # local paths as the driver means them: tasks run in other folders, on other machines
    source = ModelSource(config.model)
    local_model = config.model != BUNDLED and not source.is_remote_dir and source.path.is_dir()
    config = replace(config, input=absolute(config.input), output=absolute(config.output),
                     model=absolute(config.model) if local_model else config.model)
    store = OutputStore(config.output, config.storage)
    store.check_writable()  # the first request to the output: its message names --output
    check_is_output(store)  # before the run changes anything there (the probe is gone again)
    if config.model != BUNDLED and not source.is_local_path:  # minutes for a large checkpoint, with no other output
        progress(f"model {config.model}: fetching it, or reading this machine's cached copy")
    model_dir = local_dir(ModelSource(config.model, config.storage.signed()))
    labels = model_labels(model_dir)
    unknown = sorted(config.postprocess.label_ids_to_fuse - set(labels))
    if unknown:
        raise ModelError(f"--label-ids-to-fuse: the model has no label ids {unknown} (its label ids: "
                         f"{min(labels)} to {max(labels)}; label ids are the model's, not COCO category ids)")
    categories = load_categories(labels, model_dir, config.label_map, config.storage.signed())
    if config.fuse_stuff:
        stuff = {c.label_id for c in categories if not c.isthing}
        if not stuff:
            progress("warning: --label-ids-to-fuse stuff: the label map has no stuff class, so it fuses nothing")
        config = replace(config, fuse_stuff=False, postprocess=replace(
            config.postprocess, label_ids_to_fuse=config.postprocess.label_ids_to_fuse | stuff))
    first = next(iter_inputs(config.input, config.storage, config.output), None)
    if first is None:
        raise InputError(f"no images found under {config.input}")
    # what the run reads from local disks: the input, its first image (a manifest's entries are
    # read where the manifest is not), the model's files
    local = [("--input", path) for path in dict.fromkeys((config.input, first[1])) if "://" not in path]
    if local_model:
        local += [("--model", str(path)) for path in sorted(model_dir.iterdir()) if path.suffix in CHECKPOINT_SUFFIXES]
    check_free(store)
    _start_ray()
    on_gpu = _on_gpu()
    _check_room(config.execution, on_gpu, can_grow="RAY_ADDRESS" in os.environ, progress=progress)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    with hold_lease(store, run_id, started_at) as still_held, _sigterm_interrupts():
        return _segment(config, store, model_dir, categories, run_id, on_gpu, started, started_at, progress,
                        still_held, local)


def _start_ray() -> None:
    """Under `ray job submit` RAY_ADDRESS names the cluster; otherwise start an embedded runtime
    rather than attach to whatever /tmp/ray last pointed at (a killed run leaves a dead pointer)."""
    ray.init(address=None if "RAY_ADDRESS" in os.environ else "local", ignore_reinit_error=True,
             log_to_driver=False, include_dashboard=False)


def _segment(config: RunConfig, store: OutputStore, model_dir: Path, categories: tuple[Category, ...], run_id: str,
             on_gpu: bool, started: float, started_at: str, progress: Callable[[str], None],
             still_held: Callable[[], None], local: list[tuple[str, str]]) -> dict:
    """The run proper, on an output it alone writes to; `local`: (flag, path) of its local inputs."""
    _check_nodes_see(local, store, run_id, progress)
    if config.overwrite:
        clear_outputs(store)
    # `auto` recorded as the actors will run it: an output made on CPUs (float32) is then not
    # silently extended on GPUs (bfloat16), and `--dtype float32` matches an `auto` CPU run
    settings = _settings(config, model_dir, categories, resolved_dtype(config.dtype, on_gpu))
    check_settings(store, settings, committed=bool(committed_parts(store)))
    remove_uncommitted(store)
    if config.retry_failed:
        progress(f"retrying {forget_failures(store)} images that failed in earlier runs")
    before = tuple(committed_parts(store))
    counts = RunCounts(committed_before=sum(committed_counts(store, before)))
    progress(f"{counts.committed_before} images already committed under {config.output}; listing {config.input}")
    dataset = _plan(config, ShardOutput(store, categories, run_id, config.model, config.storage,
                                        config.postprocess.tasks, leased=True), settings["dtype"], on_gpu)
    record = {"run_id": run_id, "started": started_at, "input": config.input,
              "execution": asdict(config.execution), **settings}
    results = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    # interrupted or failed anywhere until the run's record is written (the rebuild of a large output
    # takes minutes), the history keeps the run; its committed shards stay for a rerun
    try:
        try:
            finished = _drive(results, counts, progress, config.max_error_ratio, still_held)
        except OutputBusy:  # another run took the output over: stop writing, and touch nothing of its
            _stop(dataset, results)
            _record_stopped(store, record | {"lost_lease": _utc()}, before, progress)
            raise
        if not finished:
            _stop(dataset, results)
            remove_uncommitted(store)  # what a task killed mid-shard left: the output holds only commits
        if config.previews:
            write_index(store, store.find(PREVIEWS_DIR, ".jpg"))
        # a pass over every committed shard: minutes on an output of millions of images
        progress(f"writing report.json, and coco/ unless no shard was committed since it was built, from the "
                 f"committed shards under {config.output}")
        totals = rebuild(store, categories, instances="instance" in config.postprocess.tasks)
        errors = committed_errors(store)
        # From what the run committed, not from the driver's count of streamed results: shards in
        # flight when a run stops may have committed after the driver's last result.
        counts.ok = totals.images_by_run[run_id]
        counts.error_types = Counter({kind: n for (run, kind), n in errors.items() if run == run_id})
        counts.failed = sum(counts.error_types.values())
        counts.wall_seconds = time.monotonic() - started
        report = build_report(counts, totals, errors, categories, record)
        write_report(store, report)
        record_run(store, record | {"finished": _utc(), "counts": report["run"]})
    except KeyboardInterrupt:
        _record_stopped(store, record | {"interrupted": _utc()}, before, progress)
        raise
    except OutputBusy:  # recorded as a lost lease
        raise
    # a failed run (a model the actors cannot load, storage gone) is kept too; its error's type only,
    # as the job prints the message (and a message may quote what the record must not hold)
    except Exception as exc:
        _record_stopped(store, record | {"failed": _utc(), "error_type": type(exc).__name__}, before,
                        progress)
        raise
    if not finished:
        raise TooManyErrors(
            f"stopped: {counts.failed} of {counts.processed} images failed (more than --max-error-ratio "
            f"{config.max_error_ratio}); what was done is committed, see {config.output}/tables/errors")
    progress(f"done: {counts.ok} segmented, {counts.failed} failed, {counts.committed_before} done before, "
             f"{counts.images_per_second:.2f} images/s; outputs under {config.output}")
    if counts.failed:
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts.error_types.most_common())
        progress(f"failed images by error: {kinds}; one row per image, with its message, in "
                 f"{store.url('tables/errors')} (totals in report.json)")
    earlier = sum(n for (run, _), n in errors.items() if run != run_id)
    if earlier:  # a read error while the bucket was unreachable stays an error until asked
        progress(f"{earlier} images failed in earlier runs and are not retried; --retry-failed retries them")
    return report
