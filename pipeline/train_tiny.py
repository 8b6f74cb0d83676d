"""Train the bundled checkpoint: a ~1 M-parameter MaskFormer on synthetic panoptic scenes.

    python -m pipeline.train_tiny OUT [--steps N] [--minutes M] [--seed S]

Fresh scenes every step (`pipeline.scenes`, seed S), transformers' own MaskFormer loss, auxiliary
losses on the intermediate decoder layers only (the first hidden state transformers captures is
the decoder's all-zero input: supervising it rewards one query-independent prediction, which
collapsed earlier attempts), AdamW with warm-up and cosine decay, gradient clipping at 1.0.
Held-out panoptic quality is measured every `--eval-every` steps exactly as the pipeline
predicts (processor, model, transformers' panoptic post-processing at the original size); the
best checkpoint so far is always a complete directory in OUT, and the learning curve is
OUT/training_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, ResNetConfig

from pipeline.pq import PanopticQuality
from pipeline.scenes import CATEGORIES, Scene, label_map, scene

EVAL_SEED = 1_000_003  # held-out scenes never seen in training
IMAGE_SIZE = {"shortest_edge": 128, "longest_edge": 256}


def build_model(seed: int) -> MaskFormerForInstanceSegmentation:
    torch.manual_seed(seed)
    backbone = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                            out_features=["stage1", "stage2", "stage3"])
    id2label = {lid: name for lid, _, name, _, _ in CATEGORIES}
    config = MaskFormerConfig(
        backbone_config=backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        fpn_feature_size=64, mask_feature_size=64, cross_entropy_weight=2.0, use_auxiliary_loss=False,
        decoder_config={"model_type": "detr", "d_model": 64, "decoder_layers": 3, "encoder_layers": 1,
                        "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 128,
                        "encoder_ffn_dim": 128, "num_queries": 12, "dropout": 0.0},
    )
    return MaskFormerForInstanceSegmentation(config)


def batch_inputs(processor: MaskFormerImageProcessor, scenes: list[Scene]) -> dict:
    return processor(
        images=[s.image for s in scenes], segmentation_maps=[s.segment_ids for s in scenes],
        instance_id_to_semantic_id=[s.labels for s in scenes], ignore_index=0, return_tensors="pt",
    )


def training_loss(model: MaskFormerForInstanceSegmentation, inputs: dict) -> torch.Tensor:
    """transformers' MaskFormer loss on the last decoder layer plus each intermediate layer."""
    out = model.model(inputs["pixel_values"], inputs["pixel_mask"], output_hidden_states=True, return_dict=True)
    hidden = torch.stack(out.transformer_decoder_hidden_states[1:])  # (L, B, Q, C), decoder input left out
    classes = model.class_predictor(hidden)
    masks = torch.einsum("lbqc, bchw -> lbqhw", model.mask_embedder(hidden), out.pixel_decoder_last_hidden_state)
    auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
    losses = model.get_loss_dict(masks[-1], classes[-1], inputs["mask_labels"], inputs["class_labels"], auxiliary)
    return model.get_loss(losses)


@torch.inference_mode()
def evaluate(model, processor, count: int) -> dict[str, float]:
    """Held-out PQ, predicted the way the pipeline predicts."""
    model.eval()
    quality = PanopticQuality({cid: bool(thing) for _, cid, _, thing, _ in CATEGORIES})
    for index in range(count):
        s = scene(EVAL_SEED, index)
        inputs = processor(images=[s.image], return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        result = processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[s.segment_ids.shape], label_ids_to_fuse=set())[0]
        pred = result["segmentation"].numpy().astype(np.int64).clip(min=0)
        pred_segments = [{"id": i["id"], "category_id": CATEGORIES[i["label_id"]][1]} for i in result["segments_info"]]
        gt_segments = [{"id": i, "category_id": CATEGORIES[label][1], "iscrowd": 0} for i, label in s.labels.items()]
        quality.add(s.segment_ids, gt_segments, pred, pred_segments)
    model.train()
    result = quality.result()
    return {"pq": result["all"].pq, "pq_things": result["things"].pq, "pq_stuff": result["stuff"].pq,
            "sq": result["all"].sq, "rq": result["all"].rq}


def save_checkpoint(model, processor, out_dir: Path, log: list[dict]) -> None:
    """Replace `out_dir` with a complete checkpoint directory, atomically (rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".staging-"))
    model.config.use_auxiliary_loss = False  # transformers 5.x fails at inference otherwise
    model.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    (staging / "label_map.json").write_text(json.dumps(label_map(), indent=1))
    (staging / "training_log.json").write_text(json.dumps(log, indent=1))
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def training_batches(seed: int, batch_size: int, group: int = 4) -> Iterator[list[Scene]]:
    """Fresh scenes, `group` batches at a time sorted by aspect ratio: a batch is padded to its
    largest image, and similar shapes waste far less compute on padding."""
    start = 0
    while True:
        scenes = sorted((scene(seed, start + i) for i in range(group * batch_size)),
                        key=lambda s: s.segment_ids.shape[0] / s.segment_ids.shape[1])
        start += group * batch_size
        for i in range(group):
            yield scenes[i * batch_size:(i + 1) * batch_size]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(out_dir: Path, steps: int, minutes: float, seed: int, batch_size: int, eval_every: int,
          eval_count: int, log_every: int = 20) -> list[dict]:
    model = build_model(seed).train()
    processor = MaskFormerImageProcessor(size=IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    log: list[dict] = []
    best, start, recent = -1.0, time.monotonic(), []
    for step, scenes in zip(range(steps), training_batches(seed, batch_size)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, 5e-4, 200)
        loss = training_loss(model, batch_inputs(processor, scenes))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(float(loss.detach()))
        elapsed = (time.monotonic() - start) / 60
        last = step == steps - 1 or elapsed >= minutes
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(recent[-log_every:]):.3f} {elapsed:.1f} min", flush=True)
        if (step + 1) % eval_every == 0 or last:
            entry = {"step": step + 1, "minutes": round(elapsed, 2), "loss": round(float(np.mean(recent)), 4),
                     **{k: round(v, 4) for k, v in evaluate(model, processor, eval_count).items()}}
            recent = []
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if entry["pq"] > best:
                best = entry["pq"]
                save_checkpoint(model, processor, out_dir, log)
            else:
                (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
        if last:
            break
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps (the cosine schedule's length)")
    parser.add_argument("--minutes", type=float, default=120.0, help="stop early after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-count", type=int, default=100, help="held-out scenes per evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out_dir, args.steps, args.minutes, args.seed, args.batch_size, args.eval_every, args.eval_count)


if __name__ == "__main__":
    main()
