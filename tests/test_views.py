"""Two-view geometry against analytic coordinates: crops, flips, overlap, RoIAlign alignment.

The test images encode their own coordinates (channel 0 = x, channel 1 = y of each pixel
centre), so every resampled map can be checked against where it should come from.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dncut.views import (
    TwoViewTransform,
    align_to_overlap,
    overlap_boxes,
    resized_crop,
    sample_crop_boxes,
)


def area(b):
    return max(b[2] - b[0], 0) * max(b[3] - b[1], 0)


def inter(a, b):
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def coord_tensor(width, height):
    """(2, H, W) float image: x and y of each pixel centre in continuous coordinates."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    return torch.stack([xs, ys]).float()


def coord_pil(width=256, height=192):
    """uint8 RGB image with R = column index, G = row index (needs W, H <= 256)."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = np.arange(width)[None, :]
    arr[..., 1] = np.arange(height)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr)


def grid_coords(box, oh, ow):
    """Expected (2, oh, ow) original coordinates of the bin centres of box on an oh x ow grid."""
    x = box[0] + (np.arange(ow) + 0.5) * (box[2] - box[0]) / ow
    y = box[1] + (np.arange(oh) + 0.5) * (box[3] - box[1]) / oh
    return np.stack([np.broadcast_to(x[None, :], (oh, ow)), np.broadcast_to(y[:, None], (oh, ow))])


def analytic_features(box, h, w, flip):
    """A (2, h, w) 'feature map' whose cells carry the original coordinates of their centres."""
    f = torch.from_numpy(grid_coords(box, h, w).copy()).float()
    return f.flip(-1) if flip else f


def interior_bins(box, ovl, h, w, oh, ow):
    """(oh, ow) bool: bins whose whole extent lies >= half a cell inside the crop's map,
    where bilinear sampling of a linear field is exact (RoIAlign clamps beyond)."""
    sx, sy = w / (box[2] - box[0]), h / (box[3] - box[1])
    u0, u1 = (ovl[0] - box[0]) * sx, (ovl[2] - box[0]) * sx
    v0, v1 = (ovl[1] - box[1]) * sy, (ovl[3] - box[1]) * sy
    bu, bv = (u1 - u0) / ow, (v1 - v0) / oh
    jx = np.arange(ow)
    iy = np.arange(oh)
    ok_x = (u0 + jx * bu >= 0.5 - 1e-9) & (u0 + (jx + 1) * bu <= w - 0.5 + 1e-9)
    ok_y = (v0 + iy * bv >= 0.5 - 1e-9) & (v0 + (iy + 1) * bv <= h - 0.5 + 1e-9)
    return ok_y[:, None] & ok_x[None, :]


# --------------------------------------------------------------------------- boxes


def test_crop_boxes_valid_overlapping_and_seeded():
    W, H = 300, 200
    for seed in range(300):
        b1, b2 = sample_crop_boxes(W, H, np.random.default_rng(seed))
        for b in (b1, b2):
            assert all(float(v).is_integer() for v in b)
            assert 0 <= b[0] < b[2] <= W and 0 <= b[1] < b[3] <= H
            # area fraction in [0.2, 1] up to the rounding of the sides
            assert 0.2 * W * H * 0.95 <= area(b) <= W * H
        assert inter(b1, b2) >= 0.01 * area(b1)
    a = sample_crop_boxes(W, H, np.random.default_rng(7))
    b = sample_crop_boxes(W, H, np.random.default_rng(7))
    c = sample_crop_boxes(W, H, np.random.default_rng(8))
    assert a == b and a != c


def test_crop_boxes_fallback_satisfies_overlap():
    # min_overlap = 1 means box2 must contain box1: hard to draw, the fallback must cover it
    for seed in range(50):
        b1, b2 = sample_crop_boxes(120, 90, np.random.default_rng(seed), min_overlap=1.0, max_tries=1)
        assert inter(b1, b2) >= area(b1)


@pytest.mark.parametrize("kwargs", [dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)), dict(min_overlap=1.5),
                                    dict(ratio=(2.0, 1.0))])
def test_crop_boxes_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_crop_boxes(100, 100, np.random.default_rng(0), **kwargs)


def test_overlap_boxes_hand_made():
    b1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    b2 = torch.tensor([[5.0, 2.0, 20.0, 8.0], [6.0, 1.0, 9.0, 3.0]])
    out = overlap_boxes(b1, b2)
    assert torch.equal(out[0], torch.tensor([5.0, 2.0, 10.0, 8.0]))
    # disjoint in x: empty box
    assert out[1, 2] - out[1, 0] == 0
    assert torch.equal(overlap_boxes(b2, b1), out)


# --------------------------------------------------------------------------- views


def test_transform_shapes_dtypes_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    t = TwoViewTransform(size=32)
    a = t(img, np.random.default_rng(3))
    b = t(img, np.random.default_rng(3))
    c = t(img, np.random.default_rng(4))
    for k in ("view1", "view2"):
        # uint8 RGB: photometric work and normalisation happen on the training device, not here
        assert a[k].shape == (3, 32, 32) and a[k].dtype == np.uint8
        np.testing.assert_array_equal(a[k], b[k])
    for k in ("box1", "box2"):
        assert a[k].dtype == np.float32 and a[k].shape == (4,)
        np.testing.assert_array_equal(a[k], b[k])
    assert isinstance(a["flip1"], bool) and isinstance(a["flip2"], bool)
    assert not np.array_equal(a["view1"], c["view1"])
    # a grayscale (mode "L") image is accepted and converted to RGB
    assert t(img.convert("L"), np.random.default_rng(0))["view1"].shape == (3, 32, 32)


def test_transform_photometric_off_views_carry_the_right_pixels():
    """A view is the uint8 bicubic crop of its box (PIL reference), mirrored when flipped, and
    its pixels sit where the box says (coordinate image)."""
    img = coord_pil()
    S = 48
    t = TwoViewTransform(size=S)
    seen_flip = set()
    for seed in range(12):
        out = t(img, np.random.default_rng(seed))
        for v in (1, 2):
            view = torch.from_numpy(out[f"view{v}"])
            assert view.dtype == torch.uint8 and view.shape == (3, S, S)
            box = out[f"box{v}"].astype(np.float64)
            flip = out[f"flip{v}"]
            seen_flip.add(flip)
            ref = np.asarray(img.crop(tuple(int(c) for c in box)).resize((S, S), Image.BICUBIC))  # (S, S, 3)
            if flip:
                ref = ref[:, ::-1]
            # torch's uint8 antialiased bicubic kernel against PIL's: the same filter, rounding apart
            got_hw3 = view.permute(1, 2, 0).numpy().astype(int)
            assert np.abs(got_hw3 - ref).max() <= 1
            got = view[:2].double().numpy() + 0.5  # pixel-centre coordinates
            exp = grid_coords(box, S, S)
            if flip:
                exp = exp[:, :, ::-1]
            inner = (slice(None), slice(4, -4), slice(4, -4))
            assert np.abs(got[inner] - exp[inner]).max() < 1.2
            assert (view[2] == 128).all()
    assert seen_flip == {True, False}


def test_photometric_parameters_leave_the_geometry_alone(tmp_path):
    """The view maker draws the photometric parameters after the crops and flips: the same seed
    gives the same views and boxes with ``data.photometric`` on or off; applying the parameters
    on the device changes view 1's pixels (blur p = 1) but not its size."""
    from dncut.config import load_config
    from dncut.data.pipeline import ViewMaker
    from dncut.photometric import N_PARAMS, apply, identity_params

    path = tmp_path / "coords.png"
    coord_pil().save(path)
    row = {"uri": str(path), "epoch": 0, "key": 7}
    cfg = load_config(None, ["data.crop_size=32", "data.min_image_size=16"])
    plain, aug = (ViewMaker(cfg.with_overrides({"data.photometric": p}))(row) for p in (False, True))
    assert plain["ok"] and aug["ok"]
    for k in ("view1", "view2", "box1", "box2", "flip1", "flip2"):
        np.testing.assert_array_equal(plain[k], aug[k])
    np.testing.assert_array_equal(plain["aug1"], identity_params(1)[0])
    assert aug["aug1"].shape == (N_PARAMS,) and aug["aug1"].dtype == np.float32
    view = torch.from_numpy(aug["view1"])[None]
    out = apply(view, torch.from_numpy(aug["aug1"])[None])
    assert out.shape == (1, 3, 32, 32) and not torch.allclose(out, view.float() / 255)


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("flips", [(False, False), (True, False), (False, True), (True, True)])
def test_align_analytic_feature_maps(flips):
    """Cells that carry their own original coordinates land exactly on the overlap grid."""
    W, H = 300, 200
    h = w = 14  # a 224 view at stride 16
    oh, ow = 7, 9
    checked_interior = 0
    for seed in range(20):
        b1, b2 = sample_crop_boxes(W, H, np.random.default_rng(seed), min_overlap=0.2)
        boxes1 = torch.tensor([b1], dtype=torch.float32)
        boxes2 = torch.tensor([b2], dtype=torch.float32)
        ovl = overlap_boxes(boxes1, boxes2)
        f1 = analytic_features(b1, h, w, flips[0])[None]  # (1, 2, h, w)
        f2 = analytic_features(b2, h, w, flips[1])[None]
        a1 = align_to_overlap(f1, boxes1, ovl, torch.tensor([flips[0]]), (oh, ow))[0].numpy()
        a2 = align_to_overlap(f2, boxes2, ovl, torch.tensor([flips[1]]), (oh, ow))[0].numpy()
        o = ovl[0].double().numpy()
        exp = grid_coords(o, oh, ow)
        for a, b in ((a1, b1), (a2, b2)):
            inside = interior_bins(b, o, h, w, oh, ow)
            checked_interior += inside.sum()
            np.testing.assert_allclose(a[:, inside], exp[:, inside], atol=2e-3)
            # border bins are clamped by RoIAlign by at most half a feature cell
            half_cell = 0.5 * max((b[2] - b[0]) / w, (b[3] - b[1]) / h)
            assert np.abs(a - exp).max() <= half_cell + 1e-3
    assert checked_interior > 200


def test_align_real_resized_crops_both_views_agree():
    """Crop + bicubic resize + flip a coordinate image, use the crops (stride 1) and their
    4x average pools (stride 4) as feature maps: both views align to the same coordinates."""
    W, H = 160, 120
    img = coord_tensor(W, H)
    S = 64
    for seed in range(8):
        rng = np.random.default_rng(seed)
        b1, b2 = sample_crop_boxes(W, H, rng, min_overlap=0.3)
        flips = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
        if seed < 2:
            flips = [seed == 0, seed == 1]
        v1 = resized_crop(img, b1, S, flips[0])[None]  # (1, 2, S, S)
        v2 = resized_crop(img, b2, S, flips[1])[None]
        boxes1 = torch.tensor([b1]).float()
        boxes2 = torch.tensor([b2]).float()
        ovl = overlap_boxes(boxes1, boxes2)
        o = ovl[0].double().numpy()
        for stride in (1, 4):
            f1 = F.avg_pool2d(v1, stride) if stride > 1 else v1
            f2 = F.avg_pool2d(v2, stride) if stride > 1 else v2
            hw = S // stride
            a1 = align_to_overlap(f1, boxes1, ovl, torch.tensor(flips[:1]), 12)[0].numpy()
            a2 = align_to_overlap(f2, boxes2, ovl, torch.tensor(flips[1:]), 12)[0].numpy()
            exp = grid_coords(o, 12, 12)
            both = interior_bins(b1, o, hw, hw, 12, 12) & interior_bins(b2, o, hw, hw, 12, 12)
            # resampling error of bicubic (a=-0.75) on a linear ramp is a small fraction of a pixel
            np.testing.assert_allclose(a1[:, both], exp[:, both], atol=0.35)
            np.testing.assert_allclose(a2[:, both], exp[:, both], atol=0.35)
            np.testing.assert_allclose(a1[:, both], a2[:, both], atol=0.5)
            cell = max(b1[2] - b1[0], b1[3] - b1[1], b2[2] - b2[0], b2[3] - b2[1]) / hw
            assert np.abs(a1 - a2).max() <= cell + 0.5


def test_align_end_to_end_through_transform_batched():
    """TwoViewTransform output (uint8 coordinate image), batched, stride 8 features."""
    img = coord_pil()
    S, stride, out = 64, 8, 8
    t = TwoViewTransform(size=S)
    samples = [t(img, np.random.default_rng(100 + s)) for s in range(6)]
    v1 = torch.stack([torch.from_numpy(s["view1"][:2]) for s in samples]).float() + 0.5  # (B, 2, S, S) coords
    v2 = torch.stack([torch.from_numpy(s["view2"][:2]) for s in samples]).float() + 0.5
    boxes1 = torch.stack([torch.from_numpy(s["box1"]) for s in samples])
    boxes2 = torch.stack([torch.from_numpy(s["box2"]) for s in samples])
    flips1 = torch.tensor([s["flip1"] for s in samples])
    flips2 = torch.tensor([s["flip2"] for s in samples])
    ovl = overlap_boxes(boxes1, boxes2)
    a1 = align_to_overlap(F.avg_pool2d(v1, stride), boxes1, ovl, flips1, out)
    a2 = align_to_overlap(F.avg_pool2d(v2, stride), boxes2, ovl, flips2, out)
    assert a1.shape == (6, 2, out, out) and a1.dtype == torch.float32
    for i in range(6):
        o = ovl[i].double().numpy()
        exp = grid_coords(o, out, out)
        hw = S // stride
        both = (interior_bins(boxes1[i].double().numpy(), o, hw, hw, out, out)
                & interior_bins(boxes2[i].double().numpy(), o, hw, hw, out, out))
        np.testing.assert_allclose(a1[i][:, both].numpy(), exp[:, both], atol=1.5)
        np.testing.assert_allclose(a2[i][:, both].numpy(), exp[:, both], atol=1.5)


def test_align_gradients():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[10.0, 20.0, 70.0, 60.0], [0.0, 0.0, 50.0, 50.0]], dtype=torch.float64)
    ovl = torch.tensor([[30.0, 25.0, 65.0, 55.0], [5.0, 10.0, 40.0, 45.0]], dtype=torch.float64)
    flipped = torch.tensor([True, False])

    def fn(x):
        return align_to_overlap(x, boxes, ovl, flipped, (3, 4))

    assert torch.autograd.gradcheck(fn, (feats,))
    out = fn(feats)
    out.square().sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert out.dtype == torch.float64


def test_align_rejects_bad_shapes():
    with pytest.raises(ValueError):
        align_to_overlap(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool), 2)


def test_draft_decoded_jpeg_gives_the_full_size_crop():
    """A large JPEG decoded at 1/4 size (PIL draft) and cropped with the scaled box gives nearly
    the view of the full-size decode (same boxes, same place of the image)."""
    import io

    from dncut.data.images import decode_rgb, image_size
    from dncut.views import crop_view, reduction_for

    xs = np.linspace(0, 255, 1600)
    img = np.stack(np.broadcast_arrays(xs[None, :], np.linspace(0, 255, 1200)[:, None], 128.0), -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    box = (200.0, 100.0, 1400.0, 1100.0)
    assert image_size(data) == (1600, 1200) and reduction_for([box, box], 224) == 4
    small, full = decode_rgb(data, reduce=4), decode_rgb(data)
    assert isinstance(small, Image.Image) and small.size == (400, 300) and isinstance(full, torch.Tensor)
    a = crop_view(small, box, 224, False, (400 / 1600, 300 / 1200)).astype(int)
    b = crop_view(full, box, 224, False).astype(int)
    assert np.abs(a - b)[:, 4:-4, 4:-4].max() <= 3
