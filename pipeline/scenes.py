"""Synthetic panoptic scenes with exact ground truth, deterministic by seed.

Each scene has two "stuff" regions (a sky-like gradient above a wavy horizon, a textured ground
below) and a few "thing" instances (discs, boxes, wedges) of random colours and textures that may
overlap and occlude each other; then sensor noise and sometimes blur. Sizes and aspect ratios vary.

    python -m pipeline.scenes OUT --count N --seed S

writes OUT/images/scene_XXXX.{jpg,png}, OUT/panoptic/scene_XXXX.png (COCO panoptic ids) and
OUT/panoptic.json (COCO panoptic ground truth; categories = the bundled model's label map).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.encode import ids_to_rgb, png_bytes

# (label_id, COCO id, name, isthing, colour): the bundled model's classes.
CATEGORIES = (
    (0, 1, "sky", 0, (135, 206, 235)),
    (1, 2, "ground", 0, (139, 115, 85)),
    (2, 3, "disc", 1, (220, 20, 60)),
    (3, 4, "box", 1, (30, 144, 255)),
    (4, 5, "wedge", 1, (255, 215, 0)),
)
SKY, GROUND = 0, 1
THING_LABELS = (2, 3, 4)
MIN_VISIBLE = 40  # pixels: an instance hidden more than this is dropped (its pixels become void)


def label_map() -> dict:
    return {"categories": [
        {"label_id": lid, "id": cid, "name": name, "isthing": thing, "color": list(color),
         "supercategory": "thing" if thing else "stuff"}
        for lid, cid, name, thing, color in CATEGORIES
    ]}


@dataclass(frozen=True)
class Scene:
    """image: (H, W, 3) uint8; segment_ids: (H, W) int32, 0 = void; labels: segment id -> label id."""

    image: np.ndarray
    segment_ids: np.ndarray
    labels: dict[int, int]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    area = rng.uniform(120, 360) ** 2
    aspect = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))  # width / height
    return max(64, int(np.sqrt(area * aspect))), max(64, int(np.sqrt(area / aspect)))


def _background(rng, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Sky gradient over textured ground; returns (H, W, 3) float image and (H, W) label map."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.3, 0.65) + height * 0.06 * np.sin(
        xs[0] / width * rng.uniform(2, 8) + rng.uniform(0, 6.3))
    is_sky = ys < horizon[None, :]
    top, bottom = rng.uniform(40, 120, 3) * [0.6, 0.8, 1.6], rng.uniform(170, 250, 3)
    t = (ys / height)[..., None]
    sky = np.clip(top * (1 - t) + bottom * t, 0, 255)
    base = rng.uniform([60, 70, 20], [150, 160, 90])
    grain = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1))
    grain = np.kron(grain, np.ones((4, 4)))[:height, :width]
    ground = base + 25 * grain[..., None] + rng.normal(0, 12, (height, width, 1))
    image = np.where(is_sky[..., None], sky, ground)
    return image, np.where(is_sky, SKY, GROUND)


def _thing_mask(rng, kind: int, width: int, height: int) -> np.ndarray:
    size = rng.uniform(0.18, 0.42) * min(width, height)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.15, 0.95) * height
    canvas = Image.new("L", (width, height))
    draw = ImageDraw.Draw(canvas)
    if kind == 2:
        rx, ry = size / 2 * rng.uniform(0.8, 1.2), size / 2 * rng.uniform(0.8, 1.2)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
    elif kind == 3:
        angle = rng.uniform(0, np.pi / 2)
        w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.5, 1.0)
        corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        draw.polygon([(cx + x * np.cos(angle) - y * np.sin(angle), cy + x * np.sin(angle) + y * np.cos(angle))
                      for x, y in corners], fill=1)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        draw.polygon([(cx + size * 0.6 * np.cos(a), cy + size * 0.6 * np.sin(a)) for a in angles], fill=1)
    return np.asarray(canvas, dtype=bool)


def _paint(rng, image: np.ndarray, mask: np.ndarray) -> None:
    color = rng.uniform(0, 255, 3)
    ys, xs = np.nonzero(mask)
    if rng.random() < 0.4:  # stripes
        period, angle = rng.uniform(4, 12), rng.uniform(0, np.pi)
        phase = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
        shade = color[None] * (0.75 + 0.25 * phase[:, None])
    else:
        shade = color[None] + rng.normal(0, 10, (len(ys), 1))
    image[ys, xs] = shade


def make_scene(rng: np.random.Generator) -> Scene:
    width, height = _size(rng)
    image, stuff = _background(rng, width, height)
    owner = np.full((height, width), -1)  # index of the thing on top, -1 for stuff
    kinds = rng.choice(THING_LABELS, size=int(rng.integers(1, 6)))
    for index, kind in enumerate(kinds):
        mask = _thing_mask(rng, int(kind), width, height)
        _paint(rng, image, mask)
        owner[mask] = index
    segment_ids = np.where(stuff == SKY, 1, 2).astype(np.int32)
    labels = {1: SKY, 2: GROUND}
    next_id = 3
    for index, kind in enumerate(kinds):
        visible = owner == index
        if visible.sum() < MIN_VISIBLE:
            segment_ids[visible] = 0
            continue
        segment_ids[visible] = next_id
        labels[next_id] = int(kind)
        next_id += 1
    for stuff_id in (1, 2):
        if not (segment_ids == stuff_id).any():
            del labels[stuff_id]
    image = np.clip(image + rng.normal(0, rng.uniform(2, 10), image.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.35:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))))
    return Scene(image, segment_ids, labels)


def scene(seed: int, index: int) -> Scene:
    """Scene `index` of the set generated with `seed` (independent of how many are generated)."""
    return make_scene(np.random.default_rng([seed, index]))


def _segments_info(s: Scene) -> list[dict]:
    info = []
    for seg_id, label in sorted(s.labels.items()):
        ys, xs = np.nonzero(s.segment_ids == seg_id)
        info.append({"id": seg_id, "category_id": CATEGORIES[label][1], "area": int(len(ys)), "iscrowd": 0,
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                              int(ys.max() - ys.min() + 1)]})
    return info


def generate_scenes(out_dir: Path, count: int, seed: int, first: int = 0) -> Path:
    """Write `count` scenes (indices first..first+count-1) and their COCO panoptic ground truth."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "panoptic").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(first, first + count):
        s = scene(seed, index)
        name = f"scene_{index:04d}"
        file_name = f"{name}.jpg" if index % 3 else f"{name}.png"
        buffer = io.BytesIO()
        Image.fromarray(s.image).save(buffer, format="JPEG" if index % 3 else "PNG", quality=92)
        (out_dir / "images" / file_name).write_bytes(buffer.getvalue())
        (out_dir / "panoptic" / f"{name}.png").write_bytes(png_bytes(ids_to_rgb(s.segment_ids)))
        height, width = s.segment_ids.shape
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        annotations.append({"image_id": index, "file_name": f"{name}.png", "segments_info": _segments_info(s)})
    categories = [{k: v for k, v in c.items() if k != "label_id"} for c in label_map()["categories"]]
    (out_dir / "panoptic.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="index of the first scene")
    args = parser.parse_args()
    print(generate_scenes(args.out_dir, args.count, args.seed, args.first))


if __name__ == "__main__":
    main()
