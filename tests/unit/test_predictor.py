import numpy as np
from PIL import Image

from pipeline.model import BUNDLED
from pipeline.predictor import InferenceConfig, Predictor
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
