"""Panoptic and semantic post-processing of MaskFormer outputs, vectorised, on the logits' device.

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


def _source_index(size_in: int, size_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For each output row (or column): its two source rows and the weight of the second, as
    bilinear interpolation with align_corners=False computes them. Shapes (size_out,)."""
    position = ((torch.arange(size_out, device=device, dtype=torch.float32) + 0.5) * (size_in / size_out) - 0.5)
    position = position.clamp(min=0.0)
    first = position.to(torch.int64)
    return first, (first + 1).clamp(max=size_in - 1), (position - first).clamp(0.0, 1.0)


def _interpolate_at(pixels_by_query: torch.Tensor, width: int, rows: tuple, cols: tuple) -> torch.Tensor:
    """Bilinear values at M output pixels given by their source indices.

    pixels_by_query: (h * w, K) the low-res masks, one row per low-res pixel -> (M, K).
    """
    (y0, y1, wy), (x0, x1, wx) = rows, cols

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pixels_by_query.index_select(0, y * width + x)

    top = at(y0, x0)
    top = top + (at(y0, x1) - top) * wx[:, None]
    bottom = at(y1, x0)
    bottom = bottom + (at(y1, x1) - bottom) * wx[:, None]
    return top + (bottom - top) * wy[:, None]


def _uniform_cells(scaled: torch.Tensor, mask_threshold: float) -> tuple[torch.Tensor, ...]:
    """Which low-res cells decide their output pixels without interpolating.

    A cell is the square of low-res pixels (y, x), (y+1, x), (y, x+1), (y+1, x+1) that an output
    pixel interpolates (clamped at the edges). Interpolation is a convex combination, so if one
    query wins at all four corners it wins everywhere inside, and if a query's scaled mask is
    above (or below) the threshold at all four corners it is so everywhere inside.
    scaled: (K, h, w) -> owner (h, w) int64, uniform (h, w) bool, above (K, h, w) bool.
    """
    owner = scaled.max(0).indices  # first max, as argmax; argmax(0) is ~6x slower on CPU
    above = scaled >= mask_threshold

    def mixed(x: torch.Tensor) -> torch.Tensor:  # (..., h, w) -> (..., h, w): corners differ
        x = torch.cat([x, x[..., -1:, :]], dim=-2)
        x = torch.cat([x, x[..., :, -1:]], dim=-1)
        corner = x[..., :-1, :-1]
        return (corner != x[..., 1:, :-1]) | (corner != x[..., :-1, 1:]) | (corner != x[..., 1:, 1:])

    return owner, ~(mixed(owner) | mixed(above).any(0)), above


def _query_areas(probs: torch.Tensor, scores: torch.Tensor, target: tuple[int, int],
                 mask_threshold: float) -> tuple[torch.Tensor, ...]:
    """Per kept query: pixels it wins and pixels where its scaled mask passes the threshold, at
    the target size, interpolating only the pixels of non-uniform cells.
    Returns area (K,), original (K,), and the (H, W) int64 winning query of every pixel."""
    k, h, w = probs.shape
    rows, cols = _source_index(h, target[0], probs.device), _source_index(w, target[1], probs.device)
    owner, uniform, above = _uniform_cells(probs * scores.view(-1, 1, 1), mask_threshold)

    def upsample(cells: torch.Tensor) -> torch.Tensor:  # (h, w) -> (H, W): each output pixel's cell
        return cells.index_select(0, rows[0]).index_select(1, cols[0])

    ys, xs = (~upsample(uniform)).nonzero(as_tuple=True)
    if ys.numel() > _MAX_MIXED_SHARE * target[0] * target[1]:  # noise-like masks: plain upsampling is cheaper
        scaled = F.interpolate(probs[None], size=target, mode="bilinear", align_corners=False)[0]
        scaled *= scores.view(-1, 1, 1)
        winner = scaled.max(0).indices
        return (torch.bincount(winner.reshape(-1), minlength=k),
                (scaled >= mask_threshold).reshape(k, -1).sum(1), winner)
    cell_pixels = (torch.bincount(rows[0], minlength=h)[:, None] * torch.bincount(cols[0], minlength=w)[None, :])
    settled = (cell_pixels * uniform).reshape(-1)
    area = torch.bincount(owner.reshape(-1), weights=settled.to(torch.float64), minlength=k).to(torch.int64)
    # counts as float64 matrix-vector products: exact (integers < 2**53) and ~7x faster than int64 sums
    original = above.reshape(k, -1).to(torch.float64).mv(settled.to(torch.float64)).to(torch.int64)
    winner = upsample(owner)  # exact wherever the cell is uniform
    pixels_by_query = probs.reshape(k, -1).T.contiguous()
    ones = torch.ones(_PIXELS_PER_CHUNK, dtype=torch.float32, device=probs.device)
    for start in range(0, ys.numel(), _PIXELS_PER_CHUNK):
        y, x = ys[start:start + _PIXELS_PER_CHUNK], xs[start:start + _PIXELS_PER_CHUNK]
        values = _interpolate_at(pixels_by_query, w, tuple(r[y] for r in rows), tuple(c[x] for c in cols))
        values *= scores  # the reference scales after interpolating: same floats
        best = values.max(1).indices
        area += torch.bincount(best, minlength=k)
        original += (values >= mask_threshold).T.to(torch.float32).mv(ones[: len(y)]).to(torch.int64)  # < 2**24
        winner[y, x] = best
    return area, original, winner


_MAX_MIXED_SHARE = 0.3
_PIXELS_PER_CHUNK = 1 << 16  # bounds the (K, pixels) working set of interpolated values


def _one_image(probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, target: tuple[int, int],
               config: PostprocessConfig) -> PanopticResult:
    """probs: (K, h, w) sigmoid masks of the kept queries, cropped; scores, labels: (K,)."""
    area, original, owner = _query_areas(probs, scores, target, config.mask_threshold)
    valid = (area > 0) & (original > 0) & (area / original.clamp(min=1) > config.overlap_mask_area_threshold)
    ids = segment_ids_per_query(labels, valid, config.label_ids_to_fuse)
    count = int(ids.max())
    if count == 0:
        return PanopticResult(np.zeros(target, np.int32), ())
    segment_ids = ids[owner].to(torch.int32)
    pixels = torch.zeros(count + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, area)
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


def semantic_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]],
                          target_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Class-id map of each image at its original size, as `post_process_semantic_segmentation`.

    Same inputs as `panoptic_segmentation`. The reference upsamples all C class maps
    (einsum of class probabilities and mask probabilities) and takes the argmax; the argmax of the
    upsampled maps is what `_query_areas` computes, interpolating only the pixels of mixed cells.
    Returns per image (H, W) uint8 when C <= 256 classes, else uint16.
    """
    class_probs = F.softmax(class_logits, dim=-1)[..., :-1]  # (B, Q, C)
    classes = class_probs.shape[-1]
    maps = []
    for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes)):
        class_maps = torch.einsum(  # batched, as the reference: same kernel, same floats
            "bqc,bqhw->bchw", class_probs[i:i + 1], mask_logits[i:i + 1, :, :vh, :vw].sigmoid())[0]
        ones = torch.ones(classes, dtype=class_maps.dtype, device=class_maps.device)
        *_, winner = _query_areas(class_maps, ones, tuple(target), float("inf"))  # x 1.0 is exact
        maps.append(winner.to(torch.uint8 if classes <= 256 else torch.int32).cpu().numpy())
    return [m if m.dtype == np.uint8 else m.astype(np.uint16) for m in maps]
