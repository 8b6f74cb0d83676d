"""The one internal result type: what post-processing makes and what writers accept.

Numpy only, so writers and their tests import without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One panoptic segment of one image.

    `id` is the value of the segment's pixels in `PanopticResult.segment_ids` (1..N; 0 is void).
    `label_id` is the model's class index (a key of `config.id2label`).
    `bbox` is COCO's `[x, y, width, height]` of the segment's pixels, in original-image pixels.
    """

    id: int
    label_id: int
    score: float
    area: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class PanopticResult:
    """Panoptic segmentation of one image at its original size.

    segment_ids: (H, W) int32, 0 = void, else the `id` of a segment in `segments`.
    segments: one record per distinct non-zero id, sorted by id.
    """

    segment_ids: np.ndarray
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if self.segment_ids.ndim != 2 or self.segment_ids.dtype != np.int32:
            raise ValueError(
                f"segment_ids must be (H, W) int32, got {self.segment_ids.shape} {self.segment_ids.dtype}"
            )
