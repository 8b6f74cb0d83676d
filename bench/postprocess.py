"""Panoptic post-processing: transformers' reference vs ours, on the same logits, side by side.

    .venv/bin/python bench/postprocess.py [--repeat 3]

Logits as a COCO MaskFormer produces them for a batch of 8 images of 640x480: 100 queries,
133 classes + no-object, masks at 1/4 of the 800x1066 model input (200x267). "Realistic" logits
have spatially smooth, confident masks that tile the image, about 30 kept queries per image;
"random" logits are i.i.d. noise with every query kept: the worst case for ours (no cell is
uniform), and no segment survives.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PostprocessConfig  # noqa: E402
from pipeline.postprocess import panoptic_segmentation  # noqa: E402

BATCH, QUERIES, CLASSES, MASK_H, MASK_W, TARGET = 8, 100, 133, 200, 267, (480, 640)


def realistic_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """About 30 kept queries per image whose masks tile it (a jittered 5x6 layout of blobs that
    overlap their neighbours a little), with sharp edges; the other 70 queries say "no object"."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, MASK_H), torch.linspace(0, 1, MASK_W), indexing="ij")
    grid = torch.stack(torch.meshgrid((torch.arange(5) + 0.5) / 5, (torch.arange(6) + 0.5) / 6, indexing="ij"), -1)
    centers = torch.rand(BATCH, QUERIES, 2, generator=g)
    centers[:, :30] = grid.reshape(30, 2) + 0.04 * torch.randn(BATCH, 30, 2, generator=g)
    radius = 0.09 + 0.04 * torch.rand(BATCH, QUERIES, 1, 1, generator=g)
    dist = ((ys - centers[..., 0, None, None]) ** 2 + (xs - centers[..., 1, None, None]) ** 2).sqrt()
    masks = 80 * (radius - dist)
    classes = torch.randn(BATCH, QUERIES, CLASSES + 1, generator=g)
    winner = torch.randint(0, CLASSES, (BATCH, QUERIES), generator=g)
    winner[:, 30:] = CLASSES  # "no object"
    classes.scatter_(2, winner[..., None], 12.0)
    return classes, masks


def random_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(BATCH, QUERIES, CLASSES + 1, generator=g)
    classes[..., :CLASSES].scatter_(2, torch.randint(0, CLASSES, (BATCH, QUERIES, 1), generator=g), 12.0)
    return classes, torch.randn(BATCH, QUERIES, MASK_H, MASK_W, generator=g)


def reference(classes, masks, config: PostprocessConfig):
    from transformers import MaskFormerImageProcessor

    outputs = SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks.clone())
    return MaskFormerImageProcessor().post_process_panoptic_segmentation(
        outputs, threshold=config.threshold, mask_threshold=config.mask_threshold,
        overlap_mask_area_threshold=config.overlap_mask_area_threshold, label_ids_to_fuse=set(),
        target_sizes=[TARGET] * BATCH)


def ours(classes, masks, config: PostprocessConfig):
    return panoptic_segmentation(classes, masks, [(MASK_H, MASK_W)] * BATCH, [TARGET] * BATCH, config)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = PostprocessConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {QUERIES} queries, "
          f"{CLASSES} classes, masks {MASK_H}x{MASK_W} -> {TARGET[1]}x{TARGET[0]}")
    print(f"{'logits':10s} {'segments/img':>12s} {'reference s':>12s} {'ours s':>8s} {'speed-up':>9s}")
    for name, make in (("realistic", realistic_logits), ("random", random_logits)):
        classes, masks = make()
        segments = sum(len(r.segments) for r in ours(classes, masks, config)) / BATCH
        t_ref = best_of(lambda: reference(classes, masks, config), args.repeat)
        t_ours = best_of(lambda: ours(classes, masks, config), args.repeat)
        print(f"{name:10s} {segments:12.1f} {t_ref:12.3f} {t_ours:8.3f} {t_ref / t_ours:8.1f}x")


if __name__ == "__main__":
    main()
