"""The whole pipeline, measured: a bug in decoding, resizing, normalisation, padding,
post-processing or encoding drops panoptic quality below the floor."""

from __future__ import annotations

from bench.quality import measure

# Measured on this very set (24 held-out scenes, seed 5): PQ 0.476, things 0.144, stuff 0.974
# (100 scenes: see BENCHMARKS.md). The floors sit a little under: a decoding, resizing,
# normalisation, padding, post-processing or encoding bug costs far more than that.
PQ_FLOOR = 0.44
THINGS_FLOOR = 0.10
STUFF_FLOOR = 0.93


def test_pipeline_quality_on_held_out_scenes(ray_runtime, tmp_path):
    result = measure(count=24, seed=5, work=tmp_path)
    assert result["all"].categories == 5
    assert result["all"].pq >= PQ_FLOOR
    assert result["things"].pq >= THINGS_FLOOR
    assert result["stuff"].pq >= STUFF_FLOOR
