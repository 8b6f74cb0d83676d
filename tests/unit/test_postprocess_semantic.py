"""Parity of `semantic_segmentation` with transformers' post_process_semantic_segmentation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import MaskFormerImageProcessor

from pipeline.postprocess import semantic_segmentation
from tests.unit.test_postprocess_panoptic import blob_logits

REFERENCE = MaskFormerImageProcessor()


def reference(class_logits, masks, targets):
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=masks)
    return [m.numpy() for m in REFERENCE.post_process_semantic_segmentation(outputs, target_sizes=targets)]


@pytest.mark.parametrize("size, targets", [
    ((48, 64), [(150, 200), (101, 300)]),
    ((24, 32), [(1, 1), (30, 40)]),
    ((40, 60), [(3, 2000), (40, 300)]),  # very wide
    ((24, 32), [(480, 640), (600, 800)]),  # large upsampling: most cells settle without interpolating
])
def test_matches_reference(size, targets):
    class_logits, masks = blob_logits(2, 30, 6, *size, seed=sum(targets[0]))
    ours = semantic_segmentation(class_logits, masks, [size] * 2, targets)
    for o, t, target in zip(ours, reference(class_logits, masks, targets), targets):
        assert o.shape == target and o.dtype == np.uint8
        if o.size > 100:
            assert len(np.unique(o)) >= 4  # several classes really compete
        assert np.array_equal(o, t)


def test_padding_is_cropped_and_many_classes_are_uint16():
    class_logits, masks = blob_logits(2, 20, 300, 30, 40, seed=3)
    valid, targets = [(30, 40), (21, 33)], [(90, 120), (84, 132)]
    padded = masks.clone()
    padded[1, :, 21:], padded[1, :, :, 33:] = 30.0, 30.0
    ours = semantic_segmentation(class_logits, padded, valid, targets)
    for i, ((vh, vw), target) in enumerate(zip(valid, targets)):
        (expected,) = reference(class_logits[i:i + 1], masks[i:i + 1, :, :vh, :vw].contiguous(), [target])
        assert ours[i].dtype == np.uint16 and len(np.unique(ours[i])) >= 4
        assert np.array_equal(ours[i], expected)


def test_sharp_masks_settle_cell_by_cell(monkeypatch):
    import pipeline.postprocess as postprocess
    from tests.unit.test_postprocess_panoptic import tiling_logits

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to upsampling every map")

    monkeypatch.setattr(postprocess, "_upsampled_areas", no_fallback)
    class_logits, masks = tiling_logits(2, 40, 8, 50, 67, seed=4)
    targets = [(120, 160), (203, 97)]
    ours = semantic_segmentation(class_logits, masks, [(50, 67)] * 2, targets)
    for o, t in zip(ours, reference(class_logits, masks, targets)):
        assert len(np.unique(o)) >= 5
        assert np.array_equal(o, t)


def test_one_class_everywhere():
    class_logits = torch.full((1, 5, 4), -10.0)
    class_logits[:, :, 2] = 10.0  # every query says class 2
    masks = torch.randn(1, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    (ours,) = semantic_segmentation(class_logits, masks, [(8, 8)], [(20, 30)])
    assert ours.shape == (20, 30) and (ours == 2).all()
    assert np.array_equal(ours, reference(class_logits, masks, [(20, 30)])[0])
