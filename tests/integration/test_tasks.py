"""--tasks panoptic,semantic,instance end to end: semantic PNGs and COCO instances against the
reference (processor -> model -> transformers' post-processing, one image at a time)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as rle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.coco import image_id
from pipeline.config import PostprocessConfig
from pipeline.decode import decode_image
from pipeline.labels import load_categories
from pipeline.model import BUNDLED_DIR
from pipeline.run import RunConfig, run
from tests.integration.conftest import images_table

SAMPLES = BUNDLED_DIR.parent / "samples"
TASKS = ("panoptic", "semantic", "instance")


@pytest.fixture(scope="module")
def tasks_run(ray_runtime, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tasks")
    run(RunConfig(input=str(SAMPLES), output=str(output), postprocess=PostprocessConfig(tasks=TASKS)))
    return output


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """key -> the reference's semantic map (category ids) and thing instances (binary masks)."""
    from transformers import AutoImageProcessor, MaskFormerForInstanceSegmentation

    processor = AutoImageProcessor.from_pretrained(BUNDLED_DIR)
    model = MaskFormerForInstanceSegmentation.from_pretrained(BUNDLED_DIR, use_safetensors=True).eval()
    categories = load_categories(model.config.id2label, BUNDLED_DIR)
    results = {}
    for path in sorted(SAMPLES.iterdir()):
        rgb = decode_image(path.read_bytes())
        with torch.inference_mode():
            outputs = model(**processor(images=[rgb], return_tensors="pt"))
        semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[rgb.shape[:2]])[0]
        instances = processor.post_process_instance_segmentation(outputs, target_sizes=[rgb.shape[:2]],
                                                                 return_binary_maps=True)[0]
        masks = instances["segmentation"].numpy().astype(bool) if instances["segments_info"] else []
        results[path.name] = {
            "semantic": np.array([c.id for c in categories])[semantic.numpy()],
            "instances": [(categories[info["label_id"]], mask)
                          for info, mask in zip(instances["segments_info"], masks)
                          if categories[info["label_id"]].isthing],
        }
    return results


def test_semantic_pngs_match_the_reference(tasks_run, reference):
    rows = images_table(tasks_run)
    assert len(rows) == len(reference)
    same = total = 0
    for row in rows:
        image = Image.open(io.BytesIO((tasks_run / row["semantic_png"]).read_bytes()))
        assert image.mode == "L"  # 8-bit: COCO category ids fit
        ours = np.asarray(image)
        expected = reference[row["key"]]["semantic"]
        assert ours.shape == expected.shape == (row["height"], row["width"])
        assert len(np.unique(expected)) >= 2
        same, total = same + int((ours == expected).sum()), total + ours.size
    assert same / total >= 0.999  # the pipeline resizes on its own, so a few edge pixels may differ


def test_instance_rows_decode_to_their_area_and_box(tasks_run):
    rows = images_table(tasks_run)
    instances = [(row, inst) for row in rows for inst in row["instances"]]
    assert len(instances) >= 10 and len({inst["label"] for _, inst in instances}) >= 2
    for row, inst in instances:
        mask = rle.decode({"size": [row["height"], row["width"]], "counts": inst["rle"]})
        assert int(mask.sum()) == inst["area"] > 0
        assert [int(v) for v in rle.toBbox({"size": [row["height"], row["width"]], "counts": inst["rle"]})] == \
            inst["bbox"]


def test_coco_instances_score_ap_one_against_the_reference(tasks_run, reference, tmp_path):
    ours = COCO(str(tasks_run / "coco" / "instances.json"))
    assert {c["isthing"] for c in ours.loadCats(ours.getCatIds())} == {1}
    truth = {"images": ours.dataset["images"], "categories": ours.dataset["categories"], "annotations": []}
    for key, result in reference.items():
        for category, mask in result["instances"]:
            encoded = rle.encode(np.asfortranarray(mask, dtype=np.uint8))
            truth["annotations"].append({
                "id": len(truth["annotations"]) + 1, "image_id": image_id(key), "category_id": category.id,
                "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()},
                "area": int(mask.sum()), "bbox": [float(v) for v in rle.toBbox(encoded)], "iscrowd": 0})
    assert len(truth["annotations"]) >= 10
    assert len({a["category_id"] for a in truth["annotations"]}) >= 2
    assert len(ours.dataset["annotations"]) == len(truth["annotations"])
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    gt = COCO(str(tmp_path / "truth.json"))
    # as detections: the file itself, or its annotations through loadRes (as the README says)
    for detections in (ours, gt.loadRes(json.loads((tasks_run / "coco" / "instances.json").read_text())["annotations"])):
        evaluation = COCOeval(gt, detections, iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)  # mask AP over IoU 0.50:0.95
