"""Inference: a callable class for Ray Data's `map_batches` (loads the model once per actor).

Per batch: resize the decoded uint8 images and pad them into one tensor on the device, normalise,
forward, post-process there, and return only small results: the segment-id maps and segment
records, plus the semantic maps and instance masks (as COCO RLE) when those tasks are asked for.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from pycocotools import mask as rle

from pipeline.config import DTYPES as DTYPE_NAMES, InferenceConfig, resolved_dtype
from pipeline.encode import smallest_id_dtype
from pipeline.failures import INFER, PREPROCESS
from pipeline.memory import release_free_memory, reuse_freed_memory
from pipeline.model import ModelError, ModelSource, load_model_and_processor, local_dir, why
from pipeline.postprocess import MASK2FORMER_LOGITS_SIZE, panoptic_segmentation, semantic_segmentation
from pipeline.postprocess_instance import instance_segmentation
from pipeline.preprocess import resize_for_model
from pipeline.results import ImageResult, InstanceResult, PanopticResult

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def device_and_dtype(config: InferenceConfig) -> tuple[str, torch.dtype]:
    """The config's device and dtype, `auto` resolved on this process's machine."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    return device, DTYPES[resolved_dtype(config.dtype, on_gpu=device.startswith("cuda"))]


def cpu_threads(actors: int) -> int:
    """torch threads for one of `actors` inference actors on a CPU node: an equal share of the
    cores this process may run on. Ray pins an actor to as many threads as the CPUs it reserves
    (one), which left a real-sized checkpoint's forward on one core of the node (measured on
    MaskFormer Swin-B: 1.6x slower on 2 cores than with both)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // actors)


@contextmanager
def inference(device: str, dtype: torch.dtype) -> Iterator[None]:
    """How the model runs: no autograd, and autocast to `dtype` unless it is float32."""
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype, enabled=dtype != torch.float32):
        yield


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, h_i, w_i) uint8 images on one device -> pixels (B, 3, H, W) uint8 zero-padded
    bottom/right, and pixel_mask (B, H, W) int64 with 1 on each image's valid region."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    device = images[0].device
    pixels = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=device)
    mask = torch.zeros((len(images), height, width), dtype=torch.int64, device=device)
    for i, image in enumerate(images):
        pixels[i, :, : image.shape[1], : image.shape[2]] = image
        mask[i, : image.shape[1], : image.shape[2]] = 1
    return pixels, mask


def shape_groups(images: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the images, grouped by shape in order of first appearance: one forward pass each."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    return list(by_shape.values())


def normalize(pixels: torch.Tensor, pixel_mask: torch.Tensor, processor: Any) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised as the processor does, padding kept at 0."""
    values = processor.rescale_and_normalize(
        pixels, processor.do_rescale, processor.rescale_factor, processor.do_normalize,
        processor.image_mean, processor.image_std,
    )
    return values * pixel_mask[:, None].to(values.dtype)


def _segments_json(result: PanopticResult) -> str:
    return json.dumps([[s.id, s.label_id, round(s.score, 6), s.area, *s.bbox] for s in result.segments])


def _instances_json(result: InstanceResult | None) -> str:
    """[[label_id, score, area, x, y, w, h, RLE counts], ...]: masks leave the actor compressed."""
    if result is None:
        return "[]"
    return json.dumps([[i.label_id, i.score, i.area, *i.bbox,
                        rle.encode(np.asfortranarray(i.mask, dtype=np.uint8))["counts"].decode()]
                       for i in result.instances])


class Predictor:
    """The inference actor's work (`run.InferenceActor` holds one): loads the model once, then
    segments batch after batch."""

    def __init__(self, config: InferenceConfig) -> None:
        reuse_freed_memory()  # post-processing churns MB-sized tensors; trimmed after each batch
        self.config = config
        self.device, self.dtype = device_and_dtype(config)
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(config.actors))
        directory = local_dir(ModelSource(config.model, config.storage))
        self.model, self.processor = load_model_and_processor(directory, self.device)
        # the processor's post-processing is followed, and Mask2Former's resizes the logits first
        mask2former = type(self.processor).__name__.startswith("Mask2FormerImageProcessor")
        self.logits_size = MASK2FORMER_LOGITS_SIZE if mask2former else None
        if config.compile:
            # dynamic sizes: a batch holds several image shapes and every group a different size,
            # so one compile serves all but groups of one image (torch specialises size 1)
            self.model = torch.compile(self.model, dynamic=True)
        self._check_it_runs(directory)

    def _check_it_runs(self, directory: object) -> None:
        """A small test image resized and through the model: a checkpoint whose processor config or
        model cannot run (a `size` transformers cannot apply, a node that cannot compile) is
        refused before its first batch, instead of failing every image, each committed as an error row.
        Compiled, two of them: a group of one image would compile a graph of its own; and not square,
        or torch would specialise the graph to height == width and compile again for the first photo."""
        images = [np.zeros((48, 64, 3), np.uint8)] * (2 if self.config.compile else 1)
        try:
            self._model_outputs([resize_for_model(image, self.processor, self.device) for image in images])
        except Exception as exc:  # whatever it is, it would fail every image
            raise ModelError(f"model in {directory} cannot segment a test image: {why(exc)}") from exc

    def infer(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[ImageResult]:
        """Decoded (H, W, 3) uint8 images + their (H, W) sizes -> one result per image.

        Each image is resized on the device, then one forward pass runs per distinct resized
        shape in the batch: padding would change what the model sees (measured on the bundled
        model: PQ 0.63 between padded and unpadded runs), so a result would depend on its batch
        neighbours.
        """
        return self._segment([resize_for_model(image, self.processor, self.device) for image in images], sizes)

    def _segment(self, resized: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[ImageResult]:
        """`infer` of images already resized for the model, (3, h, w) uint8 each."""
        results: list[ImageResult | None] = [None] * len(resized)
        for group in shape_groups(resized):
            for i, result in zip(group, self._forward([resized[i] for i in group], [sizes[i] for i in group])):
                results[i] = result
        return results

    def _model_outputs(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Resized (3, h, w) uint8 images -> class logits (B, Q, C+1) and mask logits (B, Q, h', w'),
        float32, and each image's valid (h', w')."""
        pixels, pixel_mask = pad_batch(images)
        with inference(self.device, self.dtype):
            outputs = self.model(pixel_values=normalize(pixels, pixel_mask, self.processor), pixel_mask=pixel_mask)
        masks = outputs.masks_queries_logits.float()
        padded_h, padded_w = pixels.shape[-2:]
        valid = [(round(im.shape[1] * masks.shape[-2] / padded_h), round(im.shape[2] * masks.shape[-1] / padded_w))
                 for im in images]
        return outputs.class_queries_logits.float(), masks, valid

    def _forward(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[ImageResult]:
        classes, masks, valid = self._model_outputs(images)
        post, n, size = self.config.postprocess, len(images), self.logits_size
        panoptic = panoptic_segmentation(classes, masks, valid, sizes, post, size)
        semantic = semantic_segmentation(classes, masks, valid, sizes, size) if "semantic" in post.tasks else [None] * n
        instances = (instance_segmentation(classes, masks, valid, sizes, post.threshold, size)
                     if "instance" in post.tasks else [None] * n)
        return [ImageResult(*parts) for parts in zip(panoptic, semantic, instances)]

    def _resized_or_failure(self, image: np.ndarray) -> torch.Tensor | tuple[str, str, str]:
        """The image resized for the model, or (stage, error type, message) when it cannot be: the
        checkpoint's processor refuses it (past an aspect ratio of about 500:1 for a 256-pixel
        longest edge, its short side rounds to 0 pixels), or the device (out of GPU memory on a
        huge one). That image fails alone, before its batch reaches the model."""
        try:
            return resize_for_model(image, self.processor, self.device)
        except ValueError as exc:
            height, width = image.shape[:2]
            return (PREPROCESS, "CannotResize",  # named for what failed: transformers' ValueError says it in its terms
                    f"the model's image processor cannot resize this {width}x{height} image: {exc}"[:500])
        except RuntimeError as exc:
            return INFER, type(exc).__name__, str(exc)[:500]

    def _infer_or_fail(self, images: list[torch.Tensor],
                       sizes: list[tuple[int, int]]) -> list[ImageResult | tuple[str, str]]:
        """`_segment`, with (error type, message) in place of the result of an image that fails.

        One image can fail its whole batch (out of memory on a huge one): the batch is then
        inferred again image by image, so that only that image fails."""
        try:
            return self._segment(images, sizes)
        except (RuntimeError, ValueError) as exc:
            failure = (type(exc).__name__, str(exc)[:500])
        # the exception, and the batch's tensors its frames hold, are released before the retries
        if len(images) == 1:
            return [failure]
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return [self._infer_or_fail([image], [size])[0] for image, size in zip(images, sizes)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        ids, segments = np.empty(n, dtype=object), np.full(n, "[]", dtype=object)
        semantic, instances = np.empty(n, dtype=object), np.full(n, "[]", dtype=object)
        ids[:] = semantic[:] = [np.zeros((0, 0), np.uint8)] * n  # (0, 0): no map (failed, or not asked)
        todo = [i for i in range(n) if not batch["error_type"][i]]
        error_type, error_stage = batch["error_type"].astype(object), batch["error_stage"].astype(object)
        error_message = batch["error_message"].astype(object)
        seconds = np.zeros(n, np.float64)
        start = time.perf_counter()
        resized = {i: self._resized_or_failure(batch["image"][i]) for i in todo}
        for i, failure in resized.items():
            if isinstance(failure, tuple):
                error_stage[i], error_type[i], error_message[i] = failure
        todo = [i for i in todo if not isinstance(resized[i], tuple)]
        if todo:
            results = self._infer_or_fail([resized[i] for i in todo],
                                          [(int(batch["height"][i]), int(batch["width"][i])) for i in todo])
            for i, result in zip(todo, results):
                if isinstance(result, tuple):
                    error_stage[i], (error_type[i], error_message[i]) = INFER, result
                    continue
                ids[i], segments[i] = smallest_id_dtype(result.panoptic.segment_ids), _segments_json(result.panoptic)
                if result.semantic is not None:
                    semantic[i] = result.semantic
                instances[i] = _instances_json(result.instances)
            seconds[todo] = (time.perf_counter() - start) / len(todo)
        release_free_memory()
        passthrough = {name: column for name, column in batch.items() if name != "image"}
        return {**passthrough, "segment_ids": ids, "segments": segments.astype(str), "semantic": semantic,
                "instances": instances.astype(str), "seconds_infer": seconds,
                "error_stage": error_stage.astype(str), "error_type": error_type.astype(str),
                "error_message": error_message.astype(str)}
