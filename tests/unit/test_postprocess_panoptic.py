"""Parity with transformers' post_process_panoptic_segmentation on the same logits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import MaskFormerImageProcessor

from pipeline.config import PostprocessConfig
from pipeline.postprocess import panoptic_segmentation

REFERENCE = MaskFormerImageProcessor()


def blob_logits(batch: int, queries: int, classes: int, h: int, w: int, seed: int):
    """Confident blob masks on a jittered 4x5 grid (the first 20 queries, or all if fewer), the rest random blobs
    overlapping them, and peaked class scores: many queries survive, many compete for pixels."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    grid = torch.stack(torch.meshgrid(torch.arange(4) / 4 + 0.125, torch.arange(5) / 5 + 0.1, indexing="ij"), -1)
    centers = torch.rand(batch, queries, 2, generator=g)
    on_grid = min(queries, 20)
    centers[:, :on_grid] = grid.reshape(20, 2)[:on_grid] + 0.03 * torch.randn(batch, on_grid, 2, generator=g)
    radius = 0.07 + 0.05 * torch.rand(batch, queries, 1, 1, generator=g)
    dist = ((ys - centers[..., 0, None, None]) ** 2 + (xs - centers[..., 1, None, None]) ** 2).sqrt()
    masks = 40 * (radius - dist) + 0.5 * torch.randn(batch, queries, h, w, generator=g)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    winners = torch.randint(0, classes + 1, (batch, queries), generator=g)
    class_logits.scatter_(2, winners[..., None], 6.0 + 4 * torch.rand(batch, queries, 1, generator=g))
    return class_logits, masks


def reference(class_logits, masks, targets, config):
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=masks.clone())
    return REFERENCE.post_process_panoptic_segmentation(
        outputs, threshold=config.threshold, mask_threshold=config.mask_threshold,
        overlap_mask_area_threshold=config.overlap_mask_area_threshold,
        label_ids_to_fuse=set(config.label_ids_to_fuse), target_sizes=targets)


def assert_same(ours, theirs):
    ref_map = theirs["segmentation"].numpy()
    if not theirs["segments_info"]:
        assert ours.segments == () and not ours.segment_ids.any()
        return
    assert np.array_equal(ours.segment_ids, ref_map.astype(np.int32))
    first = {}
    for info in theirs["segments_info"]:
        first.setdefault(info["id"], info)
    assert [s.id for s in ours.segments] == sorted(first)
    for s in ours.segments:
        assert s.label_id == first[s.id]["label_id"] and s.score == pytest.approx(first[s.id]["score"], abs=1e-6)
        ys, xs = np.nonzero(ref_map == s.id)
        assert s.area == len(ys)
        assert s.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


@pytest.mark.parametrize("targets", [[(61, 83), (40, 40)], [(1, 1), (3, 2000)], [(24, 32), (96, 128)]])
def test_matches_reference(targets):
    class_logits, masks = blob_logits(2, 30, 5, 24, 32, seed=targets[0][0])
    config = PostprocessConfig(threshold=0.5)
    ours = panoptic_segmentation(class_logits, masks, [(24, 32)] * 2, targets, config)
    theirs = reference(class_logits, masks, targets, config)
    if targets[0] != (1, 1):
        assert all(len(r.segments) >= 4 for r in ours)  # the case really exercises segments
        assert len({s.label_id for r in ours for s in r.segments}) >= 3
    for o, t in zip(ours, theirs):
        assert_same(o, t)


def label_map(result) -> np.ndarray:
    lut = np.full(int(result.segment_ids.max()) + 1, -1)
    for s in result.segments:
        lut[s.id] = s.label_id
    return lut[result.segment_ids]


def test_fused_labels_share_one_segment():
    """Fusing renumbers segments and nothing else. (The reference, after a repeat of a fused label,
    resumes numbering from that label's id, so a later segment can reuse an id already taken; we
    number uniquely, so fused runs are compared through the unfused reference's pixels.)"""
    class_logits, masks = blob_logits(2, 30, 5, 24, 32, seed=3)
    fuse = frozenset({0, 1, 2})
    targets = [(48, 64), (30, 90)]
    fused = panoptic_segmentation(class_logits, masks, [(24, 32)] * 2, targets,
                                  PostprocessConfig(label_ids_to_fuse=fuse))
    plain = panoptic_segmentation(class_logits, masks, [(24, 32)] * 2, targets, PostprocessConfig())
    for f, p, t in zip(fused, plain, reference(class_logits, masks, targets, PostprocessConfig())):
        assert_same(p, t)
        fused_labels = [s.label_id for s in f.segments if s.label_id in fuse]
        assert len(fused_labels) == len(set(fused_labels)) >= 2
        assert len(f.segments) < len(p.segments)
        assert np.array_equal(label_map(f), label_map(p))
        assert {(s.label_id, s.area, s.bbox) for s in f.segments if s.label_id not in fuse} == {
            (s.label_id, s.area, s.bbox) for s in p.segments if s.label_id not in fuse}


def test_no_segment_is_all_void():
    class_logits, masks = blob_logits(1, 24, 3, 8, 8, seed=1)
    class_logits[..., -1] = 100.0  # every query says "no object"
    (result,) = panoptic_segmentation(class_logits, masks, [(8, 8)], [(20, 30)], PostprocessConfig())
    assert result.segments == () and result.segment_ids.shape == (20, 30) and not result.segment_ids.any()


def test_padding_is_cropped_before_upsampling():
    class_logits, masks = blob_logits(1, 20, 4, 16, 20, seed=5)
    config = PostprocessConfig()
    alone = panoptic_segmentation(class_logits, masks, [(16, 20)], [(64, 80)], config)[0]
    padded = torch.full((1, 20, 24, 32), -30.0)
    padded[:, :, :16, :20] = masks
    batched = panoptic_segmentation(class_logits, padded, [(16, 20)], [(64, 80)], config)[0]
    assert len(alone.segments) >= 3
    assert np.array_equal(alone.segment_ids, batched.segment_ids) and alone.segments == batched.segments


def tiling_logits(batch: int, queries: int, classes: int, h: int, w: int, seed: int):
    """Sharp noiseless blobs, as a trained model gives: 20 on a jittered grid large enough to tile
    the image, the other queries smaller blobs on top of them; peaked class scores."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    grid = torch.stack(torch.meshgrid(torch.arange(4) / 4 + 0.125, torch.arange(5) / 5 + 0.1, indexing="ij"), -1)
    centers = torch.rand(batch, queries, 2, generator=g)
    centers[:, :20] = grid.reshape(20, 2) + 0.03 * torch.randn(batch, 20, 2, generator=g)
    radius = 0.03 + 0.05 * torch.rand(batch, queries, 1, 1, generator=g)
    radius[:, :20] += 0.08
    dist = ((ys - centers[..., 0, None, None]) ** 2 + (xs - centers[..., 1, None, None]) ** 2).sqrt()
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    winners = torch.randint(0, classes, (batch, queries), generator=g)
    class_logits.scatter_(2, winners[..., None], 6.0 + 4 * torch.rand(batch, queries, 1, generator=g))
    return class_logits, 80 * (radius - dist)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharp_masks_settle_cell_by_cell(monkeypatch, seed):
    """Sharp masks (as a trained model gives) take the cell path, never the full upsampling, and
    still match the reference. The small blobs on top of the tiling ones leave many queries whose
    won share of their own mask is near 0.8, so their threshold counts are taken pixel by pixel."""
    import pipeline.postprocess as postprocess

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to upsampling every mask")

    monkeypatch.setattr(postprocess, "_upsampled_areas", no_fallback)
    class_logits, masks = tiling_logits(2, 40, 8, 50, 67, seed=seed)
    targets = [(120, 160), (203, 97)]
    config = PostprocessConfig(threshold=0.5)
    ours = panoptic_segmentation(class_logits, masks, [(50, 67)] * 2, targets, config)
    assert all(len(r.segments) >= 10 for r in ours)
    assert len({s.label_id for r in ours for s in r.segments}) >= 5
    for o, t in zip(ours, reference(class_logits, masks, targets, config)):
        assert_same(o, t)


def test_one_query_owns_every_cell():
    """No undecided cell at all (a single kept query): one segment covering the image, as the reference."""
    class_logits = torch.full((1, 5, 4), -10.0)
    class_logits[0, 0, 1] = 10.0  # only query 0 is kept, label 1
    masks = torch.randn(1, 5, 8, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    (ours,) = panoptic_segmentation(class_logits, masks, [(8, 8)], [(20, 30)], PostprocessConfig())
    (theirs,) = reference(class_logits, masks, [(20, 30)], PostprocessConfig())
    assert [(s.label_id, s.area, s.bbox) for s in ours.segments] == [(1, 600, (0, 0, 30, 20))]
    assert_same(ours, theirs)


def test_a_query_winning_exactly_the_overlap_share_is_kept_as_the_reference_keeps_it():
    """4 of its 5 thresholded pixels: 4/5 in float32 is 0.800000012, which the reference compares
    with 0.8 as a Python float (kept); compared in float32 the two are equal (dropped)."""
    class_logits = torch.tensor([[[5.0, -5.0, -5.0], [-5.0, 10.0, -5.0]]])  # (1, 2 queries, 2 classes + none)
    masks = torch.tensor([[[[5.0, 5, 5, 5, 5]], [[-10.0, -10, -10, -10, 10]]]])  # (1, 2, 1, 5)
    config = PostprocessConfig()
    ours = panoptic_segmentation(class_logits, masks, [(1, 5)], [(1, 5)], config)
    theirs = reference(class_logits, masks, [(1, 5)], config)
    assert [s.label_id for s in ours[0].segments] == [0, 1]
    assert_same(ours[0], theirs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs where the logits lie: needs a GPU")
def test_on_a_gpu_the_segments_are_the_cpus():
    """Every operation has a CUDA kernel (int64 matrix-vector products, say, have none), and
    CUDA's arithmetic moves no more than near-tied pixels."""
    class_logits, masks = blob_logits(2, 30, 5, 24, 32, seed=61)
    config, targets = PostprocessConfig(threshold=0.5), [(61, 83), (480, 640)]
    cpu = panoptic_segmentation(class_logits, masks, [(24, 32)] * 2, targets, config)
    gpu = panoptic_segmentation(class_logits.cuda(), masks.cuda(), [(24, 32)] * 2, targets, config)
    for c, g in zip(cpu, gpu):
        assert len(c.segments) >= 4 and [s.label_id for s in g.segments] == [s.label_id for s in c.segments]
        assert np.mean(g.segment_ids == c.segment_ids) > 0.999
