"""Mask2Former checkpoints: the actor's results are those of the hand-written transformers loop
with Mask2Former's own processor, whose post-processing first resizes the mask logits to 384x384."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import InferenceConfig, PostprocessConfig
from pipeline.predictor import Predictor
from pipeline.scenes import generate_scenes
from pipeline.tiny_model import build


@pytest.fixture(scope="module")
def mask2former(tmp_path_factory):
    """A tiny Mask2Former with random weights made to segment (seed 2 finds segments of four
    classes, stuff and things, in these scenes)."""
    return build(tmp_path_factory.mktemp("m2f"), mask2former=True, segmenting=True, seed=2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[np.ndarray]:
    files = sorted((generate_scenes(tmp_path_factory.mktemp("scenes"), count=4, seed=5) / "images").iterdir())
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def reference(directory, image: np.ndarray):
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(directory)
    model = AutoModelForUniversalSegmentation.from_pretrained(directory, use_safetensors=True).eval()
    assert type(processor).__name__.startswith("Mask2Former")
    with torch.inference_mode():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    target = [image.shape[:2]]
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=target, label_ids_to_fuse=set())[0]
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]
    instances = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=target,
                                                             return_binary_maps=True)[0]
    return panoptic, semantic.numpy(), instances


def test_mask2former_results_are_the_reference_loops(mask2former, scenes):
    predictor = Predictor(InferenceConfig(model=str(mask2former),
                                          postprocess=PostprocessConfig(tasks=("panoptic", "semantic", "instance"))))
    ours = predictor.infer(scenes, [image.shape[:2] for image in scenes])
    labels = {s.label_id for result in ours for s in result.panoptic.segments}
    assert sum(len(r.panoptic.segments) for r in ours) >= 8 and {1} & labels and labels & {2, 3, 4}
    for image, result in zip(scenes, ours):
        panoptic, semantic, instances = reference(mask2former, image)
        assert [(s.id, s.label_id) for s in result.panoptic.segments] == [
            (s["id"], s["label_id"]) for s in panoptic["segments_info"]]
        reference_ids = panoptic["segmentation"].numpy().clip(min=0)
        assert (result.panoptic.segment_ids == reference_ids).mean() > 0.9999
        assert (result.semantic == semantic).mean() > 0.9999
        assert [(i.label_id, round(i.score, 5)) for i in result.instances.instances] == [
            (s["label_id"], round(s["score"], 5)) for s in instances["segments_info"]]


def test_either_auxiliary_loss_setting_runs(mask2former, tmp_path, scenes):
    """transformers 5 fails a Mask2Former forward with use_auxiliary_loss off and a MaskFormer's with
    it on; checkpoints fine-tuned either way load and run."""
    for is_mask2former in (True, False):
        directory = build(tmp_path / str(is_mask2former), mask2former=is_mask2former)
        config = json.loads((directory / "config.json").read_text())
        config["use_auxiliary_loss"] = not config["use_auxiliary_loss"]
        (directory / "config.json").write_text(json.dumps(config))
        result = Predictor(InferenceConfig(model=str(directory))).infer(scenes[:1], [scenes[0].shape[:2]])[0]
        assert result.panoptic.segment_ids.shape == scenes[0].shape[:2]


def test_the_processor_decides_the_post_processing(tmp_path, scenes):
    """A MaskFormer whose checkpoint names Mask2Former's processor gets that processor's results
    (its mask logits resized to 384x384 first), as its own transformers loop gives."""
    import shutil

    from pipeline.model import BUNDLED_DIR

    directory = tmp_path / "maskformer_m2f_processor"
    shutil.copytree(BUNDLED_DIR, directory)
    config = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps(config | {"image_processor_type": "Mask2FormerImageProcessor"}))
    ours = Predictor(InferenceConfig(model=str(directory))).infer(scenes[:2], [image.shape[:2] for image in scenes[:2]])
    assert all(len(result.panoptic.segments) >= 2 for result in ours)
    for image, result in zip(scenes, ours):
        panoptic, _, _ = reference(directory, image)
        assert [(s.id, s.label_id) for s in result.panoptic.segments] == [
            (s["id"], s["label_id"]) for s in panoptic["segments_info"]]
        assert (result.panoptic.segment_ids == panoptic["segmentation"].numpy().clip(min=0)).mean() > 0.9999
