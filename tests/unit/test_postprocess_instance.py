"""Parity of `instance_segmentation` with transformers' post_process_instance_segmentation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import MaskFormerImageProcessor

from pipeline.postprocess_instance import instance_segmentation
from tests.unit.test_postprocess_panoptic import blob_logits

REFERENCE = MaskFormerImageProcessor()


def reference(class_logits, masks, targets, threshold):
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=masks)
    return REFERENCE.post_process_instance_segmentation(outputs, threshold=threshold, target_sizes=targets,
                                                        return_binary_maps=True)


def assert_same(ours, theirs, target):
    assert ours.size == target
    if not theirs["segments_info"]:
        assert ours.instances == ()
        return
    assert [(i.label_id, i.score) for i in ours.instances] == [
        (info["label_id"], info["score"]) for info in theirs["segments_info"]]
    expected = theirs["segmentation"].numpy() == 1  # (N, H, W), one binary map per instance
    for instance, mask in zip(ours.instances, expected):
        assert instance.mask.shape == target and np.array_equal(instance.mask, mask)
        ys, xs = np.nonzero(mask)
        assert instance.area == len(ys) > 0
        assert instance.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


@pytest.mark.parametrize("targets, threshold", [([(96, 128), (61, 83)], 0.5), ([(1, 1), (3, 2000)], 0.3),
                                                ([(12, 16), (200, 90)], 0.7)])
def test_matches_reference(targets, threshold):
    class_logits, masks = blob_logits(2, 30, 5, 24, 32, seed=targets[1][1])
    ours = instance_segmentation(class_logits, masks, [(24, 32)] * 2, targets, threshold)
    if targets[0] != (1, 1):
        assert len(ours[0].instances) >= 3 and len({i.label_id for i in ours[0].instances}) >= 2
    for o, t, target in zip(ours, reference(class_logits, masks, targets, threshold), targets):
        assert_same(o, t, target)


def test_overlapping_instances_keep_their_own_masks():
    """A query whose class scores tie for two labels can be listed twice, with the same mask."""
    class_logits, masks = blob_logits(1, 10, 4, 24, 32, seed=2)
    class_logits[0, 0, :2] = 9.0  # query 0: labels 0 and 1 equally likely
    class_logits[0, 0, 2:] = -9.0
    class_logits[0, 1, -1] = 20.0  # query 1 says "no object": room for both of query 0's pairs in the top 10
    (ours,) = instance_segmentation(class_logits, masks, [(24, 32)], [(48, 64)], 0.3)
    (theirs,) = reference(class_logits, masks, [(48, 64)], 0.3)
    assert_same(ours, theirs, (48, 64))
    zeros = [i for i in ours.instances if i.label_id == 0]
    twins = [(a, b) for a in zeros for b in ours.instances if b.label_id == 1 and b.score == a.score]
    assert len(ours.instances) >= 4 and len(twins) == 1 and np.array_equal(twins[0][0].mask, twins[0][1].mask)


def test_padding_is_cropped_and_nothing_found_is_empty():
    class_logits, masks = blob_logits(2, 30, 5, 30, 40, seed=4)
    valid, targets = [(30, 40), (19, 25)], [(60, 80), (57, 75)]
    padded = masks.clone()
    padded[1, :, 19:], padded[1, :, :, 25:] = 30.0, 30.0
    ours = instance_segmentation(class_logits, padded, valid, targets, 0.5)
    for i, ((vh, vw), target) in enumerate(zip(valid, targets)):
        (expected,) = reference(class_logits[i:i + 1], masks[i:i + 1, :, :vh, :vw].contiguous(), [target], 0.5)
        assert len(ours[i].instances) >= 3
        assert_same(ours[i], expected, target)
    class_logits[..., -1] = 100.0
    assert [r.instances for r in instance_segmentation(class_logits, masks, [(30, 40)] * 2, targets,
                                                      0.5)] == [(), ()]
