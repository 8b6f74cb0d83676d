"""Throughput, side by side in one run on the same checkpoint and images:

(a) the loop a user writes by hand: PIL -> processor -> model -> transformers'
    post_process_panoptic_segmentation -> PNG + JSON per image, one image at a time;
(b) the bare model forward on pre-decoded, pre-resized, pre-batched tensors (pipeline batch size
    and dtype): the ceiling;
(c) the pipeline end to end (listing, decode, resize, inference, post-processing, PNG and Parquet
    writes, commit, COCO JSON and report), on an already started Ray runtime.

    .venv/bin/python bench/pipeline.py [--images 200] [--batch-size 8] [--model bundled]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.encode import ids_to_rgb  # noqa: E402
from pipeline.model import ModelSource, load_model, load_processor, local_dir  # noqa: E402
from pipeline.predictor import normalize, pad_batch  # noqa: E402
from pipeline.preprocess import resize_for_model  # noqa: E402
from pipeline.run import ExecutionConfig, RunConfig, run  # noqa: E402
from pipeline.scenes import generate_scenes  # noqa: E402


def hand_loop(files: list[Path], model_dir: Path, out: Path) -> float:
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForUniversalSegmentation.from_pretrained(model_dir, use_safetensors=True).eval()
    out.mkdir(parents=True)
    start = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        with torch.inference_mode():
            outputs = model(**processor(images=image, return_tensors="pt"))
        result = processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[(image.height, image.width)], label_ids_to_fuse=set())[0]
        ids = result["segmentation"].numpy().clip(min=0).astype(np.int32)
        Image.fromarray(ids_to_rgb(ids)).save(out / f"{path.name}.png")
        (out / f"{path.name}.json").write_text(json.dumps(result["segments_info"]))
    return time.perf_counter() - start


def bare_forward(files: list[Path], model_dir: Path, batch_size: int, repeat: int = 1) -> float:
    processor, model = load_processor(model_dir), load_model(model_dir, "cpu")
    images = [resize_for_model(np.asarray(Image.open(p).convert("RGB")), processor) for p in files]
    batches = [pad_batch(images[i:i + batch_size], "cpu") for i in range(0, len(images), batch_size)]
    batches = [(normalize(pixels, mask, processor), mask) for pixels, mask in batches]
    start = time.perf_counter()
    with torch.inference_mode():
        for pixels, mask in batches:
            model(pixel_values=pixels, pixel_mask=mask)
    return time.perf_counter() - start


def pipeline(folder: Path, model: str, batch_size: int, out: Path) -> float:
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    start = time.perf_counter()
    run(RunConfig(input=str(folder), output=str(out), model=model,
                  execution=ExecutionConfig(batch_size=batch_size)), progress=lambda _: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="bundled")
    args = parser.parse_args()
    model_dir = local_dir(ModelSource(args.model))
    with tempfile.TemporaryDirectory() as work:
        folder = generate_scenes(Path(work) / "scenes", args.images, seed=9) / "images"
        files = sorted(folder.iterdir())
        t_hand = hand_loop(files, model_dir, Path(work) / "hand")
        t_bare = bare_forward(files, model_dir, args.batch_size)
        t_pipe = pipeline(folder, args.model, args.batch_size, Path(work) / "pipeline")
    n = len(files)
    print(f"{n} images, torch {torch.__version__} on {torch.get_num_threads()} CPU threads, batch {args.batch_size}")
    for name, seconds in (("(a) hand-written loop", t_hand), ("(b) bare model forward", t_bare),
                          ("(c) pipeline end to end", t_pipe)):
        print(f"{name:26s} {seconds:8.2f} s {n / seconds:8.2f} images/s")
    print(f"c/a = {t_hand / t_pipe:.2f}   c/b = {t_bare / t_pipe:.2f}")


if __name__ == "__main__":
    main()
