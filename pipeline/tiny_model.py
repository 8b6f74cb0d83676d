"""Build a small, deterministic, *untrained* MaskFormer (or Mask2Former) checkpoint directory.

It has the real architecture (Swin backbone, DETR decoder, pixel decoder) at toy width, so
loading, batching and throughput can be exercised on a CPU without downloading weights. It
predicts "no object" everywhere, unless built with `--segmenting`: random weights made to predict
classes and varied masks, meaningless segments, but many of them, to compare an architecture's
outputs with transformers' reference where its hub checkpoints cannot be downloaded. The bundled
default model is the trained one in `pipeline/data/model` (see `pipeline.train_tiny`).

    python -m pipeline.tiny_model OUT_DIR [--mask2former] [--segmenting]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessor,
    SwinConfig,
)

# (name, isthing): a handful of named labels, some of them stuff.
LABELS = (("sky", 0), ("ground", 0), ("disc", 1), ("box", 1), ("wedge", 1))
COLORS = ((135, 206, 235), (139, 115, 85), (220, 20, 60), (30, 144, 255), (255, 215, 0))


def _swin() -> SwinConfig:
    return SwinConfig(
        image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def label_map() -> dict:
    """The checkpoint's label map, in the format `pipeline.labels` reads."""
    return {
        "categories": [
            {"label_id": i, "id": i + 1, "name": name, "isthing": isthing, "color": list(color),
             "supercategory": "thing" if isthing else "stuff"}
            for i, ((name, isthing), color) in enumerate(zip(LABELS, COLORS))
        ]
    }


def _make_it_segment(model: torch.nn.Module, mask2former: bool) -> None:
    """Random weights that segment: an untrained class head says "no object" for every query and
    its queries start alike. Here the queries differ, the head never says "no object", and the mask
    embeddings are large enough for masks to vary across an image."""
    transformer = model.model.transformer_module
    with torch.no_grad():
        for name in ("queries_embedder", "queries_features"):  # MaskFormer has the first, Mask2Former both
            if hasattr(transformer, name):
                torch.nn.init.normal_(getattr(transformer, name).weight, std=10.0)
        torch.nn.init.normal_(model.class_predictor.weight, std=1.5)
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[-1] = -20.0
        embedder = transformer.decoder.mask_predictor.mask_embedder if mask2former else model.mask_embedder
        for weight in (p for p in embedder.parameters() if p.dim() == 2):
            torch.nn.init.normal_(weight, std=3 / weight.shape[1] ** 0.5)


def build(out_dir: Path, mask2former: bool = False, seed: int = 0, segmenting: bool = False) -> Path:
    """Write config, safetensors weights, preprocessor config and label map to `out_dir`."""
    torch.manual_seed(seed)
    id2label = {i: name for i, (name, _) in enumerate(LABELS)}
    size = {"shortest_edge": 128, "longest_edge": 256}
    if mask2former:
        config = Mask2FormerConfig(
            backbone_config=_swin(), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            num_queries=10, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
            decoder_layers=2, num_attention_heads=2, dim_feedforward=64,
            use_auxiliary_loss=True,  # as hub Mask2Formers: transformers 5 fails at inference without it
        )
        model = Mask2FormerForUniversalSegmentation(config)
        processor = Mask2FormerImageProcessor(size=size)
    else:
        config = MaskFormerConfig(
            backbone_config=_swin(), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            fpn_feature_size=32, mask_feature_size=32, use_auxiliary_loss=False,
            decoder_config={"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
                            "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                            "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10},
        )
        model = MaskFormerForInstanceSegmentation(config)
        processor = MaskFormerImageProcessor(size=size)
    if segmenting:
        _make_it_segment(model, mask2former)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "label_map.json").write_text(json.dumps(label_map(), indent=1))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mask2former", action="store_true", help="build a Mask2Former checkpoint instead")
    parser.add_argument("--segmenting", action="store_true",
                        help="random weights made to segment (meaningless segments, but many)")
    args = parser.parse_args()
    print(build(args.out_dir, mask2former=args.mask2former, segmenting=args.segmenting))


if __name__ == "__main__":
    main()
