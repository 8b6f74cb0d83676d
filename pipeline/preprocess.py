"""RGB image -> the resized uint8 tensor the checkpoint's image processor would make.

Only the resize happens here (CPU tasks); rescale, normalise and pad happen on the inference
device, where they are cheap and where 4x fewer bytes arrive (uint8, not float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.failures import PREPROCESS, ImageFailure

MIN_SIDE = 2  # smaller images cannot be resized meaningfully by the processor


def resize_for_model(rgb: np.ndarray, processor: Any) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, h, w) uint8, exactly as `processor` resizes it.

    Uses the processor's own resize (size, longest edge, size divisor, resample), so any
    MaskFormer/Mask2Former checkpoint gets its own preprocessing.
    """
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageFailure(PREPROCESS, "TooSmall", f"{width}x{height} is too small to segment")
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if not getattr(processor, "do_resize", True):
        return chw.numpy()
    resized = processor.resize(
        image=chw, size=processor.size, size_divisor=getattr(processor, "size_divisor", 0) or 0,
        resample=processor.resample,
    )
    return resized.contiguous().numpy()
