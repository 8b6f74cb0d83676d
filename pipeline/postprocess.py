"""Panoptic and semantic post-processing of MaskFormer outputs, vectorised, on the logits' device.

Same segments as transformers' `post_process_panoptic_segmentation(..., target_sizes=...)` on the
same logits (the same operations in the same order; upsampled values may differ from
`F.interpolate`'s by a few ulp, so queries tied to within that can split a pixel otherwise: exact
ties aside), with three differences made on purpose and kept here alone:
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

from pipeline import cells
from pipeline.config import PostprocessConfig
from pipeline.results import PanopticResult, Segment


# Mask2Former's processor resizes every image's mask logits to this size before post-processing
# ("the preprocessed image size for all models"), then goes on as MaskFormer's, which this module follows.
MASK2FORMER_LOGITS_SIZE = (384, 384)


def cropped_logits(mask_logits: torch.Tensor, i: int, valid: tuple[int, int], size: tuple[int, int] | None,
                   queries: torch.Tensor | None = None) -> torch.Tensor:
    """Image i's mask logits, (B, Q, h, w) -> (Q', vh, vw) or (Q', *size): its valid region, the `queries` given
    (all by default), resized to `size` when the checkpoint's processor resizes them first (a
    Mask2Former's: MASK2FORMER_LOGITS_SIZE). Resizing is per query, so selecting first saves the
    resize of queries that make nothing. A fresh tensor when queries or a size are given, else a view."""
    logits = mask_logits[i, :, :valid[0], :valid[1]]
    if queries is not None:
        logits = logits.index_select(0, queries)
    if size is None:
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


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


def _kept(area: torch.Tensor, original: torch.Tensor, config: PostprocessConfig) -> torch.Tensor:
    """The reference's test of each query, (K,) -> (K,) bool: it wins pixels, its scaled mask passes
    the threshold at `original` pixels, and it wins more than the overlap share of those."""
    ratio = area / original.clamp(min=1)  # float32, as the reference's; compared as its Python float is
    return (area > 0) & (original > 0) & (ratio.double() > config.overlap_mask_area_threshold)


def _undecided_winners(probs: torch.Tensor, scores: torch.Tensor, scaled: torch.Tensor, cy: torch.Tensor,
                       cx: torch.Tensor, rows: cells.Axis, cols: cells.Axis) -> tuple[torch.Tensor, ...]:
    """Each pixel of the n undecided cells (cy, cx) and its winner: the first of its cell's
    candidates with the highest upsampled value. probs, scaled: (K, h, w); scores: (K,).
    Returns ys, xs, best: (M,) int64, empty when n = 0."""
    k, h, w = probs.shape
    if len(cy) == 0:  # one query, or one winner everywhere
        return cy, cy, cy
    corners = cells.corners(scaled.view(k, h * w), cy, cx, h, w)  # (4, K, n)
    candidate = corners.amax(0) >= corners.amin(0).amax(0)  # (K, n)
    slots = int(candidate.sum(0).max())
    # each cell's candidates in query order; its spare slots repeat its first candidate, which
    # leaves the first maximum where it was
    ranked = torch.where(candidate, torch.arange(k, device=probs.device)[:, None], k).sort(0).values[:slots]
    queries = torch.where(ranked == k, ranked[:1], ranked)  # (J, n)
    blocks = cells.blocks(cy, cx, rows, cols)
    values = cells.block_values(probs, queries, cy, cx, blocks, rows, cols)  # (J, n, R, C)
    values *= scores[queries][:, :, None, None]  # the reference scales after interpolating
    n, height, width = blocks.inside.shape
    best = queries.T.gather(1, values.max(0).indices.view(n, -1)).view(-1)  # first max
    pixel = blocks.inside.view(-1).nonzero().squeeze(1)  # of the (n, R, C) blocks
    cell = pixel // (height * width)
    return (blocks.rows.view(-1)[pixel // width], blocks.cols.view(-1)[cell * width + pixel % width], best[pixel])


def _query_areas(probs: torch.Tensor, scores: torch.Tensor, target: tuple[int, int],
                 config: PostprocessConfig | None) -> tuple[torch.Tensor, torch.Tensor | None, cells.Winners]:
    """Per kept query: the pixels it wins at the target size and, given a config, whether it makes
    a segment, as the reference decides both on its upsampled `probs * scores`, but evaluating the
    upsampled masks only where a low-res cell does not decide them.

    Interpolation is a convex combination of a cell's four corners, so: a query that wins at all
    four corners wins the whole cell; elsewhere only queries whose highest corner reaches the
    best lowest corner can win ("candidates", usually two or three); and a mask above (or below)
    the threshold at all four corners is so in the whole cell. The cells a query's threshold
    crosses bound its thresholded area; they are counted pixel by pixel only for the few queries
    whose segment test those bounds leave open.
    probs: (K, h, w) sigmoid masks; scores: (K,).
    Returns area (K,) int64, valid (K,) bool (None without a config), and the winners.
    """
    k, h, w = probs.shape
    rows, cols = cells.axis(h, target[0], probs.device), cells.axis(w, target[1], probs.device)
    scaled = probs * scores.view(-1, 1, 1)
    owner = scaled.max(0).indices  # first max, as argmax; argmax(0) is ~6x slower on CPU
    below = cells.next_corner(owner, 0)
    decided = (owner == below) & (owner == cells.next_corner(owner, 1)) & (owner == cells.next_corner(below, 1))
    cy, cx = (~decided).nonzero(as_tuple=True)
    cell_pixels = rows[4][cy] * cols[4][cx]
    budget = _MAX_MIXED_SHARE * target[0] * target[1]  # pixels to evaluate, per query evaluated
    if int(cell_pixels.sum()) > budget:
        return _upsampled_areas(probs, scores, target, config)
    ys, xs, best = _undecided_winners(probs, scores, scaled, cy, cx, rows, cols)
    winners = cells.Winners(owner, decided, rows, cols, ys, xs, best)
    settled = (rows[4][:, None] * cols[4][None, :] * decided).reshape(-1).to(torch.float64)
    area = torch.bincount(owner.reshape(-1), weights=settled, minlength=k).to(torch.int64)
    area += torch.bincount(best, minlength=k)
    if config is None:
        return area, None, winners
    above = scaled >= config.mask_threshold
    below = cells.next_corner(above, 1)
    some, every = above | below, above & below
    some |= cells.next_corner(some, 2)
    every &= cells.next_corner(every, 2)
    # the thresholded area is at least every cell above at all corners, at most that plus the
    # cells the threshold crosses; the narrowest exact dtype for the products is the fastest
    widths = cols[4].to(torch.uint8 if int(cols[4].max()) < 2 ** 8 else torch.int32)
    lower = ((every * widths).sum(2, dtype=torch.int32).to(torch.int64) * rows[4]).sum(1)  # CUDA has no int64 mv
    tq, ty, tx = (some ^ every).nonzero(as_tuple=True)
    crossed = rows[4][ty] * cols[4][tx]
    upper = lower + torch.bincount(tq, weights=crossed.to(torch.float64), minlength=k).to(torch.int64)
    valid = _kept(area, upper, config)
    # monotone in the thresholded area from 1 up: open only if the bounds disagree, or 0 is possible
    unsure = (lower != upper) & ((_kept(area, lower, config) != valid) | (lower == 0))
    tq, ty, tx, crossed = (t[unsure[tq]] for t in (tq, ty, tx, crossed))
    if int(crossed.sum()) > budget * k:
        return _upsampled_areas(probs, scores, target, config)
    blocks = cells.blocks(ty, tx, rows, cols)
    values = cells.block_values(probs, tq[None], ty, tx, blocks, rows, cols)[0]  # (p, R, C)
    passes = ((values * scores[tq][:, None, None] >= config.mask_threshold) & blocks.inside).sum((1, 2))
    original = lower + torch.bincount(tq, weights=passes.to(torch.float64), minlength=k).to(torch.int64)
    return area, torch.where(unsure, _kept(area, original, config), valid), winners


def _upsampled_areas(probs: torch.Tensor, scores: torch.Tensor, target: tuple[int, int],
                     config: PostprocessConfig | None) -> tuple[torch.Tensor, torch.Tensor | None, cells.Winners]:
    """`_query_areas` the reference's way, upsampling every mask: cheaper for noise-like masks,
    where few cells are decided."""
    k = probs.shape[0]
    scaled = F.interpolate(probs[None], size=target, mode="bilinear", align_corners=False)[0]
    scaled *= scores.view(-1, 1, 1)
    winner = scaled.max(0).indices
    area = torch.bincount(winner.reshape(-1), minlength=k)
    valid = None if config is None else _kept(area, (scaled >= config.mask_threshold).reshape(k, -1).sum(1), config)
    return area, valid, cells.Winners.full(winner)


_MAX_MIXED_SHARE = 0.3  # of the output pixels to evaluate, beyond which upsampling everything is cheaper


def _one_image(probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, target: tuple[int, int],
               config: PostprocessConfig) -> PanopticResult:
    """probs: (K, h, w) sigmoid masks of the kept queries, cropped; scores, labels: (K,)."""
    area, valid, winners = _query_areas(probs, scores, target, config)
    ids = segment_ids_per_query(labels, valid, config.label_ids_to_fuse)
    count = int(ids.max())
    if count == 0:
        return PanopticResult(np.zeros(target, np.int32), ())
    segment_ids = winners.paint(ids.to(torch.int32))
    pixels = torch.zeros(count + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, area)
    first_query = torch.full((count + 1,), probs.shape[0], dtype=torch.int64, device=ids.device)
    first_query = first_query.scatter_reduce(0, ids, torch.arange(len(ids), device=ids.device), reduce="amin")
    small = torch.stack([labels[first_query[1:]].to(torch.float64), scores[first_query[1:]].to(torch.float64),
                         pixels[1:].to(torch.float64)], 1).cpu().numpy()
    boxes = winners.boxes(ids, count)[1:].cpu().numpy()
    segments = tuple(
        Segment(id=i + 1, label_id=int(label), score=round(float(score), 6), area=int(n),
                bbox=tuple(int(v) for v in box))
        for i, ((label, score, n), box) in enumerate(zip(small, boxes))
    )
    return PanopticResult(segment_ids, segments)


def panoptic_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]], target_sizes: Sequence[tuple[int, int]],
                          config: PostprocessConfig, logits_size: tuple[int, int] | None = None) -> list[PanopticResult]:
    """Panoptic segmentation of each image of a padded batch, at its original size.

    class_logits: (B, Q, C+1) float, last class = "no object"
    mask_logits: (B, Q, h, w) float, for the padded batch
    valid_sizes: per image (vh, vw), its unpadded region of `mask_logits` (top-left anchored)
    target_sizes: per image (H, W), its original size
    logits_size: the size the checkpoint's processor resizes each image's mask logits to first, if
    it does (see `cropped_logits`)
    """
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)  # (B, Q)
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > config.threshold)
    results = []
    for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes)):
        kept = keep[i].nonzero().squeeze(1)
        if kept.numel() == 0:
            results.append(PanopticResult(np.zeros(tuple(target), np.int32), ()))
            continue
        probs = cropped_logits(mask_logits, i, (vh, vw), logits_size, kept).sigmoid_()
        results.append(_one_image(probs, scores[i, kept], labels[i, kept], tuple(target), config))
    return results


def semantic_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]], target_sizes: Sequence[tuple[int, int]],
                          logits_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Class-id map of each image at its original size, as `post_process_semantic_segmentation`.

    Same inputs as `panoptic_segmentation`. The reference upsamples all C class maps
    (einsum of class probabilities and mask probabilities) and takes the argmax; the argmax of the
    upsampled maps is what `_query_areas` computes, interpolating only where a cell does not decide.
    Returns per image (H, W) uint8 when C <= 256 classes, else uint16.
    """
    class_probs = F.softmax(class_logits, dim=-1)[..., :-1]  # (B, Q, C)
    classes = class_probs.shape[-1]
    maps = []
    for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes)):
        class_maps = torch.einsum(  # batched, as the reference: same kernel, same floats
            "bqc,bqhw->bchw", class_probs[i:i + 1], cropped_logits(mask_logits, i, (vh, vw), logits_size)[None].sigmoid())[0]
        ones = torch.ones(classes, dtype=class_maps.dtype, device=class_maps.device)
        _, _, winners = _query_areas(class_maps, ones, tuple(target), None)  # x 1.0 is exact
        ids = torch.arange(classes, dtype=torch.uint8 if classes <= 256 else torch.int32, device=class_maps.device)
        maps.append(winners.paint(ids))
    return [m if m.dtype == np.uint8 else m.astype(np.uint16) for m in maps]
