"""Batched device augmentation (dncut.photometric) against torchvision's per-image functional ops
and against DINO's published law (REFERENCE §2): rates, factor ranges, sigma range, threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from dncut import photometric as ph


def _images(b: int = 6, s: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def _params(b: int, **fields) -> torch.Tensor:
    p = torch.from_numpy(ph.identity_params(b))
    for name, value in fields.items():
        p[:, getattr(ph, name.upper())] = torch.as_tensor(value, dtype=torch.float32)
    return p


FACTORS = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.75])


@pytest.mark.parametrize("k, reference", [
    (0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)])
def test_each_jitter_op_equals_torchvision_per_image(k, reference):
    x = _images()
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(6, 1)
    factors[:, k] = FACTORS
    out = ph.apply(x, _params(6, jitter=1.0, factors=factors))
    for i in range(6):
        expected = reference(x[i].float() / 255, float(FACTORS[i]))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_hue_equals_torchvision_per_image():
    x = _images()
    shifts = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.08, 0.1])
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(6, 1)
    factors[:, 3] = shifts
    out = ph.apply(x, _params(6, jitter=1.0, factors=factors))
    for i in range(6):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i].float() / 255, float(shifts[i])), atol=1e-5, rtol=0)


def test_jitter_order_is_per_image():
    x = _images(2)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.float32)
    out = ph.apply(x, _params(2, jitter=1.0, factors=factors, order=order))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(2):
        y = x[i].float() / 255
        for k in order[i].long().tolist():
            y = ops[k](y, float(factors[i, k]))
        torch.testing.assert_close(out[i], y, atol=1e-5, rtol=0)


def test_grayscale_blur_and_solarize_equal_torchvision():
    x = _images()
    sigmas = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.7, 2.0])
    gray = ph.apply(x, _params(6, gray=1.0))
    blur = ph.apply(x, _params(6, blur=1.0, sigma=sigmas))
    sol = ph.apply(x, _params(6, solarize=1.0))
    for i in range(6):
        f = x[i].float() / 255
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(f, 3), atol=1e-6, rtol=0)
        k = 2 * int(np.ceil(3 * float(sigmas[i]))) + 1
        torch.testing.assert_close(blur[i], TF.gaussian_blur(f, [k, k], [float(sigmas[i])] * 2), atol=1e-5, rtol=0)
        # PIL's ImageOps.solarize(threshold=128) on the uint8 image, the old CPU path
        expected = torch.where(x[i] >= 128, 255 - x[i], x[i]).float() / 255
        torch.testing.assert_close(sol[i], expected, atol=1e-6, rtol=0)


def _torchvision_pipeline(image: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """One view through torchvision's per-image functional ops, as ``row`` says (the reference)."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    y = image.float() / 255
    if row[ph.JITTER] > 0.5:
        for k in row[ph.ORDER].long().tolist():
            y = ops[k](y, float(row[ph.FACTORS][k]))
    if row[ph.GRAY] > 0.5:
        y = TF.rgb_to_grayscale(y, 3)
    if row[ph.BLUR] > 0.5:
        sigma = float(row[ph.SIGMA])
        k = 2 * int(np.ceil(3 * sigma)) + 1
        y = TF.gaussian_blur(y, [k, k], [sigma, sigma])
    if row[ph.SOLARIZE] > 0.5:
        y = torch.where(y >= ph.SOLARIZE_THRESHOLD, 1 - y, y)
    return y


@pytest.mark.parametrize("branch", [0, 1])
def test_mixed_batch_equals_torchvision_per_image(branch):
    """A batch where each image draws its own operations (DINO's law, both branches): every image
    equals torchvision's ops applied to it alone, and the input batch is left unchanged."""
    x = _images(24, seed=branch)
    rng = np.random.default_rng(7 + branch)
    params = torch.from_numpy(np.stack([ph.sample_params(rng, branch) for _ in range(24)]))
    kept = x.clone()
    out = ph.apply(x, params)
    assert torch.equal(x, kept)
    assert len({tuple(r.tolist()) for r in params[:, [ph.JITTER, ph.GRAY, ph.BLUR]] > 0.5}) > 2  # mixed subsets
    for i in range(24):
        torch.testing.assert_close(out[i], _torchvision_pipeline(x[i], params[i]), atol=2e-5, rtol=0)
    floats = x.float() / 255
    ph.apply(floats, params)
    assert torch.equal(floats, kept.float() / 255)


def test_identity_params_change_nothing_and_bad_shapes_are_refused():
    x = _images()
    torch.testing.assert_close(ph.apply(x, torch.from_numpy(ph.identity_params(6))), x.float() / 255)
    with pytest.raises(ValueError, match="params"):
        ph.apply(x, torch.zeros(5, ph.N_PARAMS))


def test_parameter_law_matches_dino():
    """Rates and ranges over 4,000 draws per branch: within 4 standard errors of DINO's values."""
    rng = np.random.default_rng(0)
    n = 4000
    for branch in (0, 1):
        p = np.stack([ph.sample_params(rng, branch) for _ in range(n)])
        for col, rate in ((ph.JITTER, 0.8), (ph.GRAY, 0.2), (ph.BLUR, (1.0, 0.1)[branch]),
                          (ph.SOLARIZE, (0.0, 0.2)[branch])):
            tol = 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9
            assert abs(p[:, col].mean() - rate) <= tol, (branch, col, p[:, col].mean(), rate)
        f = p[:, ph.FACTORS]
        for k, (low, high) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            assert low <= f[:, k].min() < low + 0.01 and high - 0.01 < f[:, k].max() <= high
            assert abs(f[:, k].mean() - (low + high) / 2) < 0.01
        assert 0.1 <= p[:, ph.SIGMA].min() < 0.11 and 1.99 < p[:, ph.SIGMA].max() <= 2.0
        orders = {tuple(r) for r in p[:, ph.ORDER].astype(int)}
        assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_solarize_threshold_is_128():
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    out = ph.apply(ramp, _params(1, solarize=1.0))[0, 0].flatten() * 255
    levels = torch.arange(256.0)
    assert torch.allclose(out[:128], levels[:128]) and torch.allclose(out[128:], 255 - levels[128:])
