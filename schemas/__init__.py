"""Published output schemas: the writers build their tables from these, tests read them too."""

import json
from importlib import resources

COCO_SCHEMAS = ("panoptic", "instances")


def coco_schema(name: str) -> dict:
    """The JSON Schema (draft 2020-12) of `coco/<name>.json`: name is "panoptic" or "instances"."""
    if name not in COCO_SCHEMAS:
        raise ValueError(f"no COCO schema {name!r}: one of {', '.join(COCO_SCHEMAS)}")
    return json.loads(resources.files(__name__).joinpath(f"coco_{name}.schema.json").read_text())
