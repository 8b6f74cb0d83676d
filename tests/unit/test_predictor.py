import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.model import BUNDLED
from pipeline.config import InferenceConfig
from pipeline import predictor as predictor_module
from pipeline.predictor import Predictor
from pipeline.scenes import generate_scenes

STUFF = {0, 1}  # the bundled model's sky and ground; labels 2-4 are things


def test_compiled_model_gives_the_same_segments(tmp_path):
    # one shape in one group of four: a single compile (torch would specialise a group of one)
    files = sorted((generate_scenes(tmp_path, count=8, seed=5) / "images").iterdir())
    # scenes whose objects stay large enough at this size for the model to find them
    images = [np.asarray(Image.open(files[i]).convert("RGB").resize((240, 180))) for i in (1, 2, 6, 7)]
    sizes = [(180, 240)] * len(images)
    eager = Predictor(InferenceConfig(model=BUNDLED)).infer(images, sizes)
    compiled = Predictor(InferenceConfig(model=BUNDLED, compile=True)).infer(images, sizes)

    for result in eager:
        labels = {s.label_id for s in result.panoptic.segments}
        assert len(result.panoptic.segments) >= 5 and labels & STUFF and labels - STUFF
    for ours, reference in zip(compiled, eager):
        # fused kernels may round differently: nearly every pixel the same, the same segments
        assert (ours.panoptic.segment_ids == reference.panoptic.segment_ids).mean() > 0.999
        assert [s.label_id for s in ours.panoptic.segments] == [s.label_id for s in reference.panoptic.segments]


def test_an_image_that_fails_its_batch_fails_alone(tmp_path):
    """Out of memory on one huge image: the batch is inferred again image by image."""
    import torch

    files = sorted((generate_scenes(tmp_path, count=3, seed=5) / "images").iterdir())
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    images[1] = np.asarray(Image.open(files[1]).convert("RGB").resize((2048, 512)))  # the "huge" one
    predictor = Predictor(InferenceConfig(model=BUNDLED))
    forward = predictor.model.forward

    def out_of_memory_on_large_inputs(pixel_values, **kwargs):
        if pixel_values.shape[-1] > 4 * pixel_values.shape[-2] - 8:  # the bundled model's input for 512 x 2048
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(pixel_values=pixel_values, **kwargs)

    predictor.model.forward = out_of_memory_on_large_inputs
    out = predictor(_batch([f.name for f in files], images))
    assert out["error_type"].tolist() == ["", "OutOfMemoryError", ""]
    assert out["error_stage"][1] == "infer" and "out of memory" in out["error_message"][1]
    for i in (0, 2):
        assert len(out["segments"][i]) > 2 and out["segment_ids"][i].shape == images[i].shape[:2]


def test_an_image_the_processor_cannot_resize_fails_alone_before_the_model(tmp_path, monkeypatch):
    """Past about 500:1 the bundled model's processor (longest edge 256) rounds the short side to 0
    pixels and refuses the image: a preprocess error row for it, one forward pass for the others."""
    files = sorted((generate_scenes(tmp_path, count=3, seed=5) / "images").iterdir())[1:]  # as in the compile test
    images = [np.asarray(Image.open(f).convert("RGB").resize((240, 180))) for f in files]
    images.insert(1, np.full((2, 1100, 3), 128, np.uint8))
    predictor = Predictor(InferenceConfig(model=BUNDLED))
    forward, shapes = predictor.model.forward, []

    def counted(pixel_values, **kwargs):
        shapes.append(tuple(pixel_values.shape))
        return forward(pixel_values=pixel_values, **kwargs)

    predictor.model.forward = counted
    out = predictor(_batch(["a.jpg", "wide.png", "b.jpg"], images))
    assert out["error_stage"].tolist() == ["", "preprocess", ""]
    assert out["error_type"][1] == "CannotResize" and "cannot resize this 1100x2 image" in out["error_message"][1]
    assert len(shapes) == 1 and shapes[0][0] == 2  # one shape: one forward, not a retry image by image
    for i in (0, 2):
        assert len(json.loads(out["segments"][i])) > 2 and out["segment_ids"][i].shape == images[i].shape[:2]
    # out of GPU memory resizing a huge one: it fails alone too, at the infer stage, and the run goes on
    resize = predictor_module.resize_for_model

    def out_of_memory_on_wide_images(image, *args):
        if image.shape[1] > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return resize(image, *args)

    monkeypatch.setattr(predictor_module, "resize_for_model", out_of_memory_on_wide_images)
    out = predictor(_batch(["a.jpg", "wide.png", "b.jpg"], images))
    assert out["error_stage"].tolist() == ["", "infer", ""] and out["error_type"][1] == "OutOfMemoryError"


def _batch(keys: list[str], images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A batch as the decode stage hands it to the inference actor."""
    n = len(images)
    column = np.empty(n, dtype=object)
    column[:] = images
    return {"key": np.asarray(keys), "image": column,
            "height": np.asarray([im.shape[0] for im in images]), "width": np.asarray([im.shape[1] for im in images]),
            "error_type": np.full(n, ""), "error_stage": np.full(n, ""), "error_message": np.full(n, "")}


def test_on_a_cpu_the_actors_share_the_cores_as_torch_threads(monkeypatch):
    # Ray starts an actor that reserves one CPU with OMP_NUM_THREADS=1: torch on one core
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # as on an 8-core node
    before = torch.get_num_threads()
    try:
        for actors, threads in ((1, 8), (3, 2), (8, 1), (20, 1)):
            torch.set_num_threads(1)
            Predictor(InferenceConfig(model=BUNDLED, actors=actors))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("settings", [{}, {"do_rescale": False, "image_mean": [120.0] * 3, "image_std": [60.0] * 3}])
def test_pixels_are_normalised_as_the_checkpoints_processor_does(settings):
    from transformers import AutoImageProcessor

    from pipeline.model import BUNDLED_DIR
    from pipeline.predictor import normalize, pad_batch
    from pipeline.preprocess import resize_for_model

    processor = AutoImageProcessor.from_pretrained(BUNDLED_DIR, **settings)
    rgb = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    pixels, mask = pad_batch([resize_for_model(rgb, processor)])
    expected = processor(images=[rgb], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize(pixels, mask, processor), expected)
