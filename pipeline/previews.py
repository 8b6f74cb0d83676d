"""Preview overlays (segments in category colours, outlines, labels) and an HTML contact sheet.

previews/<key>.jpg   the input with its segments drawn over it
previews/index.html  every preview on one page, opened straight from disk (no server)
"""

from __future__ import annotations

import html
import io
from typing import Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

from pipeline.storage import OutputStore

PREVIEWS_DIR = "previews"
INDEX = f"{PREVIEWS_DIR}/index.html"
ALPHA = 0.45


def preview_path(key: str) -> str:
    return f"{PREVIEWS_DIR}/{key}.jpg"


def _outlines(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another id."""
    edges = np.zeros(segment_ids.shape, dtype=bool)
    edges[:, :-1] |= segment_ids[:, :-1] != segment_ids[:, 1:]
    edges[:-1, :] |= segment_ids[:-1, :] != segment_ids[1:, :]
    return edges


def render_overlay(rgb: np.ndarray, segment_ids: np.ndarray, segments: Sequence[dict]) -> Image.Image:
    """(H, W, 3) uint8 image + (H, W) ids + segment rows (id, label, bbox, color) -> overlay image."""
    palette = np.zeros((int(segment_ids.max(initial=0)) + 1, 3), dtype=np.float32)
    for segment in segments:
        palette[segment["id"]] = segment["color"]
    colored = palette[segment_ids]
    blend = np.where(segment_ids[..., None] > 0, (1 - ALPHA) * rgb + ALPHA * colored, rgb)
    blend[_outlines(segment_ids)] = 255
    image = Image.fromarray(blend.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for segment in segments:
        x, y, _, _ = segment["bbox"]
        text = segment["label"]
        left, top, right, bottom = draw.textbbox((x + 2, y + 1), text)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=tuple(int(c) for c in segment["color"]))
        draw.text((x + 2, y + 1), text, fill=(0, 0, 0))
    return image


def write_preview(store: OutputStore, key: str, rgb: np.ndarray, segment_ids: np.ndarray,
                  segments: Sequence[dict]) -> None:
    buffer = io.BytesIO()
    render_overlay(rgb, segment_ids, segments).save(buffer, format="JPEG", quality=90)
    store.write_bytes(preview_path(key), buffer.getvalue())


def write_index(store: OutputStore, files: Sequence[str]) -> None:
    """The contact sheet of preview `files` (relative to previews/): relative links, so the page
    works from a local folder or a bucket."""
    cards = "\n".join(
        f'<figure><img src="{html.escape(quote(f))}" alt="{html.escape(f)}" loading="lazy">'
        f"<figcaption>{html.escape(f.removesuffix('.jpg'))}</figcaption></figure>"
        for f in files
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Panoptic previews</title>
<style>body{{font-family:sans-serif;margin:16px;background:#f4f4f4}}
main{{display:flex;flex-wrap:wrap;gap:12px}}figure{{margin:0;background:#fff;padding:8px;border-radius:4px}}
img{{max-width:320px;max-height:320px;display:block}}figcaption{{font-size:12px;color:#333;margin-top:4px}}</style>
</head><body><h1>Panoptic previews ({len(files)})</h1><main>
{cards}
</main></body></html>
"""
    store.write_bytes(INDEX, page.encode())
