import pytest

from pipeline.state import SettingsMismatch, check_settings
from pipeline.storage import DamagedOutput, OutputStore

SETTINGS = {"model": "facebook/maskformer-swin-base-coco", "model_digest": "abc", "dtype": "auto",
            "postprocess": {"threshold": 0.8, "tasks": ["panoptic"]}}


def test_a_mismatch_names_each_setting_and_both_values(tmp_path):
    store = OutputStore(str(tmp_path))
    check_settings(store, SETTINGS, committed=False)
    changed = SETTINGS | {"postprocess": {"threshold": 0.8, "tasks": ["panoptic", "semantic"]}, "dtype": "float16"}
    with pytest.raises(SettingsMismatch) as info:
        check_settings(store, changed, committed=True)
    assert 'dtype: "auto" -> "float16"' in str(info.value)
    assert 'postprocess.tasks: ["panoptic"] -> ["panoptic", "semantic"]' in str(info.value)
    assert "threshold" not in str(info.value)


def test_the_same_weights_under_another_name_are_the_same_model(tmp_path):
    store = OutputStore(str(tmp_path))
    check_settings(store, SETTINGS, committed=False)
    check_settings(store, SETTINGS | {"model": "/models/maskformer-swin-base-coco"}, committed=True)
    with pytest.raises(SettingsMismatch, match="model_digest"):
        check_settings(store, SETTINGS | {"model": "/models/other", "model_digest": "def"}, committed=True)


def test_a_setting_an_older_output_did_not_record_is_not_compared(tmp_path):
    """Outputs made before the processor's settings were recorded go on; those made after compare them."""
    store = OutputStore(str(tmp_path))
    check_settings(store, SETTINGS, committed=False)
    processor = {"size": {"shortest_edge": 800}, "image_mean": [0.485, 0.456, 0.406]}
    check_settings(store, SETTINGS | {"processor": processor}, committed=True)
    newer = OutputStore(str(tmp_path / "newer"))
    check_settings(newer, SETTINGS | {"processor": processor}, committed=False)
    with pytest.raises(SettingsMismatch, match="processor.size.shortest_edge: 800 -> 640"):
        check_settings(newer, SETTINGS | {"processor": processor | {"size": {"shortest_edge": 640}}}, committed=True)


def test_damaged_settings_are_named_with_what_to_do(tmp_path):
    store = OutputStore(str(tmp_path))
    check_settings(store, SETTINGS, committed=False)
    for damaged in ('{"model": "faceb', "[]"):
        (tmp_path / "_state/settings.json").write_text(damaged)
        with pytest.raises(DamagedOutput, match="settings.json cannot be read .*--overwrite .*delete the file"):
            check_settings(store, SETTINGS, committed=True)


def test_settings_of_a_run_that_committed_nothing_do_not_bind(tmp_path):
    """A first run stopped before its first shard (Ctrl-C, a bad checkpoint) leaves no results to mix with."""
    store = OutputStore(str(tmp_path))
    check_settings(store, SETTINGS, committed=False)
    check_settings(store, SETTINGS | {"dtype": "float32"}, committed=False)
    with pytest.raises(SettingsMismatch, match="float32"):
        check_settings(store, SETTINGS, committed=True)


def test_a_clear_cut_off_never_leaves_a_commit_record_without_its_pngs(tmp_path, monkeypatch):
    """--overwrite interrupted after its first deletion: no shard is still "done" without its PNGs."""
    from pipeline.shards import committed_parts
    from pipeline.state import clear_outputs

    store = OutputStore(str(tmp_path))
    store.write_bytes("panoptic/a.jpg.png", b"png")
    store.write_bytes("tables/images/part.parquet", b"commit record")
    store.write_bytes("_state/settings.json", b"{}")
    delete_tree = OutputStore.delete_tree

    def delete_once_then_interrupt(self, relative_dir):
        monkeypatch.setattr(OutputStore, "delete_tree", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        delete_tree(self, relative_dir)

    monkeypatch.setattr(OutputStore, "delete_tree", delete_once_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        clear_outputs(store)
    assert committed_parts(store) == [] and store.exists("panoptic/a.jpg.png")


@pytest.mark.parametrize("state", [None, "_state/settings.json", "_state/lease.json", "_state/coco.json",
                                   "_state/runs/r1.json"])
def test_an_output_is_one_a_run_made_whatever_of_its_state_is_left(tmp_path, state):
    """A run killed outright leaves its lease and no record; a damaged settings.json may have been
    deleted as advised: still the pipeline's output. Without any of _state/ it is refused."""
    from pipeline.state import NotAnOutput, check_is_output

    store = OutputStore(str(tmp_path))
    store.write_bytes("tables/errors/mine.parquet", b"a user's own file")
    if state is None:
        with pytest.raises(NotAnOutput, match=r"holds tables but is not an output of this pipeline \(it has no _state/\)"):
            check_is_output(store)
    else:
        store.write_bytes(state, b"{}")
        check_is_output(store)
    check_is_output(OutputStore(str(tmp_path / "new")))  # nothing there yet
