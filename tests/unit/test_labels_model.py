import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from pipeline.labels import LabelMapError, load_categories
from pipeline.model import BUNDLED_DIR, ModelError, ModelSource, load_model, local_dir, model_labels


def test_checkpoint_label_map_is_used(untrained_model):
    from transformers import AutoConfig

    labels = model_labels(untrained_model)  # config.json read as JSON: as transformers reads it
    assert labels == AutoConfig.from_pretrained(untrained_model).id2label
    categories = load_categories(labels, untrained_model)
    assert [c.name for c in categories] == ["sky", "ground", "disc", "box", "wedge"]
    assert [c.isthing for c in categories] == [False, False, True, True, True]
    assert [c.id for c in categories] == [1, 2, 3, 4, 5]


def test_builtin_coco_map_by_name(tmp_path):
    categories = load_categories({0: "person", 1: "sky-other-merged"}, tmp_path)
    assert [(c.id, c.isthing) for c in categories] == [(1, True), (187, False)]


def test_unknown_names_fall_back_to_things(tmp_path):
    categories = load_categories({0: "cell", 1: "nucleus"}, tmp_path)
    assert [(c.id, c.isthing) for c in categories] == [(1, True), (2, True)]


def test_category_names_are_unique(tmp_path):
    """report.json counts segments and pixels by category name."""
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"categories": [GOOD_ENTRY, GOOD_ENTRY | {"label_id": 1, "id": 8}]}))
    with pytest.raises(LabelMapError, match=r"category names must be unique, \['a'\] repeat"):
        load_categories({0: "a", 1: "b"}, tmp_path, str(path))
    categories = load_categories({0: "cell", 1: "cell", 2: "nucleus"}, tmp_path)  # no label map
    assert [c.name for c in categories] == ["cell (0)", "cell (1)", "nucleus"]
    with pytest.raises(LabelMapError, match=r"class names \(pass --label-map\): category names must be unique"):
        load_categories({0: "cell", 1: "cell", 2: "cell (1)"}, tmp_path)
    with pytest.raises(LabelMapError, match="built-in COCO panoptic map .*category ids must be unique"):
        load_categories({0: "person", 1: "person"}, tmp_path)


def test_a_missing_label_map_names_the_flag(tmp_path):
    with pytest.raises(LabelMapError, match=f"--label-map {tmp_path}/nope.json does not exist"):
        load_categories({0: "a"}, tmp_path, str(tmp_path / "nope.json"))


def test_user_label_map_must_cover_every_label_and_no_other(tmp_path, caplog):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"categories": [{"label_id": 0, "id": 7, "name": "a", "isthing": 1}]}))
    with pytest.raises(LabelMapError, match=r"no entry for model label ids \[1\]"):
        load_categories({0: "a", 1: "b"}, tmp_path, str(path))
    # another model's map (the COCO one beside a 5-class model) names the classes wrongly
    coco = str(BUNDLED_DIR.parent / "coco_panoptic_label_map.json")
    with pytest.raises(LabelMapError, match=r"entries for label ids \[5, 6, .*\] that the model does not have "
                                            r"\(its label ids: 0 to 4\)"):
        load_categories(model_labels(BUNDLED_DIR), BUNDLED_DIR, coco)
    # names that differ from the model's are allowed (a map may rename classes), and warned about
    (category,) = load_categories({0: "b"}, tmp_path, str(path))
    assert category.name == "a" and "names 1 of the model's classes otherwise (0: 'b' -> 'a')" in caplog.text
    caplog.clear()
    load_categories({0: "LABEL_0"}, tmp_path, str(path))  # transformers' name for an unnamed class
    assert not caplog.text


GOOD_ENTRY = {"label_id": 0, "id": 7, "name": "a", "isthing": 1, "color": [1, 2, 3], "supercategory": "s"}


@pytest.mark.parametrize("change, error", [
    ({"isthing": "no"}, "isthing must be"), ({"isthing": 0.5}, "isthing must be"),
    ({"color": [1, 2]}, "color must be"), ({"color": [300, -5, 0]}, "color must be"),
    ({"color": [1.5, 2, 3]}, "color must be"), ({"name": None}, "name and supercategory must be strings"),
    ({"id": 70000}, "id one from 1 to 65535"), ({"label_id": "0"}, "label_id must be an integer"),
])
def test_label_map_entries_are_checked_strictly(tmp_path, change, error):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"categories": [GOOD_ENTRY | change]}))
    with pytest.raises(LabelMapError, match=error):
        load_categories({0: "a"}, tmp_path, str(path))


NO_COLOR = {k: v for k, v in GOOD_ENTRY.items() if k != "color"}


@pytest.mark.parametrize("content, error", [
    # the British spelling would otherwise load as black, the colour of void
    ({"categories": [NO_COLOR | {"colour": [1, 2, 3]}]},
     'categories[0]: "colour": no such key (the keys are label_id, id, name, isthing, color, supercategory)'),
    ({"categories": [GOOD_ENTRY | {"extra": 1}]}, 'categories[0]: "extra": no such key (the keys are '),
    ({"categories": [GOOD_ENTRY], "info": {}},
     'has keys other than "categories", its only one: "info" (the form is {"categories": [{"label_id": 0, '),
    ([GOOD_ENTRY], 'must be a JSON object with a "categories" list, as {"categories": [{"label_id": 0, '),
    ({"category": [GOOD_ENTRY]}, 'must be a JSON object with a "categories" list'),
    ({"categories": GOOD_ENTRY}, 'must be a JSON object with a "categories" list'),
    ({"categories": [GOOD_ENTRY, {k: v for k, v in GOOD_ENTRY.items() if k != "name"} | {"label_id": 1}]},
     'categories[1]: no "name" (required keys: label_id, id, name, isthing): {'),
    ({"categories": [GOOD_ENTRY, 1]}, "categories[1]: not a JSON object with the keys label_id, id, name, isthing, "
                                      "color, supercategory: 1"),
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
])
def test_label_maps_not_in_the_documented_form_are_refused_saying_what_is_wrong(tmp_path, content, error):
    path = tmp_path / "map.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LabelMapError) as refused:
        load_categories({0: "a", 1: "b"}, tmp_path, str(path))
    assert str(refused.value).startswith(f"label map {path}")
    assert error in str(refused.value)


def test_a_folder_given_as_label_map_is_refused(tmp_path):
    with pytest.raises(LabelMapError) as refused:
        load_categories({0: "a"}, tmp_path, str(tmp_path))
    assert str(refused.value) == f"--label-map {tmp_path} is a folder, not a file: name the JSON file"


def test_label_map_repeats_and_non_utf8_text_are_refused_and_a_good_map_is_read(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"categories": [GOOD_ENTRY, GOOD_ENTRY | {"id": 8, "name": "b"}]}))
    with pytest.raises(LabelMapError, match=r"several entries for label ids \[0\]"):
        load_categories({0: "a"}, tmp_path, str(path))
    path.write_bytes(b'{"categories": [{"name": "caf\xe9"}]}')
    with pytest.raises(LabelMapError, match="not UTF-8"):
        load_categories({0: "a"}, tmp_path, str(path))
    path.write_text(json.dumps({"categories": [GOOD_ENTRY | {"isthing": False}]}))
    (category,) = load_categories({0: "a"}, tmp_path, str(path))
    assert (category.id, category.isthing, category.color, category.supercategory) == (7, False, (1, 2, 3), "s")


@pytest.mark.parametrize("config, error", [({"model_type": "bert", "id2label": {"0": "a"}}, "'bert' is not supported"),
                                           ({"model_type": "maskformer"}, "KeyError"),
                                           ("{not json", "JSONDecodeError"), ([1, 2], "TypeError"),
                                           ({"model_type": "maskformer", "id2label": {"1": "a", "2": "b"}},
                                            r"label ids must be 0 to 1, one per class the model predicts; they are \[1, 2\]")])
def test_unusable_model_configs_are_clear_errors(tmp_path, config, error):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ModelError, match=error):
        model_labels(tmp_path)


def test_local_mask2former_and_maskformer_load(untrained_model, tmp_path):
    from pipeline.tiny_model import build

    assert type(load_model(local_dir(ModelSource(str(untrained_model))), "cpu")).__name__ == (
        "MaskFormerForInstanceSegmentation")
    m2f = build(tmp_path / "m2f", mask2former=True)
    assert type(load_model(local_dir(ModelSource(str(m2f))), "cpu")).__name__ == (
        "Mask2FormerForUniversalSegmentation")


def test_pickle_only_checkpoint_is_refused(untrained_model, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((untrained_model / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="only pickle"):
        local_dir(ModelSource(str(directory)))


def test_missing_and_unknown_models_are_clear_errors(tmp_path):
    for missing in (str(tmp_path / "missing"), f"file://{tmp_path}/missing"):
        assert ModelSource(missing).is_local_path  # not fetched: the job does not say it is fetching it
        with pytest.raises(ModelError, match=f"model directory {missing} does not exist"):
            local_dir(ModelSource(missing))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="weights.safetensors' is a file, not a checkpoint directory"):
        local_dir(ModelSource(str(tmp_path / "weights.safetensors")))
    assert not ModelSource("no-such-org/no-such-model-xyz").is_local_path
    with pytest.raises(ModelError, match="from the Hugging Face hub .*, and no local directory has that name"):
        local_dir(ModelSource("no-such-org/no-such-model-xyz"))


def test_truncated_weights_are_a_clear_error_before_the_run(untrained_model, tmp_path):
    directory = tmp_path / "truncated"
    directory.mkdir()
    (directory / "config.json").write_text((untrained_model / "config.json").read_text())
    (weights,) = untrained_model.glob("*.safetensors")
    (directory / weights.name).write_bytes(weights.read_bytes()[:100_000])  # a copy cut short
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        local_dir(ModelSource(str(directory)))


def test_a_checkpoint_the_actors_could_not_load_is_a_model_error(untrained_model, tmp_path):
    from pipeline.model import BUNDLED_DIR, load_model_and_processor

    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(BUNDLED_DIR / name, no_processor / name)
    with pytest.raises(ModelError, match="has no preprocessor_config.json"):
        local_dir(ModelSource(str(no_processor)))

    mismatched = tmp_path / "mismatched"  # another architecture's config beside the bundled weights
    shutil.copytree(untrained_model, mismatched)
    shutil.copy(BUNDLED_DIR / "model.safetensors", mismatched / "model.safetensors")
    with pytest.raises(ModelError, match=r"cannot be loaded: its weights do not fit its config: \d+ tensors differ"):
        load_model_and_processor(local_dir(ModelSource(str(mismatched))), "cpu")

    headless = tmp_path / "headless"  # transformers would fill the class head with random values
    shutil.copytree(BUNDLED_DIR, headless)
    tensors = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("class_predictor.")},
              headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"its weights do not fit its config: 2 of the model's tensors are missing "
                                         r"\(they would be random\), e.g. class_predictor.bias, class_predictor.weight$"):
        load_model_and_processor(local_dir(ModelSource(str(headless))), "cpu")
