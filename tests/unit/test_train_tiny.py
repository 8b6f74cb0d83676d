"""The training script runs and learns; CI never trains the real checkpoint."""

import json
import sys

import pytest
import torch

from pipeline.scenes import scene
from pipeline.train_tiny import IMAGE_SIZE, batch_inputs, build_model, main, save_checkpoint, training_loss
from transformers import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor


@pytest.fixture(autouse=True)
def one_thread():
    """A model this small gains nothing from a second thread, and on a busy CPU two spinning
    threads made these steps ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_few_steps_lower_the_loss_and_save_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(seed=0).train()
    processor = MaskFormerImageProcessor(size=IMAGE_SIZE)
    inputs = batch_inputs(processor, [scene(0, i) for i in range(2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(15):  # the same small batch: the loss must fall
        loss = training_loss(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    save_checkpoint(model, processor, tmp_path / "ckpt", [{"step": 15}])
    loaded = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path / "ckpt", use_safetensors=True)
    assert loaded.config.use_auxiliary_loss is False
    assert (tmp_path / "ckpt" / "label_map.json").is_file()


def test_the_script_trains_evaluates_and_writes_the_checkpoint_dir(tmp_path, monkeypatch):
    out = tmp_path / "model"
    argv = ["train_tiny", str(out), "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-count", "2",
            "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [2]
    assert {"loss", "pq", "pq_things", "pq_stuff", "minutes"} <= set(log[0])
    categories = json.loads((out / "label_map.json").read_text())["categories"]
    config = MaskFormerForInstanceSegmentation.from_pretrained(out, use_safetensors=True).config
    assert {c["label_id"]: c["name"] for c in categories} == config.id2label
    assert MaskFormerImageProcessor.from_pretrained(out).size == IMAGE_SIZE
    assert not list(tmp_path.glob(".staging-*"))  # the staging dir was renamed into place
