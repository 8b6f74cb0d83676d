"""The training script runs and learns; CI never trains the real checkpoint."""

import torch

from pipeline.scenes import scene
from pipeline.train_tiny import IMAGE_SIZE, batch_inputs, build_model, save_checkpoint, training_loss
from transformers import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor


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
