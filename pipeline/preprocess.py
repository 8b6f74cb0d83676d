"""Decoded RGB images -> the resized uint8 tensors the checkpoint's image processor would make.

Runs in the inference actor, on its device. The processor's resize needs torch and torchvision
(seconds to import and hundreds of MB in every process that loads them), which the decode tasks
therefore never load; and a checkpoint that enlarges images (COCO MaskFormers resize to 800 px)
is sent the smaller original. Rescale, normalise and pad follow on the device (predictor.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def resize_for_model(rgb: np.ndarray, processor: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) uint8 on `device`, exactly as `processor` resizes it.

    Uses the processor's own resize (size, longest edge, size divisor, resample), so any
    MaskFormer/Mask2Former checkpoint gets its own preprocessing. Images smaller than
    `prepare.MIN_SIDE` never get here.
    """
    with warnings.catch_warnings():  # Ray hands batches over read-only; nothing here writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        chw = torch.from_numpy(np.ascontiguousarray(rgb))
    if torch.device(device).type == "cuda":  # the uint8 original crosses to the GPU, not the resized floats
        chw = chw.pin_memory().to(device, non_blocking=True)
    chw = chw.permute(2, 0, 1)
    if not getattr(processor, "do_resize", True):
        return chw.contiguous()
    return processor.resize(
        image=chw, size=processor.size, size_divisor=getattr(processor, "size_divisor", 0) or 0,
        resample=processor.resample,
    ).contiguous()
