"""Panoptic quality (PQ = SQ x RQ), following the COCO panoptic definition (panopticapi).

A predicted and a ground-truth segment of the same category match when their IoU > 0.5, where the
union leaves out the prediction's pixels on void. An unmatched prediction lying more than half on
void or on a crowd region of its category is ignored, otherwise it is a false positive; an
unmatched non-crowd ground-truth segment is a false negative. PQ is averaged over the categories
that occur; "things" and "stuff" are reported apart.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from pipeline.encode import rgb_to_ids

VOID = 0


@dataclass
class _Tally:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass(frozen=True)
class Quality:
    pq: float
    sq: float
    rq: float
    categories: int


@dataclass
class PanopticQuality:
    """Accumulates images; `result()` gives PQ/SQ/RQ for all, things and stuff."""

    isthing: Mapping[int, bool]  # category id -> isthing
    tallies: dict[int, _Tally] = field(default_factory=lambda: defaultdict(_Tally))

    def add(self, gt_ids: np.ndarray, gt_segments: Iterable[dict], pred_ids: np.ndarray,
            pred_segments: Iterable[dict]) -> None:
        """gt_ids, pred_ids: (H, W) int segment ids (0 = void); segments: dicts with id, category_id
        (and iscrowd for ground truth)."""
        gt = {s["id"]: s for s in gt_segments}
        pred = {s["id"]: s for s in pred_segments}
        pairs = gt_ids.astype(np.int64) * (1 << 32) + pred_ids.astype(np.int64)
        values, counts = np.unique(pairs, return_counts=True)
        inter = {(int(v >> 32), int(v & 0xFFFFFFFF)): int(c) for v, c in zip(values, counts)}
        gt_area, pred_area = defaultdict(int), defaultdict(int)
        for (g, p), n in inter.items():
            gt_area[g] += n
            pred_area[p] += n
        matched_gt, matched_pred = set(), set()
        for (g, p), n in inter.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
                continue
            if gt[g]["category_id"] != pred[p]["category_id"]:
                continue
            union = pred_area[p] + gt_area[g] - n - inter.get((VOID, p), 0)
            iou = n / union
            if iou > 0.5:
                tally = self.tallies[gt[g]["category_id"]]
                tally.tp += 1
                tally.iou += iou
                matched_gt.add(g)
                matched_pred.add(p)
        crowd = {g: s["category_id"] for g, s in gt.items() if s.get("iscrowd", 0)}
        for g, s in gt.items():
            if g not in matched_gt and not s.get("iscrowd", 0):
                self.tallies[s["category_id"]].fn += 1
        for p, s in pred.items():
            if p in matched_pred:
                continue
            ignored = inter.get((VOID, p), 0) + sum(
                n for (g, q), n in inter.items() if q == p and crowd.get(g) == s["category_id"])
            if ignored / max(pred_area[p], 1) > 0.5:
                continue
            self.tallies[s["category_id"]].fp += 1

    def _quality(self, which: bool | None) -> Quality:
        pq = sq = rq = 0.0
        n = 0
        for category, t in self.tallies.items():
            if which is not None and bool(self.isthing.get(category, True)) != which:
                continue
            if t.tp + t.fp + t.fn == 0:
                continue
            n += 1
            sq_c = t.iou / t.tp if t.tp else 0.0
            rq_c = t.tp / (t.tp + 0.5 * t.fp + 0.5 * t.fn)
            pq += sq_c * rq_c
            sq += sq_c
            rq += rq_c
        return Quality(pq / n, sq / n, rq / n, n) if n else Quality(0.0, 0.0, 0.0, 0)

    def result(self) -> dict[str, Quality]:
        return {"all": self._quality(None), "things": self._quality(True), "stuff": self._quality(False)}


def _read_ids(path: Path) -> np.ndarray:
    return rgb_to_ids(np.asarray(Image.open(path).convert("RGB")))


def evaluate_coco_panoptic(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict[str, Quality]:
    """PQ of a prediction set against ground truth, both in COCO panoptic format (JSON + PNG
    folder); images are paired by their `file_name` in each JSON's `images`. A ground-truth image
    with no prediction counts all its segments as false negatives."""
    gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
    quality = PanopticQuality({c["id"]: bool(c["isthing"]) for c in gt["categories"]})
    pred_by_name = {im["file_name"]: im["id"] for im in pred["images"]}
    pred_ann = {a["image_id"]: a for a in pred["annotations"]}
    gt_ann = {a["image_id"]: a for a in gt["annotations"]}
    for image in gt["images"]:
        g = gt_ann[image["id"]]
        gt_ids = _read_ids(Path(gt_dir) / g["file_name"])
        p = pred_ann.get(pred_by_name.get(image["file_name"]))
        if p is None:
            quality.add(gt_ids, g["segments_info"], np.zeros_like(gt_ids), [])
            continue
        quality.add(gt_ids, g["segments_info"], _read_ids(Path(pred_dir) / p["file_name"]), p["segments_info"])
    return quality.result()
