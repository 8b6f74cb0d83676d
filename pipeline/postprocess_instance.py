"""Instance segmentation of one image, as transformers' `post_process_instance_segmentation`.

The reference keeps the Q best (query, class) pairs of the image (a query can appear with several
classes), binarises each pair's mask at logit 0, scores it by class probability x mean mask
probability inside the mask, upsamples the binary masks (nearest) and keeps, in that order, those
scoring >= threshold whose upsampled mask is not empty. Here the same, vectorised: mask scores only
for pairs whose class probability reaches the threshold, and areas and boxes from the low-res
masks; only the kept masks are upsampled. Its quirks absorbed here: it returns a map of instance ids from 0
with -1 as background, where a later instance overwrites an earlier one; here every instance keeps
its own full binary mask (as its `return_binary_maps=True`), in the same order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.postprocess import cropped_logits
from pipeline.results import InstanceMask, InstanceResult


def _nearest(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out,) int64 source row of each output row, as `F.interpolate(mode="nearest")` picks it:
    computed by that kernel itself, so with its float rounding."""
    lines = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, -1, 1)
    return F.interpolate(lines, size=(size_out, 1), mode="nearest").view(-1).to(torch.int64)


def _spans(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lines: (N, L) bool, each row with a True -> first and last True per row, (N,) each."""
    lines = lines.to(torch.uint8)
    return lines.argmax(1), lines.shape[1] - 1 - lines.flip(1).argmax(1)


def instance_one(class_probs: torch.Tensor, mask_logits: torch.Tensor, target: tuple[int, int],
                 threshold: float) -> InstanceResult:
    """class_probs: (Q, C) float, softmax without "no object"; mask_logits: (Q, vh, vw) float,
    padding cropped; target (H, W) -> InstanceResult."""
    queries, classes = class_probs.shape
    # the reference's exact call: `sorted=False` leaves an implementation-defined order, the same here
    top_scores, top = class_probs.flatten(0, 1).topk(queries, sorted=False)
    # a mask score is at most 1, so a pair whose class probability misses the threshold misses it too
    top = top[top_scores.double() >= threshold]
    masks = mask_logits.contiguous()[torch.div(top, classes, rounding_mode="floor")]  # (n, vh, vw)
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = class_probs.flatten()[top] * mask_scores  # row sums do not depend on the row count: same floats
    passing = (scores.double() >= threshold).nonzero().squeeze(1)  # the reference compares a Python float
    # nearest upsampling repeats source rows and columns: areas and boxes from the low-res masks
    (_, h, w), binary = masks.shape, binary[passing]
    rows, cols = _nearest(h, target[0], masks.device), _nearest(w, target[1], masks.device)
    row_uses, col_uses = torch.bincount(rows, minlength=h), torch.bincount(cols, minlength=w)  # 0: skipped
    area = binary.view(-1, w).mv(col_uses.to(binary.dtype)).view(len(passing), h).double().mv(row_uses.double())
    present = area > 0
    chosen, binary, area = passing[present], binary[present] > 0, area[present].to(torch.int64)
    if len(chosen) == 0:
        return InstanceResult(target, ())
    y0, y1 = _spans((binary & (col_uses > 0)).any(2)[:, rows])
    x0, x1 = _spans((binary & (row_uses > 0)[:, None]).any(1)[:, cols])
    table = torch.stack([top[chosen] % classes, area, x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1).cpu().tolist()
    instance_scores = scores[chosen].double().cpu().tolist()
    # (N, H, W); columns first: selecting along the last dim is the slow one (5x on CPU), so on fewer rows
    upsampled = binary.index_select(2, cols).index_select(1, rows).cpu().numpy()
    return InstanceResult(target, tuple(
        InstanceMask(label_id=label, score=round(score, 6), area=n, bbox=tuple(box), mask=mask)
        for (label, n, *box), score, mask in zip(table, instance_scores, upsampled)
    ))


def instance_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]], target_sizes: Sequence[tuple[int, int]],
                          threshold: float, logits_size: tuple[int, int] | None = None) -> list[InstanceResult]:
    """Instances of each image of a padded batch at its original size, as the reference's
    `post_process_instance_segmentation(threshold=threshold, return_binary_maps=True)` on each
    image's cropped masks. Inputs as `postprocess.panoptic_segmentation`: class_logits (B, Q, C+1),
    mask_logits (B, Q, h, w), valid_sizes and target_sizes (B,) of (H, W), logits_size."""
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, C)
    return [instance_one(class_probs[i], cropped_logits(mask_logits, i, (vh, vw), logits_size),
                         (int(target[0]), int(target[1])), threshold)
            for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes))]
