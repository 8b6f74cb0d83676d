"""The architecture of facebook/maskformer-swin-base-coco with random weights: the compute of the
real checkpoint, for throughput measurements where its weights cannot be downloaded.

    .venv/bin/python -m bench.random_checkpoint OUT_DIR
    .venv/bin/python bench/pipeline.py --model OUT_DIR --images 400

transformers' default `MaskFormerConfig` is that architecture (Swin-B backbone: embedding 128,
depths 2-2-18-2, window 12 at 384 px; DETR decoder: 6 layers of width 256, 100 queries; FPN and
mask features 256); the checkpoint adds its 133 COCO panoptic classes (named as in the built-in
label map, so categories resolve as they do for the real one), and its processor resizes to a
shortest edge of 800 px (at most 1333), padded to multiples of 32: `MaskFormerImageProcessor`'s
defaults. Random weights make no segments (every query's class scores stay near uniform, far
below the 0.5 threshold), so a pipeline run on it times everything but post-processing's work
per segment: `bench/postprocess.py` measures that on logits of COCO's shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.labels import COCO_PANOPTIC_MAP  # noqa: E402


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json to `out_dir`."""
    torch.manual_seed(seed)
    categories = json.loads(COCO_PANOPTIC_MAP.read_text())["categories"]
    id2label = {c["label_id"]: c["name"] for c in categories}
    config = MaskFormerConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()},
                              use_auxiliary_loss=False)  # transformers 5 fails inference without hidden states otherwise
    model = MaskFormerForInstanceSegmentation(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    MaskFormerImageProcessor().save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    directory = build(parser.parse_args().out_dir)
    parameters = sum(p.numel() for p in MaskFormerForInstanceSegmentation.from_pretrained(directory).parameters())
    print(f"{directory}: {parameters / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
