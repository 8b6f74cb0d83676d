from pipeline.labels import Category
from pipeline.pending import PendingConfig, pending_blocks
from pipeline.shards import ShardOutput, write_shard
from pipeline.storage import OutputStore
from tests.unit.test_shards_coco import _batch


def _keys(blocks):
    return [k for b in blocks for k in b["key"].to_pylist()]


def test_pending_streams_uncommitted_keys_with_previews(tmp_path, image_dir):
    store = OutputStore(str(tmp_path / "out"))
    categories = (Category(0, 1, "sky", False, (0, 0, 255), ""), Category(1, 7, "disc", True, (255, 0, 0), ""))
    all_keys = _keys(pending_blocks(PendingConfig(str(image_dir), store)))
    assert len(all_keys) == 6
    write_shard(_batch(all_keys[:2]), ShardOutput(store, categories, "r", "m"))
    blocks = list(pending_blocks(PendingConfig(str(image_dir), store, previews=3)))
    assert _keys(blocks) == all_keys[2:]
    assert [p for b in blocks for p in b["preview"].to_pylist()] == [True, True, True, False]
    assert _keys(pending_blocks(PendingConfig(str(image_dir), store, limit=3))) == all_keys[2:3]


def test_a_read_task_run_again_streams_the_same_keys_though_shards_committed_meanwhile(tmp_path, image_dir):
    """Ray reruns the read task when its worker dies and drops the blocks the first attempt
    delivered: a stream shortened by this run's own commits would skip images. Also when this
    run's shard overwrites an earlier one of the same keys: --retry-failed redoing a shard whose
    images all failed, whose commit record stays under the same name."""
    from pipeline.shards import forget_failures

    store = OutputStore(str(tmp_path / "out"))
    categories = (Category(0, 1, "sky", False, (0, 0, 255), ""), Category(1, 7, "disc", True, (255, 0, 0), ""))
    keys = _keys(pending_blocks(PendingConfig(str(image_dir), store)))
    write_shard(_batch(keys[:1]), ShardOutput(store, categories, "old", "m"))
    write_shard(_batch(keys[1:3], errors=set(keys[1:3])), ShardOutput(store, categories, "old", "m"))
    assert forget_failures(store) == 2
    config = PendingConfig(str(image_dir), store, run_id="this-run")
    first_attempt = _keys(pending_blocks(config))
    assert first_attempt == keys[1:]
    write_shard(_batch(keys[1:3]), ShardOutput(store, categories, "this-run", "m"))  # the failed shard, redone
    write_shard(_batch(keys[3:5]), ShardOutput(store, categories, "this-run", "m"))
    assert _keys(pending_blocks(config)) == first_attempt
    assert _keys(pending_blocks(PendingConfig(str(image_dir), store))) == keys[5:]  # a new run skips them
