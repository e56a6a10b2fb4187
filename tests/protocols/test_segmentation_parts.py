import numpy as np
import torch
import torch.nn.functional as F

from vlpbench.protocols.segmentation import balance_negatives, mixed_loss, random_affine, resize_mask


def test_mixed_loss_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.7).float()
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    focal = ((1 - p_t) ** 2 * -torch.log(p_t)).mean()
    soft_dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    expected = 10 * focal - torch.log(soft_dice)
    assert torch.allclose(mixed_loss(logits, target, 10.0, 2.0), expected, atol=1e-6)


def test_mixed_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([[[[80.0, -80.0]]]])
    target = torch.tensor([[[[0.0, 1.0]]]])
    assert torch.isfinite(mixed_loss(logits, target, 10.0, 2.0))


def test_balance_negatives_keeps_every_positive_and_as_many_negatives():
    ids = [f"img{i}" for i in range(20)]
    labels = {i: int(n % 5 == 0) for n, i in enumerate(ids)}  # 4 positives
    kept = balance_negatives(ids, labels.__getitem__, np.random.default_rng(0))
    assert sum(labels[i] for i in kept) == 4 and len(kept) == 8
    assert kept == [i for i in ids if i in kept]  # split order is kept
    assert kept == balance_negatives(ids, labels.__getitem__, np.random.default_rng(0))


def test_random_affine_is_identity_when_not_applied_and_bounded_otherwise():
    gen = torch.Generator().manual_seed(0)
    identity = random_affine(4, 0.1, 10.0, 0.0, gen)
    assert torch.equal(identity, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3))
    theta = random_affine(1000, 0.1, 10.0, 1.0, gen)
    scale = 1 / torch.linalg.det(theta[:, :, :2]).sqrt()
    assert scale.min() >= 0.9 - 1e-5 and scale.max() <= 1.1 + 1e-5
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0])).abs()
    assert angle.max() <= 10.0 + 1e-4 and angle.max() > 9.0
    x = torch.rand(1, 1, 16, 16)
    grid = F.affine_grid(identity[:1], [1, 1, 16, 16], align_corners=False)
    assert torch.allclose(F.grid_sample(x, grid, align_corners=False), x, atol=1e-6)


def test_resize_mask_averages_area_without_rebinarising():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :2] = 1
    small = resize_mask(mask, 4)
    assert small.dtype == np.float32
    assert small[0, 0] == 1.0 and small[0, 1] == 0.0 and small[3, 3] == 0.0
    assert np.isclose(small.sum() * 4, mask.sum())
