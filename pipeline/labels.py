"""Categories of a checkpoint: which label is a thing, its COCO category id and its colour.

The model's classes come from `config.id2label`; what transformers does not record (isthing,
COCO ids, colours) comes from a label map, looked up in this order:
1. a file the user names (`--label-map`),
2. `label_map.json` in the checkpoint directory,
3. the built-in COCO panoptic map, when every class name is a COCO panoptic category,
4. otherwise every class is a thing, ids are label_id + 1 (with a warning).

Label map format: `{"categories": [{"label_id", "id", "name", "isthing", "color", "supercategory"}]}`.
"""

from __future__ import annotations

import colorsys
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

LABEL_MAP_FILE = "label_map.json"
COCO_PANOPTIC_MAP = Path(__file__).parent / "data" / "coco_panoptic_label_map.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Category:
    label_id: int  # the model's class index
    id: int  # COCO category id written to outputs
    name: str
    isthing: bool
    color: tuple[int, int, int]
    supercategory: str

    def coco(self) -> dict:
        return {"id": self.id, "name": self.name, "isthing": int(self.isthing),
                "color": list(self.color), "supercategory": self.supercategory}


class LabelMapError(ValueError):
    """A label map that does not fit the checkpoint."""


def _parse(text: str, source: str) -> list[Category]:
    try:
        entries = json.loads(text)["categories"]
        return [
            Category(int(e["label_id"]), int(e["id"]), str(e["name"]), bool(e["isthing"]),
                     tuple(int(c) for c in e.get("color", (0, 0, 0)))[:3], str(e.get("supercategory", "")))
            for e in entries
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelMapError(f"label map {source} is not valid: {exc!r}") from exc


def _fallback(id2label: Mapping[int, str]) -> list[Category]:
    def color(i: int) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95)
        return int(r * 255), int(g * 255), int(b * 255)

    return [Category(i, i + 1, name, True, color(i), "") for i, name in sorted(id2label.items())]


def _check(categories: list[Category], id2label: Mapping[int, str], source: str) -> tuple[Category, ...]:
    by_label = {c.label_id: c for c in categories}
    missing = sorted(set(id2label) - set(by_label))
    if missing:
        raise LabelMapError(f"label map {source} has no entry for model label ids {missing[:10]}")
    chosen = tuple(by_label[i] for i in sorted(id2label))
    ids = [c.id for c in chosen]
    if len(set(ids)) != len(ids) or min(ids) < 1:
        raise LabelMapError(f"label map {source}: category ids must be unique and >= 1 (0 is void)")
    return chosen


def load_categories(id2label: Mapping[int, str], model_dir: Path, label_map: str | None = None,
                    storage_options: dict | None = None) -> tuple[Category, ...]:
    """Categories for every model label id, ordered by label id."""
    id2label = {int(k): v for k, v in id2label.items()}
    if label_map is not None:
        import fsspec

        with fsspec.open(label_map, "rt", **(storage_options or {})) as f:
            return _check(_parse(f.read(), label_map), id2label, label_map)
    local = model_dir / LABEL_MAP_FILE
    if local.is_file():
        return _check(_parse(local.read_text(), str(local)), id2label, str(local))
    coco = {c.name: c for c in _parse(COCO_PANOPTIC_MAP.read_text(), "built-in COCO panoptic map")}
    if all(name in coco for name in id2label.values()):
        return tuple(
            Category(i, coco[name].id, name, coco[name].isthing, coco[name].color, coco[name].supercategory)
            for i, name in sorted(id2label.items())
        )
    log.warning("no label map for this checkpoint: treating all %d classes as things (pass --label-map)", len(id2label))
    return tuple(_fallback(id2label))
