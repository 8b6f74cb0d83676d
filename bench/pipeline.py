"""Throughput, side by side in one run on the same checkpoint and images:

(a) the loop a user writes by hand: PIL -> processor -> model (float32) -> transformers'
    post_process_panoptic_segmentation -> PNG + JSON per image, one image at a time;
(b) the bare model forward on pre-decoded, pre-resized, pre-batched tensors already on the device,
    batched as the pipeline batches them (its batch size, split by shape; its dtype): the ceiling;
(c) the pipeline end to end (listing, decode, resize, inference, post-processing, PNG and Parquet
    writes, commit, COCO JSON and report), on an already started Ray runtime.

All three run on the device the job would use (CUDA when there is one). Images: generated
scenes scaled to COCO-like sizes (640x480, 480x640, 640x427, 612x612, 500x375) and saved as JPEG,
quality 90.

    .venv/bin/python bench/pipeline.py [--images 200] [--batch-size 8] [--model bundled] [--dtype auto] [--compile]
    .venv/bin/python bench/pipeline.py --scale 1000,10000   # pipeline only: time and peak memory

Peak memory is the peak, sampled every second, of the summed proportional set size (PSS: shared
pages split between the processes sharing them) of this process and every process under it: the
driver, the raylet, the object store and every Ray worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.encode import ids_to_rgb  # noqa: E402
from pipeline.model import ModelSource, load_model, load_processor, local_dir  # noqa: E402
from pipeline.config import DTYPES, InferenceConfig  # noqa: E402
from pipeline.predictor import device_and_dtype, inference, normalize, pad_batch, shape_groups  # noqa: E402
from pipeline.preprocess import resize_for_model  # noqa: E402
from pipeline.run import ExecutionConfig, RunConfig, run  # noqa: E402
from pipeline.scenes import generate_scenes  # noqa: E402


COCO_SIZES = ((640, 480), (480, 640), (640, 427), (612, 612), (500, 375))


def coco_like_jpegs(folder: Path, count: int, seed: int) -> Path:
    """`count` scenes, each resized to a COCO-like (width, height), as JPEGs in `folder`/images."""
    scenes = generate_scenes(folder / "scenes", min(count, 500), seed=seed) / "images"
    sources = sorted(scenes.iterdir())
    out = folder / "images"
    out.mkdir(parents=True)
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB").resize(COCO_SIZES[i % len(COCO_SIZES)])
        image.save(out / f"img_{i:06d}.jpg", quality=90)
    return out


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


class PeakMemory:
    """Peak summed PSS of this process tree while the block runs."""

    def __enter__(self) -> "PeakMemory":
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        # every second: reading smaps_rollup walks each process's page tables (Ray workers map the
        # whole object store), and every 0.2 s that took 12 % of this machine's CPU (perf)
        while not self._stop.wait(1.0):
            sizes = {pid: _pss_bytes(pid) for pid in _tree(os.getpid())}
            if sum(sizes.values()) > self.peak:
                self.peak, self.at_peak = sum(sizes.values()), sizes

    def largest(self, count: int = 4) -> str:
        """The largest processes at the peak, by name."""
        def name(pid: int) -> str:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[:48]
            except OSError:
                return f"pid {pid} (gone)"
        top = sorted(self.at_peak.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{name(pid)} {size / 2**20:.0f} MiB" for pid, size in top)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def hand_loop(files: list[Path], model_dir: Path, out: Path, device: str) -> float:
    """What a user writes: the model in float32 on the device, one image at a time."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForUniversalSegmentation.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    out.mkdir(parents=True)
    start = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        with torch.inference_mode():
            outputs = model(**processor(images=image, return_tensors="pt").to(device))
        result = processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[(image.height, image.width)], label_ids_to_fuse=set())[0]
        ids = result["segmentation"].cpu().numpy().clip(min=0).astype(np.int32)
        Image.fromarray(ids_to_rgb(ids)).save(out / f"{path.name}.png")
        (out / f"{path.name}.json").write_text(json.dumps(result["segments_info"]))
    return time.perf_counter() - start


def bare_forward(files: list[Path], model_dir: Path, batch_size: int, compile: bool, device: str,
                 dtype: torch.dtype) -> float:
    """Seconds for one forward pass over all batches, already on the device, in the pipeline's
    dtype (autocast, as the inference actor runs it); compiled, after a first pass that compiles."""
    processor, model = load_processor(model_dir), load_model(model_dir, device)
    images = [resize_for_model(np.asarray(Image.open(p).convert("RGB")), processor) for p in files]
    batches = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        batches += [pad_batch([batch[i] for i in group]) for group in shape_groups(batch)]  # as the actor runs them
    batches = [(normalize(pixels, mask, processor).to(device), mask.to(device)) for pixels, mask in batches]

    def forward() -> float:
        start = time.perf_counter()
        with inference(device, dtype):
            for pixels, mask in batches:
                model(pixel_values=pixels, pixel_mask=mask)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if compile:
        model = torch.compile(model, dynamic=True)  # as the pipeline does
        print(f"(b) first pass, compiling: {forward():.1f} s")
    return forward()


def pipeline(folder: Path, model: str, batch_size: int, out: Path, compile: bool = False, dtype: str = "auto") -> float:
    import ray

    ray.init(address="local", ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    start = time.perf_counter()
    report = run(RunConfig(input=str(folder), output=str(out), model=model, dtype=dtype,
                           execution=ExecutionConfig(batch_size=batch_size, compile=compile)), progress=lambda _: None)
    seconds = time.perf_counter() - start
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report["run"]["stage_seconds"].items())
    print(f"pipeline: {report['run']['ok']} ok, {report['run']['failed']} failed; worker time per stage: {stages}")
    return seconds


def scale(counts: list[int], model: str, batch_size: int) -> None:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as work:
            folder = coco_like_jpegs(Path(work), count, seed=9)
            with PeakMemory() as memory:
                seconds = pipeline(folder, model, batch_size, Path(work) / "out")
            rows.append((count, seconds, memory.peak))
            print(f"{count:6d} images {seconds:8.1f} s {count / seconds:7.2f} images/s "
                  f"peak PSS {memory.peak / 2**30:.2f} GiB; largest then: {memory.largest()}", flush=True)
    (n0, t0, m0), (n1, t1, m1) = rows[0], rows[-1]
    print(f"{n1} vs {n0} images: time ratio {t1 / t0:.2f} (images ratio {n1 / n0:.0f}), "
          f"peak memory ratio {m1 / m0:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="bundled",
                        help="as the job's --model; for a real checkpoint's compute: bench.random_checkpoint")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="(b) and (c); auto as the job: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in (b) (timed after a compiling pass) and (c) (compile included)")
    parser.add_argument("--scale", help="comma-separated image counts: run only the pipeline on each")
    args = parser.parse_args()
    if args.scale:
        return scale([int(n) for n in args.scale.split(",")], args.model, args.batch_size)
    model_dir = local_dir(ModelSource(args.model))
    device, dtype = device_and_dtype(InferenceConfig(args.model, dtype=args.dtype))
    with tempfile.TemporaryDirectory() as work:
        folder = coco_like_jpegs(Path(work), args.images, seed=9)
        files = sorted(folder.iterdir())
        t_hand = hand_loop(files, model_dir, Path(work) / "hand", device)
        t_bare = bare_forward(files, model_dir, args.batch_size, args.compile, device, dtype)
        t_pipe = pipeline(folder, args.model, args.batch_size, Path(work) / "pipeline", args.compile, args.dtype)
    n = len(files)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"{n} images, torch {torch.__version__} on {where}, batch {args.batch_size}, (b) and (c) in "
          f"{str(dtype).removeprefix('torch.')}" + (", compiled" if args.compile else ""))
    for name, seconds in (("(a) hand-written loop", t_hand), ("(b) bare model forward", t_bare),
                          ("(c) pipeline end to end", t_pipe)):
        print(f"{name:26s} {seconds:8.2f} s {n / seconds:8.2f} images/s")
    print(f"c/a = {t_hand / t_pipe:.2f}   c/b = {t_bare / t_pipe:.2f}")


if __name__ == "__main__":
    main()
