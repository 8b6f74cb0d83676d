"""The published JSON Schemas of coco/panoptic.json and coco/instances.json hold for real outputs
(--tasks panoptic,semantic,instance), and reject a doctored copy."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from jsonschema import Draft202012Validator

from pipeline.config import PostprocessConfig
from pipeline.model import BUNDLED_DIR
from pipeline.run import RunConfig, run
from schemas import COCO_SCHEMAS, coco_schema

SAMPLES = BUNDLED_DIR.parent / "samples"  # scenes the bundled model knows: segments and instances for sure


@pytest.fixture(scope="module")
def coco_files(ray_runtime, tmp_path_factory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("schemas")
    run(RunConfig(input=str(SAMPLES), output=str(output), limit=3,
                  postprocess=PostprocessConfig(tasks=("panoptic", "semantic", "instance"))))
    files = {name: json.loads((output / "coco" / f"{name}.json").read_text()) for name in COCO_SCHEMAS}
    _assert_not_empty(files)  # an empty file would match its schema without proving anything
    return files


def _assert_not_empty(files: dict[str, dict]) -> None:
    panoptic, instances = files["panoptic"], files["instances"]
    assert len(panoptic["images"]) == len(panoptic["annotations"]) == 3
    assert all(a["segments_info"] for a in panoptic["annotations"])
    assert panoptic["categories"] and instances["categories"]
    assert instances["images"] == panoptic["images"]
    assert instances["annotations"]


@pytest.mark.parametrize("name", COCO_SCHEMAS)
def test_schemas_are_valid_draft_2020_12(name):
    Draft202012Validator.check_schema(coco_schema(name))


@pytest.mark.parametrize("name", COCO_SCHEMAS)
def test_outputs_match_their_schema(coco_files, name):
    jsonschema.validate(coco_files[name], coco_schema(name), cls=Draft202012Validator)


def _bad_bbox(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    annotation = doctored["annotations"][0]
    target = annotation["segments_info"][0] if name == "panoptic" else annotation
    target["bbox"] = target["bbox"][:3]
    return doctored


def _extra_field(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    doctored["images"][0]["license"] = 1
    return doctored


def _thing_flag_as_bool(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    doctored["categories"][0]["isthing"] = True
    return doctored


def _short_color(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    doctored["categories"][0]["color"] = [255, 0]
    return doctored


def _color_out_of_range(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    doctored["categories"][0]["color"] = [256, 0, 0]
    return doctored


def _category_id_beyond_16_bits(document: dict, name: str) -> dict:
    doctored = copy.deepcopy(document)
    doctored["categories"][0]["id"] = 65536
    return doctored


@pytest.mark.parametrize("doctor", [_bad_bbox, _extra_field, _thing_flag_as_bool, _short_color, _color_out_of_range,
                                    _category_id_beyond_16_bits])
@pytest.mark.parametrize("name", COCO_SCHEMAS)
def test_schemas_reject_doctored_outputs(coco_files, name, doctor):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doctor(coco_files[name], name), coco_schema(name), cls=Draft202012Validator)
