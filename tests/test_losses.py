"""NCut losses on hand-made masks: BCE values, sign rule, filter, templates, collapse, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from dncut.losses import (
    BranchPair,
    NCutLoss,
    bce,
    is_collapsed,
    mask_consistency_loss,
    mask_templates,
    masks_from_eigvec,
    orient_and_filter,
    pixel_consistency_loss,
    structural_regularization,
    template_similarity,
)


def half_mask(n=8, hi=0.9, lo=0.1, axis="h"):
    """(n, n) mask: top half (axis h) or left half (axis v) = hi, the rest lo."""
    m = torch.full((n, n), lo, dtype=torch.float64)
    if axis == "h":
        m[: n // 2] = hi
    else:
        m[:, : n // 2] = hi
    return m


def blob_mask(n=8, hi=0.9, lo=0.1):
    """(n, n) mask with a centred (n/2 x n/2) blob."""
    m = torch.full((n, n), lo, dtype=torch.float64)
    m[n // 4: 3 * n // 4, n // 4: 3 * n // 4] = hi
    return m


def H(p, t):
    """Hand BCE of one entry: prediction p, target t."""
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


# --------------------------------------------------------------------------- BCE, masks


def test_masks_from_eigvec_values():
    z = torch.tensor([[0.0, 0.05, -0.1]])
    m = masks_from_eigvec(z, temperature=0.05)
    expected = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))]
    assert torch.allclose(m[0], torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError):
        masks_from_eigvec(z, temperature=0.0)


def test_bce_hand_computed():
    pred = torch.tensor([[0.9, 0.2], [0.5, 0.5]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    got = bce(pred, target)
    s0 = (-math.log(0.9) + -(0.5 * math.log(0.2) + 0.5 * math.log(0.8))) / 2  # 0.510826
    s1 = math.log(2.0)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(s0, abs=1e-12)
    assert got[0].item() == pytest.approx(0.5108256, abs=1e-6)
    assert got[1].item() == pytest.approx(s1, abs=1e-12)
    # (B, h, w) input, same as the flattened one
    assert torch.allclose(bce(pred.view(2, 1, 2), target.view(2, 1, 2)), got)


def test_bce_clamped_saturated_inputs_finite():
    pred = torch.tensor([[0.0, 1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0]])
    out = bce(pred, target)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(-math.log(1e-6), rel=1e-3)  # clamp at eps = 1e-6
    out.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_mask_consistency_only_kept_and_only_online_gradient():
    m1 = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    m2 = torch.tensor([[1.0, 0.5], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, False, True])
    loss = mask_consistency_loss(m1, m2, keep)
    s0 = (H(0.9, 1.0) + H(0.2, 0.5)) / 2
    s2 = math.log(2.0)
    assert loss.item() == pytest.approx((s0 + s2) / 2, abs=1e-12)
    # peer reference: torch's BCE on the kept rows
    ref = F.binary_cross_entropy(m1[keep].detach(), m2[keep].detach())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    loss.backward()
    assert m2.grad is None
    assert torch.all(m1.grad[1] == 0) and m1.grad[0].abs().sum() > 0


def test_pixel_consistency_hand_cases():
    f = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert pixel_consistency_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert pixel_consistency_loss(f, -f).item() == pytest.approx(4.0, abs=1e-12)
    e0 = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    e0[:, 0] = 1.0
    e1 = torch.zeros_like(e0)
    e1[:, 1] = 2.0
    assert pixel_consistency_loss(e0, e1).item() == pytest.approx(2.0, abs=1e-12)
    # keep: only the second sample (identical pair) counts
    g = torch.stack([-f[0], f[1]])
    assert pixel_consistency_loss(f, g, torch.tensor([False, True])).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- sign and filter


def test_orientation_picks_complement_of_inverse():
    m1 = torch.stack([blob_mask(), half_mask()]).flatten(1)  # (2, 64)
    m2 = torch.stack([1.0 - blob_mask(), half_mask()]).flatten(1)
    oriented, keep, iou = orient_and_filter(m1, m2, min_pass=1)
    assert torch.allclose(oriented[0], m1[0])  # flipped back
    assert torch.allclose(oriented[1], m2[1])  # left as is
    assert torch.allclose(iou, torch.ones(2, dtype=iou.dtype))
    assert keep.all()


def designed_pairs():
    """n = 100 entries, m1 has 10 foreground entries; m2 has k of them + r others, so
    IoU(m1, m2) = k / (10 + r) and IoU(m1, 1 - m2) = (10 - k) / (100 - r) is lower."""
    spec = [(10, 0), (5, 0), (9, 10), (9, 10), (4, 0), (2, 0)]  # IoU 1, .5, .45, .45, .4, .2
    m1 = torch.full((len(spec), 100), 0.1)
    m1[:, :10] = 0.9
    m2 = torch.full((len(spec), 100), 0.2)
    for b, (k, r) in enumerate(spec):
        m2[b, :k] = 0.8
        m2[b, 10: 10 + r] = 0.8
    return m1, m2, torch.tensor([1.0, 0.5, 0.45, 0.45, 0.4, 0.2])


@pytest.mark.parametrize("min_pass,expected", [
    (1, [1, 1, 0, 0, 0, 0]),   # 2 pass at 0.5 already (>= is inclusive)
    (2, [1, 1, 0, 0, 0, 0]),   # exactly 2 pass at 0.5
    (3, [1, 1, 1, 1, 0, 0]),   # lowered once: 4 pass at 0.45
    (5, [1, 1, 1, 1, 1, 0]),   # lowered to 0.40
    (20, [1, 1, 1, 1, 1, 1]),  # capped at B = 6: lowered to 0.20
])
def test_filter_threshold_lowering(min_pass, expected):
    m1, m2, iou_expected = designed_pairs()
    oriented, keep, iou = orient_and_filter(m1, m2, min_pass=min_pass)
    assert torch.allclose(iou, iou_expected, atol=1e-6)
    assert torch.equal(oriented, m2)  # no sample is better flipped
    assert keep.tolist() == [bool(e) for e in expected]


def test_filter_orients_before_filtering():
    m1, m2, iou_expected = designed_pairs()
    m2 = m2.clone()
    m2[2] = 1.0 - m2[2]  # the 0.45 pair, inverted: must be flipped back and still score 0.45
    oriented, keep, iou = orient_and_filter(m1, m2, min_pass=3)
    assert torch.allclose(oriented[2], 1.0 - m2[2])
    assert torch.allclose(iou, iou_expected, atol=1e-6)
    assert keep.tolist() == [True, True, True, True, False, False]


# --------------------------------------------------------------------------- templates


def test_templates_hand_made():
    m = torch.tensor([[0.9, 0.9, 0.1, 0.1],
                      [0.9, 0.7, 0.1, 0.3],
                      [0.1, 0.5, 0.1, 0.1],
                      [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    fg = (0.9 * 3 + 0.7) / 4  # > 0.5 entries: 0.85
    bg = (0.1 * 10 + 0.3 + 0.5) / 12  # <= 0.5 entries (0.5 counts as background): 0.15
    mean = (0.9 * 3 + 0.7 + 0.1 * 10 + 0.3 + 0.5) / 16  # 0.325
    m1 = m[None].clone().requires_grad_(True)
    t = mask_templates(m1)
    assert t.shape == (1, 3, 4, 4) and not t.requires_grad
    exp_h = torch.tensor([[fg] * 4, [fg] * 4, [bg] * 4, [bg] * 4], dtype=torch.float64)
    exp_v = torch.tensor([[fg, fg, bg, bg]] * 4, dtype=torch.float64)
    assert torch.allclose(t[0, 0], exp_h)
    assert torch.allclose(t[0, 1], exp_v)
    assert torch.allclose(t[0, 2], torch.full((4, 4), mean, dtype=torch.float64))
    assert fg == pytest.approx(0.85) and bg == pytest.approx(0.15)


def test_regularization_hand_values_blob_better_than_half():
    e, c = H(0.9, 0.9), H(0.1, 0.9)  # agree / disagree with a 0.9-0.1 template
    u_half = H(0.9, 0.5)  # = H(0.1, 0.5), uniform template 0.5
    expected_half = -(e + (e + c) / 2 + u_half)
    u_blob = 0.25 * H(0.9, 0.3) + 0.75 * H(0.1, 0.3)  # blob covers 1/4, global mean 0.3
    expected_blob = -((e + c) / 2 + (e + c) / 2 + u_blob)
    half = structural_regularization(half_mask()[None])
    blob = structural_regularization(blob_mask()[None])
    assert half.item() == pytest.approx(expected_half, abs=1e-9)
    assert blob.item() == pytest.approx(expected_blob, abs=1e-9)
    assert blob.item() < half.item()
    # the flipped half (bottom = 0.9) is matched by the flipped template: same value
    assert structural_regularization(half_mask().flip(0)[None]).item() == pytest.approx(expected_half, abs=1e-9)
    # batch mean
    both = structural_regularization(torch.stack([half_mask(), blob_mask()]))
    assert both.item() == pytest.approx((expected_half + expected_blob) / 2, abs=1e-9)


def test_collapse_indicators():
    sharp = dict(hi=0.98, lo=0.02)
    horiz = template_similarity(half_mask(**sharp, axis="h")[None])
    vert = template_similarity(half_mask(**sharp, axis="v")[None])
    unif = template_similarity(torch.full((1, 8, 8), 0.7))
    blob = template_similarity(blob_mask(**sharp)[None])
    assert horiz["horizontal"] == pytest.approx(1.0, abs=1e-6) and horiz["vertical"] < 0.1
    assert vert["vertical"] == pytest.approx(1.0, abs=1e-6) and vert["horizontal"] < 0.1
    assert unif["uniform"] == pytest.approx(1.0)
    # the blob is symmetric about both midlines: correlation 0; std = 0.96 * sqrt(3/16)
    assert blob["horizontal"] == pytest.approx(0.0, abs=1e-6)
    assert blob["vertical"] == pytest.approx(0.0, abs=1e-6)
    assert blob["uniform"] == pytest.approx(1 - 2 * 0.96 * math.sqrt(3 / 16), abs=1e-5)
    for sim in (horiz, vert, unif):
        assert is_collapsed(sim)
    assert not is_collapsed(blob)
    # inverted horizontal split: also collapsed
    assert template_similarity(1 - half_mask(**sharp)[None])["horizontal"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- NCutLoss


def random_eigvecs(b=6, h=5, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(b, h, w, generator=g, dtype=torch.float64) * 0.1
    zb = za + 0.03 * torch.randn(b, h, w, generator=g, dtype=torch.float64)
    zb[::2] = -zb[::2]  # half of the target eigenvectors with the other sign
    return za, zb


def test_ncut_loss_gradients_online_only():
    za, zb = random_eigvecs()
    za.requires_grad_(True)
    zb.requires_grad_(True)
    loss, parts = NCutLoss(min_pass=4)(za, zb)
    loss.backward()
    assert torch.isfinite(za.grad).all() and za.grad.abs().sum() > 0
    assert zb.grad is None or torch.all(zb.grad == 0)
    for key in ("l_mask", "l_reg", "pass_fraction", "sim_horizontal", "sim_vertical", "sim_uniform"):
        assert isinstance(parts[key], float) and math.isfinite(parts[key])
    assert parts["keep"].shape == (6,) and parts["keep"].dtype == torch.bool


def test_ncut_loss_matches_independent_assembly_and_finite_differences():
    za, zb = random_eigvecs(seed=1)
    T, alpha = 0.05, 0.05
    crit = NCutLoss(alpha=alpha, temperature=T, min_pass=3)
    loss, parts = crit(za, zb)
    # independent assembly with torch's BCE; signs resolved by hand from the sign of z
    m1 = torch.sigmoid(za / T).flatten(1)
    m2 = torch.sigmoid(zb / T).flatten(1)
    same = ((m1 > 0.5) & (m2 > 0.5)).sum(1) / ((m1 > 0.5) | (m2 > 0.5)).sum(1)
    flip = ((m1 > 0.5) & (m2 < 0.5)).sum(1) / ((m1 > 0.5) | (m2 < 0.5)).sum(1)
    m2o = torch.where((flip > same)[:, None], 1 - m2, m2)
    keep = parts["keep"]
    assert keep.sum() >= 3
    l_mask = F.binary_cross_entropy(m1[keep], m2o[keep])
    assert parts["l_mask"] == pytest.approx(l_mask.item(), abs=1e-9)
    assert loss.item() == pytest.approx(parts["l_mask"] + alpha * parts["l_reg"], abs=1e-9)
    # gradient: autograd vs central finite differences (the sign/filter choices are locally
    # constant). Without L_reg: its templates are built from m1 but detached by design, which
    # finite differences would see.
    crit_fd = NCutLoss(temperature=1.0, min_pass=3, regularization=False)  # smooth masks
    z = za.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: crit_fd(x, zb)[0], (z,), eps=1e-7, atol=1e-5)


def test_ncut_loss_flat_input_and_symmetric():
    za, zb = random_eigvecs(h=4, w=4)
    crit = NCutLoss(min_pass=2)
    loss_maps, _ = crit(za, zb)
    loss_flat, _ = crit(za.flatten(1), zb.flatten(1))
    assert loss_flat.item() == pytest.approx(loss_maps.item(), abs=1e-12)
    loss_shape, _ = crit(za.flatten(1), zb.flatten(1), shape=(4, 4))
    assert loss_shape.item() == pytest.approx(loss_maps.item(), abs=1e-12)
    with pytest.raises(ValueError):
        crit(za.flatten(1)[:, :15], zb.flatten(1)[:, :15])
    sym, parts = crit.symmetric(BranchPair(za, zb), BranchPair(zb, za))
    assert sym.item() == pytest.approx(crit(za, zb)[0].item() + crit(zb, za)[0].item(), abs=1e-12)
    assert parts["keep"].shape == (2, 6)


def test_ncut_loss_pixel_mode_and_no_regularization():
    za, zb = random_eigvecs()
    f1 = torch.randn(6, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(6, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    crit = NCutLoss(consistency="pixel", regularization=False)
    loss, parts = crit(za, zb, f1, f2)
    expected = (2 - 2 * F.cosine_similarity(f1, f2, dim=1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert parts["l_reg"] == 0.0 and parts["pass_fraction"] == 1.0
    loss.backward()
    assert f1.grad.abs().sum() > 0 and f2.grad is None
    with pytest.raises(ValueError):
        crit(za, zb)


def test_ncut_loss_flags_collapsed_masks():
    z = (half_mask(hi=1.0, lo=-1.0)[None] * torch.ones(4, 1, 1))  # horizontal split, sharp masks
    _, parts = NCutLoss(min_pass=1)(z, z)
    assert parts["collapsed"] and parts["sim_horizontal"] > 0.99
    zb = blob_mask(hi=1.0, lo=-1.0)[None] * torch.ones(4, 1, 1)
    _, parts = NCutLoss(min_pass=1)(zb, zb)
    assert not parts["collapsed"]


@pytest.mark.parametrize("kwargs", [dict(consistency="pixels"), dict(temperature=0.0), dict(alpha=-1.0),
                                    dict(iou_threshold=1.5)])
def test_ncut_loss_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError) as err:
        NCutLoss(**kwargs)
    if "consistency" in kwargs:
        assert "pixels" in str(err.value) and "mask" in str(err.value)


def test_regularization_gradient_templates_held_fixed():
    """Autograd of L_reg equals finite differences of Eq. 11 with the templates frozen
    (they are built from m1 but detached), written here from scratch."""
    g = torch.Generator().manual_seed(3)
    m = (0.05 + 0.9 * torch.rand(1, 4, 6, generator=g, dtype=torch.float64))
    m[0, :2, :2] = 0.9  # some clear foreground
    flat = m.flatten()
    fg = flat[flat > 0.5].mean().item()
    bg = flat[flat <= 0.5].mean().item()
    th = torch.full((4, 6), bg, dtype=torch.float64)
    th[:2] = fg
    tv = torch.full((4, 6), bg, dtype=torch.float64)
    tv[:, :3] = fg
    tu = torch.full((4, 6), flat.mean().item(), dtype=torch.float64)

    def ref(x):
        def b(t):
            return -(t * torch.log(x) + (1 - t) * torch.log(1 - x)).mean()
        return -(min(b(th), b(th.flip(0))) + min(b(tv), b(tv.flip(1))) + b(tu))

    x = m[0].clone().requires_grad_(True)
    structural_regularization(x[None]).backward()
    step = 1e-6
    fd = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = step
        fd[i] = (ref(m[0] + e.view(4, 6)) - ref(m[0] - e.view(4, 6))) / (2 * step)
    assert structural_regularization(m).item() == pytest.approx(ref(m[0]).item(), abs=1e-12)
    assert torch.allclose(x.grad.flatten(), fd, atol=1e-7)
