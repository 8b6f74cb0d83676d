"""PQ on hand-made cases whose answers are worked out by hand."""

import json

import numpy as np
import pytest

from pipeline.encode import panoptic_png
from pipeline.pq import PanopticQuality, evaluate_coco_panoptic

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


def test_categories_are_averaged_and_misses_lower_rq():
    # thing 1: gt ids 1 (matched, IoU 1) and 2 (missed): SQ 1, RQ 1 / (1 + 0.5) -> PQ 2/3.
    # stuff 9: gt 5 px, prediction on 3 of them: IoU 0.6 -> PQ 0.6.
    gt = [[1, 1, 2, 2, 9, 9, 9, 9, 9, 0]]
    pred = [[1, 1, 0, 0, 9, 9, 9, 0, 0, 0]]
    r = quality(gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 9, "category_id": 9}],
                pred, [{"id": 1, "category_id": 1}, {"id": 9, "category_id": 9}])
    assert r["things"].pq == pytest.approx(2 / 3) and r["stuff"].pq == pytest.approx(0.6)
    assert r["all"].pq == pytest.approx((2 / 3 + 0.6) / 2)
    assert r["all"].sq == pytest.approx(0.8) and r["all"].rq == pytest.approx((2 / 3 + 1) / 2)


def _write(root, images, annotations, pngs):
    for name, ids in pngs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(panoptic_png(np.asarray(ids, dtype=np.int32)))
    categories = [{"id": 1, "name": "disc", "isthing": 1}, {"id": 9, "name": "sky", "isthing": 0}]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}))


def test_coco_files_are_paired_by_image_file_name(tmp_path):
    ids = [[1, 1, 9, 9]]
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 9, "category_id": 9, "iscrowd": 0}]
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _write(gt, [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}],
           [{"image_id": 1, "file_name": "a.png", "segments_info": segments},
            {"image_id": 2, "file_name": "b.png", "segments_info": segments}],
           {"a.png": ids, "b.png": ids})
    # the prediction numbers its images differently, keeps PNGs in a subfolder, and lacks b.png:
    # a.jpg is perfect, b.png's two segments are false negatives.
    _write(pred, [{"id": 70, "file_name": "a.jpg"}],
           [{"image_id": 70, "file_name": "sub/a.png", "segments_info": segments}], {"sub/a.png": ids})
    r = evaluate_coco_panoptic(gt / "panoptic.json", gt, pred / "panoptic.json", pred)
    assert r["things"].pq == pytest.approx(2 / 3) and r["stuff"].pq == pytest.approx(2 / 3)
    assert r["all"].sq == 1.0 and r["all"].categories == 2
