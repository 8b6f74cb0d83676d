import numpy as np

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
