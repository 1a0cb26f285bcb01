"""Baselines on padded batches: the masked losses equal the unmasked ones on the real rows only, and the
trainer's BaselineModel runs each method."""
from __future__ import annotations

import pytest
import torch

from training.baselines import BaselineModel, SimSiamPredictor, nt_xent_loss, simsiam_loss
from training.courier import ImageEncoder


def _views(n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_masked_nt_xent_equals_nt_xent_on_the_real_rows():
    z1, z2 = _views()
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    real = mask.bool()
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.2, mask=mask), nt_xent_loss(z1[real], z2[real], 0.2))
    assert nt_xent_loss(z1, z2, 0.2, mask=torch.zeros(7)).item() == 0.0


@pytest.mark.parametrize("training", [False, True])
def test_masked_simsiam_equals_simsiam_on_the_real_rows(training):
    """In train mode the predictor's BatchNorm takes the batch's statistics: padded (zero) rows must not
    be among them, or the real rows' loss would move with the batch's share of padding."""
    import copy

    z1, z2 = _views(d=16)
    torch.manual_seed(0)
    pred = SimSiamPredictor(16).double().train(training)
    alone = copy.deepcopy(pred)
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    real = mask.bool()
    z1[~real], z2[~real] = 0, 0  # what encode_real gives padded slots
    torch.testing.assert_close(simsiam_loss(z1, z2, pred, mask=mask), simsiam_loss(z1[real], z2[real], alone))
    bn, bn_alone = pred.net[1], alone.net[1]  # and the running statistics are the real rows' alone
    torch.testing.assert_close(bn.running_mean, bn_alone.running_mean)
    torch.testing.assert_close(bn.running_var, bn_alone.running_var)


def test_simsiam_takes_a_batch_with_one_real_image():
    """A rank's last batch can hold a single real image: BatchNorm has no batch statistics of one row, so
    that row goes through the running ones (and leaves them) instead of failing the step."""
    z1, z2 = _views(d=16)
    pred = SimSiamPredictor(16).double().train()
    before = pred.net[1].running_mean.clone()
    loss = simsiam_loss(z1, z2, pred, mask=torch.tensor([0, 0, 1, 0, 0, 0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and pred.training and pred.net[1].training
    torch.testing.assert_close(pred.net[1].running_mean, before)
    assert pred.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["simclr", "simsiam", "supervised"])
def test_baseline_model_trains_on_a_courier_batch(method):
    torch.manual_seed(0)
    B, lp, lc, px = 3, 5, 5, 16
    model = BaselineModel(ImageEncoder("tiny_cnn", dim=32), method, num_classes=4)
    pv_mask = torch.ones(B, lp, dtype=torch.long)
    pv_mask[:, 3:] = 0
    args = (torch.randint(0, 255, (B, lp, 3, px, px), dtype=torch.uint8), torch.zeros(B, lp, dtype=torch.long),
            pv_mask, torch.randint(0, 255, (B, lc, 3, px, px), dtype=torch.uint8), torch.ones(B, lc, dtype=torch.long))
    extra = {"categories": torch.tensor([[0] * lp, [1] * lp, [3] * lp])} if method == "supervised" else {}
    loss, parts = model(*args, **extra)
    assert torch.isfinite(loss) and parts["loss"] == loss.detach()
    loss.backward()
    assert model.encoder.embed.weight.grad.abs().sum() > 0
    if method == "supervised":
        with pytest.raises(ValueError, match="categories"):
            model(*args)


@pytest.mark.parametrize("method", ["simclr", "supervised"])
def test_padded_slots_stay_out_of_the_backbone_s_batchnorm_statistics(method):
    """Stage 3 embeds with the running statistics: blank padding images must not be averaged into them."""
    import copy

    torch.manual_seed(0)
    B, lp, lc, px = 2, 4, 3, 16
    model = BaselineModel(ImageEncoder("tiny_cnn", dim=32), method, num_classes=4)
    reference = copy.deepcopy(model.encoder)
    pv_images = torch.randint(0, 255, (B, lp, 3, px, px), dtype=torch.uint8)
    click_images = torch.randint(0, 255, (B, lc, 3, px, px), dtype=torch.uint8)
    pv_mask, click_mask = torch.ones(B, lp, dtype=torch.long), torch.ones(B, lc, dtype=torch.long)
    pv_mask[:, 2:], click_mask[1:] = 0, 0
    pv_images[~pv_mask.bool()], click_images[~click_mask.bool()] = 0, 0  # as the trainer pads
    extra = {"categories": torch.tensor([[0] * lp, [3] * lp])} if method == "supervised" else {}
    torch.manual_seed(1)
    model(pv_images, torch.zeros(B, lp, dtype=torch.long), pv_mask, click_images, click_mask, **extra)
    # The same forward on the real images alone (the same augmentation draws for SimCLR: one per image).
    if method == "supervised":
        reference.encode(pv_images[pv_mask.bool()])
    else:
        from training.baselines import augment

        images = torch.cat([pv_images.flatten(0, 1), click_images.flatten(0, 1)])
        real = torch.cat([pv_mask.reshape(-1), click_mask.reshape(-1)]).bool()
        torch.manual_seed(1)
        v1, v2 = augment(images), augment(images)
        reference.encode(v1[real]), reference.encode(v2[real])
    stats = {k: v for k, v in model.encoder.state_dict().items() if "running" in k}
    assert stats
    for k, v in stats.items():
        torch.testing.assert_close(v, reference.state_dict()[k], msg=k)
