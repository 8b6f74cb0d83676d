"""Post-processing: transformers' reference vs ours, on the same logits, side by side, per task.

    .venv/bin/python bench/postprocess.py [--repeat 3] [--device cuda]

Logits as a COCO MaskFormer produces them for a batch of 8 images of 640x480: 100 queries,
133 classes + no-object, masks at 1/4 of the 800x1066 model input (200x267). "Realistic" logits
have spatially smooth, confident masks that tile the image, about 30 kept queries per image;
"random" logits are i.i.d. noise with every query kept: the worst case for ours (no cell is
uniform), and no segment survives. "bundled" logits are the bundled checkpoint's real outputs
for 8 generated scenes at 640x480 (12 queries, masks at 1/4 of its 128-pixel input: 32x43).
"mask2former": the realistic logits at 96x128, against Mask2Former's processor, which resizes
them to 384x384 first.

Both sides run with the inference actor's heap settings (`pipeline.memory.reuse_freed_memory`):
with glibc's defaults the MB-sized temporaries of both page-fault in anew on every image.
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
from pipeline.memory import reuse_freed_memory  # noqa: E402
from pipeline.postprocess import MASK2FORMER_LOGITS_SIZE, panoptic_segmentation, semantic_segmentation  # noqa: E402
from pipeline.postprocess_instance import instance_segmentation  # noqa: E402

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


def bundled_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from PIL import Image

    from pipeline.model import ModelSource, load_model, load_processor, local_dir
    from pipeline.predictor import normalize, pad_batch
    from pipeline.preprocess import resize_for_model
    from pipeline.scenes import scene

    directory = local_dir(ModelSource("bundled"))
    processor, model = load_processor(directory), load_model(directory, "cpu")
    images = [np.array(Image.fromarray(scene(seed, i).image).resize(TARGET[::-1])) for i in range(BATCH)]
    pixels, mask = pad_batch([resize_for_model(image, processor) for image in images])
    with torch.inference_mode():
        outputs = model(pixel_values=normalize(pixels, mask, processor), pixel_mask=mask)
    return outputs.class_queries_logits, outputs.masks_queries_logits


def mask2former_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The realistic logits as a Mask2Former COCO checkpoint makes them: masks at 1/4 of its
    384-pixel input (96x128), which its processor resizes to 384x384 before post-processing."""
    classes, masks = realistic_logits(seed)
    return classes, torch.nn.functional.interpolate(masks, size=(96, 128), mode="bilinear", align_corners=False)


def _outputs(classes, masks) -> SimpleNamespace:
    return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks.clone())


def _processor(mask2former: bool = False):
    from transformers import Mask2FormerImageProcessor, MaskFormerImageProcessor

    return Mask2FormerImageProcessor() if mask2former else MaskFormerImageProcessor()


def panoptic_pair(config: PostprocessConfig, logits_size: tuple[int, int] | None = None):
    """(reference, ours, segments per image) for panoptic; with a `logits_size`, against
    Mask2Former's own processor, which resizes the mask logits to it first."""
    def reference(classes, masks):
        return _processor(mask2former=logits_size is not None).post_process_panoptic_segmentation(
            _outputs(classes, masks), threshold=config.threshold, mask_threshold=config.mask_threshold,
            overlap_mask_area_threshold=config.overlap_mask_area_threshold, label_ids_to_fuse=set(),
            target_sizes=[TARGET] * BATCH)

    def ours(classes, masks):
        return panoptic_segmentation(classes, masks, [masks.shape[-2:]] * BATCH, [TARGET] * BATCH, config,
                                     logits_size)

    return reference, ours, lambda results: sum(len(r.segments) for r in results) / BATCH


def mask2former_panoptic_pair(config: PostprocessConfig):
    return panoptic_pair(config, MASK2FORMER_LOGITS_SIZE)


def semantic_pair(config: PostprocessConfig):
    def reference(classes, masks):
        return _processor().post_process_semantic_segmentation(_outputs(classes, masks), target_sizes=[TARGET] * BATCH)

    def ours(classes, masks):
        return semantic_segmentation(classes, masks, [masks.shape[-2:]] * BATCH, [TARGET] * BATCH)

    return reference, ours, lambda results: sum(len(set(m.ravel().tolist())) for m in results) / BATCH


def instance_pair(config: PostprocessConfig):
    def reference(classes, masks):
        return _processor().post_process_instance_segmentation(
            _outputs(classes, masks), threshold=config.threshold, target_sizes=[TARGET] * BATCH,
            return_binary_maps=True)

    def ours(classes, masks):
        return instance_segmentation(classes, masks, [masks.shape[-2:]] * BATCH, [TARGET] * BATCH, config.threshold)

    return reference, ours, lambda results: sum(len(r.instances) for r in results) / BATCH


def best_of(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device == "cuda":  # both sides return host results, but leave nothing queued either way
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the logits lie and both sides run (default: cuda when there is one)")
    args = parser.parse_args()
    config = PostprocessConfig()
    reuse_freed_memory()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {BATCH}, {QUERIES} queries, "
          f"{CLASSES} classes, masks {MASK_H}x{MASK_W} -> {TARGET[1]}x{TARGET[0]}")
    print(f"{'task':9s} {'logits':10s} {'found/img':>10s} {'reference s':>12s} {'ours s':>8s} {'speed-up':>9s}")
    cases = [("panoptic", panoptic_pair, realistic_logits), ("panoptic", panoptic_pair, random_logits),
             ("panoptic", panoptic_pair, bundled_logits), ("semantic", semantic_pair, realistic_logits),
             ("instance", instance_pair, realistic_logits), ("panoptic", mask2former_panoptic_pair, mask2former_logits)]
    for task, pair, make in cases:
        classes, masks = (t.to(args.device) for t in make())
        reference, ours, found = pair(config)
        per_image = found(ours(classes, masks))  # also the warm-up: CUDA kernels load on first use
        reference(classes, masks)
        t_ref = best_of(lambda: reference(classes, masks), args.repeat, args.device)
        t_ours = best_of(lambda: ours(classes, masks), args.repeat, args.device)
        print(f"{task:9s} {make.__name__.removesuffix('_logits'):10s} {per_image:10.1f} {t_ref:12.3f} "
              f"{t_ours:8.3f} {t_ref / t_ours:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
