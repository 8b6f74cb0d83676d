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


@dataclass(frozen=True)
class InstanceMask:
    """One instance of one image: a binary mask at the original size. Instances may overlap.

    `label_id` is the model's class index; `score` the reference's (class score x mean mask
    probability inside the mask); `area` and `bbox` (COCO `[x, y, width, height]`) are the mask's.
    mask: (H, W) bool.
    """

    label_id: int
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError(f"mask must be (H, W) bool, got {self.mask.shape} {self.mask.dtype}")


@dataclass(frozen=True)
class InstanceResult:
    """Instance segmentation of one image at its original (H, W) size.

    instances: in the reference's order (transformers numbers them 0, 1, ... in this order).
    """

    size: tuple[int, int]
    instances: tuple[InstanceMask, ...]


@dataclass(frozen=True)
class ImageResult:
    """What inference made of one image, per task asked for (None = not asked).

    semantic: (H, W) uint8 (<= 256 classes) or uint16 map of the model's class indices.
    """

    panoptic: PanopticResult
    semantic: np.ndarray | None = None
    instances: InstanceResult | None = None
