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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.remote import StorageConfig, explained, file_system, request

LABEL_MAP_FILE = "label_map.json"
MAX_CATEGORY_ID = 65535  # semantic PNGs hold category ids in 16 bits at most
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


ENTRY_KEYS = ("label_id", "id", "name", "isthing", "color", "supercategory")
REQUIRED_KEYS = ENTRY_KEYS[:4]  # color and supercategory have defaults
FORM = '{"categories": [{"label_id": 0, "id": 1, "name": "sky", "isthing": 0, "color": [135, 206, 235], ...}, ...]}'


def _category(e: dict) -> Category:
    """One label map entry, strictly: a map that says "isthing": "no" or a 2-number colour would
    otherwise become a thing or a broken COCO category in every output, and one that spells a key
    "colour" would silently get black, the colour of void."""
    if not isinstance(e, dict):
        raise ValueError(f"not a JSON object with the keys {', '.join(ENTRY_KEYS)}: {e!r}")
    missing = [k for k in REQUIRED_KEYS if k not in e]
    if missing:
        raise ValueError(f"no {', '.join(map(json.dumps, missing))} "
                         f"(required keys: {', '.join(REQUIRED_KEYS)}): {e}")
    unknown = [k for k in e if k not in ENTRY_KEYS]
    if unknown:
        raise ValueError(f"{', '.join(map(json.dumps, unknown))}: no such key "
                         f"(the keys are {', '.join(ENTRY_KEYS)}): {e}")
    if not isinstance(e["name"], str) or not isinstance(e.get("supercategory", ""), str):
        raise ValueError(f"name and supercategory must be strings: {e}")
    if e["isthing"] not in (0, 1) or isinstance(e["isthing"], float):  # True and False are 1 and 0
        raise ValueError(f"isthing must be 0, 1, true or false: {e}")
    color = e.get("color", [0, 0, 0])
    if not (isinstance(color, list) and len(color) == 3 and all(type(c) is int and 0 <= c <= 255 for c in color)):
        raise ValueError(f"color must be 3 integers from 0 to 255: {e}")
    if not (type(e["label_id"]) is int and type(e["id"]) is int and 0 < e["id"] <= MAX_CATEGORY_ID):
        raise ValueError(f"label_id must be an integer and id one from 1 to {MAX_CATEGORY_ID}: {e}")
    return Category(e["label_id"], e["id"], e["name"], bool(e["isthing"]), tuple(color), e.get("supercategory", ""))


def _parse(text: str, source: str) -> list[Category]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LabelMapError(f"label map {source} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise LabelMapError(f'label map {source} must be a JSON object with a "categories" list, as {FORM}')
    unknown = [k for k in data if k != "categories"]
    if unknown:  # a misspelt or misplaced key would otherwise be ignored
        raise LabelMapError(f'label map {source} has keys other than "categories", its only one: '
                            f'{", ".join(map(json.dumps, unknown))} (the form is {FORM})')
    categories = []
    for i, entry in enumerate(data["categories"]):
        try:
            categories.append(_category(entry))
        except ValueError as exc:  # categories[i] as jq and Python name it: the first entry is 0
            raise LabelMapError(f"label map {source}, categories[{i}]: {exc}") from exc
    repeated = sorted(i for i, n in Counter(c.label_id for c in categories).items() if n > 1)
    if repeated:
        raise LabelMapError(f"label map {source} has several entries for label ids {repeated[:10]}")
    return categories


def _fallback(id2label: Mapping[int, str]) -> list[Category]:
    def color(i: int) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95)
        return int(r * 255), int(g * 255), int(b * 255)

    repeated = {name for name, n in Counter(id2label.values()).items() if n > 1}  # told apart by label id
    return [Category(i, i + 1, f"{name} ({i})" if name in repeated else name, True, color(i), "")
            for i, name in sorted(id2label.items())]


def _check(categories: list[Category], id2label: Mapping[int, str], source: str) -> tuple[Category, ...]:
    by_label = {c.label_id: c for c in categories}
    missing, extra = sorted(set(id2label) - set(by_label)), sorted(set(by_label) - set(id2label))
    if missing:
        raise LabelMapError(f"label map {source} has no entry for model label ids {missing[:10]}")
    if extra:  # most likely a map made for another model
        raise LabelMapError(f"label map {source} has entries for label ids {extra[:10]} that the model does not have "
                            f"(its label ids: {min(id2label)} to {max(id2label)})")
    renamed = [f"{i}: {id2label[i]!r} -> {by_label[i].name!r}" for i in sorted(id2label)
               if by_label[i].name != id2label[i] and id2label[i] != f"LABEL_{i}"]  # transformers' unnamed classes
    if renamed:
        log.warning("label map %s names %d of the model's classes otherwise (%s%s): is it this model's map?",
                    source, len(renamed), ", ".join(renamed[:3]), ", ..." if len(renamed) > 3 else "")
    return _unique([by_label[i] for i in sorted(id2label)], f"label map {source}")


def _unique(categories: list[Category], source: str) -> tuple[Category, ...]:
    """The categories, once their ids and names are checked unique: report.json and the previews
    name categories, and the tables' `label` column is the name."""
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids) or min(ids) < 1:
        raise LabelMapError(f"{source}: category ids must be unique and >= 1 (0 is void)")
    repeated = sorted(name for name, n in Counter(c.name for c in categories).items() if n > 1)
    if repeated:
        raise LabelMapError(f"{source}: category names must be unique, {repeated[:10]} repeat")
    return tuple(categories)


def load_categories(id2label: Mapping[int, str], model_dir: Path, label_map: str | None = None,
                    storage: StorageConfig = StorageConfig()) -> tuple[Category, ...]:
    """Categories for every model label id, ordered by label id."""
    id2label = {int(k): v for k, v in id2label.items()}
    if label_map is not None:
        fs, path = file_system(label_map, storage)
        try:
            data = request(fs, "cat_file", path)
        except FileNotFoundError as exc:
            raise LabelMapError(f"--label-map {label_map} does not exist") from exc
        except IsADirectoryError as exc:
            raise LabelMapError(f"--label-map {label_map} is a folder, not a file: name the JSON file") from exc
        except Exception as exc:  # named: the input, the model and the output may be in other buckets
            reason = explained(exc)
            if reason is None:
                raise
            raise LabelMapError(f"--label-map {label_map} cannot be read: {reason}") from exc
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise LabelMapError(f"label map {label_map} is not UTF-8 text: {exc}") from exc
        return _check(_parse(text, label_map), id2label, label_map)
    local = model_dir / LABEL_MAP_FILE
    if local.is_file():
        return _check(_parse(local.read_text(), str(local)), id2label, str(local))
    coco = {c.name: c for c in _parse(COCO_PANOPTIC_MAP.read_text(), "built-in COCO panoptic map")}
    if all(name in coco for name in id2label.values()):
        return _unique([Category(i, coco[name].id, name, coco[name].isthing, coco[name].color, coco[name].supercategory)
                        for i, name in sorted(id2label.items())],
                       "the model's class names, as categories of the built-in COCO panoptic map (pass --label-map)")
    log.warning("no label map for this checkpoint: treating all %d classes as things (pass --label-map)", len(id2label))
    return _unique(_fallback(id2label), "the model's class names (pass --label-map)")
