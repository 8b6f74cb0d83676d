"""Instance segmentation of one image, as transformers' `post_process_instance_segmentation`.

The reference keeps the Q best (query, class) pairs of the image (a query can appear with several
classes), binarises each pair's mask at logit 0, scores it by class probability x mean mask
probability inside the mask, upsamples the binary masks (nearest) and keeps, in that order, those
scoring >= threshold whose upsampled mask is not empty. Here the same, vectorised, upsampling only
the masks that pass the score. Its quirks absorbed here: it returns a map of instance ids from 0
with -1 as background, where a later instance overwrites an earlier one; here every instance keeps
its own full binary mask (as its `return_binary_maps=True`), in the same order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.results import InstanceMask, InstanceResult


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """masks: (N, H, W) bool, none empty -> (N, 4) int64 COCO [x, y, w, h]."""
    rows, cols = masks.any(2).int(), masks.any(1).int()  # (N, H), (N, W)
    x0, y0 = cols.argmax(1), rows.argmax(1)
    x1 = cols.shape[1] - 1 - cols.flip(1).argmax(1)
    y1 = rows.shape[1] - 1 - rows.flip(1).argmax(1)
    return torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1)


def instance_one(class_probs: torch.Tensor, mask_logits: torch.Tensor, target: tuple[int, int],
                 threshold: float) -> InstanceResult:
    """class_probs: (Q, C) float, softmax without "no object"; mask_logits: (Q, vh, vw) float,
    padding cropped; target (H, W) -> InstanceResult."""
    queries, classes = class_probs.shape
    # the reference's exact call: `sorted=False` leaves an implementation-defined order, the same here
    top_scores, top = class_probs.flatten(0, 1).topk(queries, sorted=False)
    masks = mask_logits.contiguous()[torch.div(top, classes, rounding_mode="floor")]  # (Q, vh, vw)
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top_scores * mask_scores
    passing = (scores.double() >= threshold).nonzero().squeeze(1)  # the reference compares a Python float
    if len(passing) == 0:
        return InstanceResult(target, ())
    upsampled = F.interpolate(binary[passing][None], size=target, mode="nearest")[0] > 0  # (N, H, W)
    present = upsampled.flatten(1).any(1)
    chosen, upsampled = passing[present], upsampled[present]
    if len(chosen) == 0:
        return InstanceResult(target, ())
    table = torch.cat([(top[chosen] % classes)[:, None], upsampled.flatten(1).sum(1)[:, None], _boxes(upsampled)],
                      1).cpu().tolist()
    instance_scores = scores[chosen].double().cpu().tolist()
    upsampled = upsampled.cpu().numpy()
    return InstanceResult(target, tuple(
        InstanceMask(label_id=label, score=round(score, 6), area=area, bbox=tuple(box), mask=mask)
        for (label, area, *box), score, mask in zip(table, instance_scores, upsampled)
    ))


def instance_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid_sizes: Sequence[tuple[int, int]], target_sizes: Sequence[tuple[int, int]],
                          threshold: float) -> list[InstanceResult]:
    """Instances of each image of a padded batch at its original size, as the reference's
    `post_process_instance_segmentation(threshold=threshold, return_binary_maps=True)` on each
    image's cropped masks. Inputs as `postprocess.panoptic_segmentation`: class_logits (B, Q, C+1),
    mask_logits (B, Q, h, w), valid_sizes and target_sizes (B,) of (H, W)."""
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, C)
    return [instance_one(class_probs[i], mask_logits[i, :, :vh, :vw], (int(target[0]), int(target[1])), threshold)
            for i, ((vh, vw), target) in enumerate(zip(valid_sizes, target_sizes))]
