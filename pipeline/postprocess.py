"""Panoptic post-processing of MaskFormer outputs, vectorised over queries, on the logits' device.

Same segments as transformers' `post_process_panoptic_segmentation(..., target_sizes=...)` on the
same logits (same operations in the same order, so the same floats), with three differences made
on purpose and kept here alone:
- each image's padding is cropped from the mask logits before upsampling, so an image batched with
  larger ones lands on its own pixels;
- "no segment" is an all-void int32 map (the reference returns a float map of -1 on the CPU);
- a fused label is one `Segment` (the reference lists one entry per fused query, all with the same
  id); its score is the first fused query's. Ids stay unique: after a repeat of a fused label the
  reference resumes numbering from that label's id, so a later segment can get an id already taken.
No Python loop runs per query and no `.item()` per query; only the id map and a few numbers per
segment leave the device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import PostprocessConfig
from pipeline.results import PanopticResult, Segment


def segment_ids_per_query(labels: torch.Tensor, valid: torch.Tensor, fuse: frozenset[int]) -> torch.Tensor:
    """Segment id of each query in query order, as the reference numbers them.

    labels: (K,) int64 class of each kept query; valid: (K,) bool query makes a segment.
    Returns (K,) int64: 0 for invalid queries; ids from 1; all valid queries of a label in `fuse`
    share the id of its first valid query.
    """
    k = labels.shape[0]
    order = torch.arange(k, device=labels.device)
    fused = torch.isin(labels, torch.tensor(sorted(fuse), dtype=labels.dtype, device=labels.device)) & valid
    first = torch.full((int(labels.max()) + 1,), k, dtype=torch.int64, device=labels.device)
    first = first.scatter_reduce(0, labels[fused], order[fused], reduce="amin")
    opens = valid & (~fused | (first[labels] == order))  # queries that open a new segment id
    opened_id = torch.cumsum(opens.to(torch.int64), 0)
    ids = torch.where(opens, opened_id, torch.zeros_like(opened_id))
    return torch.where(fused & ~opens, ids[first[labels].clamp(max=k - 1)], ids)


def _bboxes(segment_ids: torch.Tensor, count: int) -> torch.Tensor:
    """(H, W) int ids -> (count + 1, 4) int64 [x, y, w, h] per id (row 0 = void, unused)."""
    height, width = segment_ids.shape
    flat = segment_ids.reshape(-1).to(torch.int64)
    rows = torch.arange(height, device=flat.device).repeat_interleave(width)
    cols = torch.arange(width, device=flat.device).repeat(height)
    big = torch.full((count + 1,), max(height, width), dtype=torch.int64, device=flat.device)
    small = torch.full((count + 1,), -1, dtype=torch.int64, device=flat.device)
    x0 = big.scatter_reduce(0, flat, cols, reduce="amin")
    y0 = big.clone().scatter_reduce(0, flat, rows, reduce="amin")
    x1 = small.scatter_reduce(0, flat, cols, reduce="amax")
    y1 = small.clone().scatter_reduce(0, flat, rows, reduce="amax")
    return torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1)


def _one_image(probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, target: tuple[int, int],
               config: PostprocessConfig) -> PanopticResult:
    """probs: (K, h, w) sigmoid masks of the kept queries, cropped; scores, labels: (K,)."""
    scaled = F.interpolate(probs[None], size=target, mode="bilinear", align_corners=False)[0]
    scaled *= scores.view(-1, 1, 1)
    owner = scaled.argmax(0)  # (H, W): the query each pixel goes to
    area = torch.bincount(owner.reshape(-1), minlength=probs.shape[0])
    original = (scaled >= config.mask_threshold).reshape(probs.shape[0], -1).sum(1)
    valid = (area > 0) & (original > 0) & (area / original.clamp(min=1) > config.overlap_mask_area_threshold)
    ids = segment_ids_per_query(labels, valid, config.label_ids_to_fuse)
    segment_ids = ids[owner].to(torch.int32)
    count = int(ids.max())
    if count == 0:
        return PanopticResult(np.zeros(target, np.int32), ())
    pixels = torch.bincount(segment_ids.reshape(-1).to(torch.int64), minlength=count + 1)
    first_query = torch.full((count + 1,), probs.shape[0], dtype=torch.int64, device=ids.device)
    first_query = first_query.scatter_reduce(0, ids, torch.arange(len(ids), device=ids.device), reduce="amin")
    small = torch.stack([labels[first_query[1:]].to(torch.float64), scores[first_query[1:]].to(torch.float64),
                         pixels[1:].to(torch.float64)], 1).cpu().numpy()
    boxes = _bboxes(segment_ids, count)[1:].cpu().numpy()
    segments = tuple(
        Segment(id=i + 1, label_id=int(label), score=round(float(score), 6), area=int(n),
                bbox=tuple(int(v) for v in box))
        for i, ((label, score, n), box) in enumerate(zip(small, boxes))
    )
    return PanopticResult(segment_ids.cpu().numpy(), segments)


def panoptic_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]], target_sizes: Sequence[tuple[int, int]],
                          config: PostprocessConfig) -> list[PanopticResult]:
    """Panoptic segmentation of each image of a padded batch, at its original size.

    class_logits: (B, Q, C+1) float, last class = "no object"
    mask_logits: (B, Q, h, w) float, for the padded batch
    valid_sizes: per image (vh, vw), its unpadded region of `mask_logits` (top-left anchored)
    target_sizes: per image (H, W), its original size
    """
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)  # (B, Q)
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > config.threshold)
    results = []
    for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes)):
        kept = keep[i].nonzero().squeeze(1)
        if kept.numel() == 0:
            results.append(PanopticResult(np.zeros(tuple(target), np.int32), ()))
            continue
        probs = mask_logits[i, kept, :vh, :vw].sigmoid()
        results.append(_one_image(probs, scores[i, kept], labels[i, kept], tuple(target), config))
    return results
