"""PQ on hand-made cases whose answers are worked out by hand."""

import numpy as np
import pytest

from pipeline.pq import PanopticQuality

THINGS = {1: True, 2: True, 9: False}


def quality(gt, gt_segments, pred, pred_segments):
    q = PanopticQuality(THINGS)
    q.add(np.asarray(gt), gt_segments, np.asarray(pred), pred_segments)
    return q.result()


def test_perfect_prediction():
    ids = [[1, 1, 2], [1, 1, 2]]
    r = quality(ids, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 9}],
                ids, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 9}])
    assert r["all"].pq == 1.0 and r["things"].pq == 1.0 and r["stuff"].pq == 1.0


def test_partial_overlap_counts_iou():
    # gt segment 4 pixels; prediction covers 3 of them + 0 extra: IoU 3/4 > 0.5 -> TP with SQ 0.75
    gt = [[1, 1, 1, 1, 0, 0]]
    pred = [[1, 1, 1, 0, 0, 0]]
    r = quality(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 1, "category_id": 1}])
    assert r["all"].sq == pytest.approx(0.75) and r["all"].rq == 1.0 and r["all"].pq == pytest.approx(0.75)


def test_unmatched_are_fp_and_fn():
    # category 1: gt id 1 (4 px) vs pred id 5 overlapping 2 px (IoU 2/6) -> FN + FP: PQ 0.
    gt = [[1, 1, 1, 1, 2, 2, 2, 2]]
    pred = [[5, 5, 0, 0, 5, 5, 7, 7]]
    r = quality(gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}],
                pred, [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 2}])
    # category 2: gt 4 px vs pred id 7 on 2 of them: IoU 2/4 = 0.5, not > 0.5 -> FN + FP.
    assert r["all"].pq == 0.0 and r["all"].categories == 2


def test_void_pixels_leave_the_union_and_void_predictions_are_ignored():
    # gt: id 1 on 3 px, void on 3 px. pred id 1 covers gt's 3 px + 2 void px: union = 3 -> IoU 1.
    # pred id 2 lies wholly on void: ignored, not a false positive.
    gt = [[1, 1, 1, 0, 0, 0]]
    pred = [[1, 1, 1, 1, 1, 2]]
    r = quality(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}])
    assert r["all"].pq == 1.0 and r["all"].categories == 1


def test_crowd_regions_absorb_predictions_and_are_never_missed():
    gt = [[3, 3, 3, 3, 1, 1]]
    pred = [[4, 4, 4, 0, 1, 1]]
    r = quality(gt, [{"id": 3, "category_id": 2, "iscrowd": 1}, {"id": 1, "category_id": 1}],
                pred, [{"id": 4, "category_id": 2}, {"id": 1, "category_id": 1}])
    assert r["all"].pq == 1.0 and r["all"].categories == 1  # category 2: no TP, FP or FN


def test_things_and_stuff_apart():
    gt = [[1, 1, 9, 9]]
    pred = [[1, 1, 0, 0]]
    r = quality(gt, [{"id": 1, "category_id": 1}, {"id": 9, "category_id": 9}], pred, [{"id": 1, "category_id": 1}])
    assert r["things"].pq == 1.0 and r["stuff"].pq == 0.0 and r["all"].pq == 0.5
