"""Tests for dncut.weights: the checkpoint layouts users have, on locally made files.

Official DINOv2 / DINOv3 files are written here by inverting timm's own converters
(``timm.models.vision_transformer.checkpoint_filter_fn`` / ``timm.models.eva.checkpoint_filter_fn``):

- DINOv2 without registers: timm's keys plus ``mask_token`` (1, C); ``pos_embed`` (1, 1 + 37*37, C) as is.
- DINOv2 with registers: ``reg_token`` -> ``register_tokens``; timm's ``pos_embed`` (1, 37*37, C) gets a
  class position ``p0`` in front and ``cls_token`` becomes ``cls_token - p0`` (timm folds ``p0`` back in).
- DINOv3: ``gamma_1``/``gamma_2`` -> ``ls1.gamma``/``ls2.gamma``, ``reg_token`` -> ``storage_tokens``, plus
  ``mask_token`` (1, C), ``rope_embed.periods`` (head_dim / 4,), a zero ``qkv.bias`` (3C,) and its
  ``qkv.bias_mask`` per block (the released ViT-S/B have zero biases; timm's arch has none).

Features are compared with the keys recomputed from timm's own forward pieces on the same weights.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from dncut import backbones as bb
from dncut import weights
from dncut.backbone_specs import spec
from dncut.storage import Storage

TINY = dict(embed_dim=48, depth=2, num_heads=4)
# test variants of the rows: (row to shrink, timm architecture)
DINOV2 = "vit_dinov2_reg_test"
DINOV3 = "vit_dinov3_test"


def _row(name: str, arch: str, **extra) -> object:
    """A shrunk copy of a row (not registered): 48 channels, 2 blocks."""
    return dataclasses.replace(spec(name), name=f"{arch}-tiny", arch=arch,
                               arch_kwargs=tuple({**TINY, **extra}.items()))


ROWS = {
    "dinov2": lambda **kw: _row(DINOV2, "vit_small_patch14_dinov2", **kw),
    "dinov2_reg": lambda **kw: _row(DINOV2, "vit_small_patch14_reg4_dinov2", **kw),
    "dinov3": lambda **kw: _row(DINOV3, "vit_small_patch16_dinov3", **kw),
}


def _timm_model(row) -> torch.nn.Module:
    arch, kwargs = bb.timm_arch(row)
    return timm.create_model(arch, **kwargs).eval()


def timm_state(row, seed: int) -> dict[str, torch.Tensor]:
    """timm's layout, random (non-trivial layer scales and tokens)."""
    torch.manual_seed(seed)
    sd = _timm_model(row).state_dict()
    return {k: torch.randn_like(v) * 0.2 if ("gamma" in k or "token" in k or "pos_embed" in k) else v.clone()
            for k, v in sd.items()}


def to_official(kind: str, sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's layout -> the official release layout (the inverse of timm's filter, see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    c = sd["cls_token"].shape[-1]
    out = {}
    if kind.startswith("dinov2"):
        out = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
        out["mask_token"] = torch.randn(1, c, generator=g)
        if kind == "dinov2_reg":
            p0 = torch.randn(1, 1, c, generator=g)
            out["register_tokens"] = sd["reg_token"]
            out["cls_token"] = sd["cls_token"] - p0
            out["pos_embed"] = torch.cat([p0, sd["pos_embed"]], dim=1)  # (1, 1 + 37*37, C)
        else:
            out["cls_token"], out["pos_embed"] = sd["cls_token"], sd["pos_embed"]
        return out
    for k, v in sd.items():
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        out[k] = v
        if k.endswith("attn.qkv.weight"):
            out[k.replace("weight", "bias")] = torch.zeros(3 * c)
            out[k.replace("weight", "bias_mask")] = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)])
    out["mask_token"] = torch.randn(1, c, generator=g)
    out["rope_embed.periods"] = torch.rand(c // 4 // 4, generator=g)  # (head_dim / 4,)
    return out


def timm_keys(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Keys of the last block from timm's forward pieces: (B, 3, H, W) normalised -> (B, C, H/P, W/P)."""
    from timm.models.eva import Eva

    x = model.patch_embed(images)
    rope = None
    if isinstance(model, Eva):
        x, rope = model._pos_embed(x)
    else:
        x = model._pos_embed(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:-1]:
        x = blk(x, rope=rope) if rope is not None else blk(x)
    last = model.blocks[-1]
    c = last.attn.qkv.out_features // 3
    k = torch.nn.functional.linear(last.norm1(x), last.attn.qkv.weight[c:2 * c],
                                   None if last.attn.qkv.bias is None else last.attn.qkv.bias[c:2 * c])  # (B, N, C)
    p = model.patch_embed.patch_size[0]
    h, w = images.shape[-2] // p, images.shape[-1] // p
    return k[:, model.num_prefix_tokens:].transpose(1, 2).reshape(k.shape[0], c, h, w)  # (B, C, h, w)


def _save(obj: object, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Official layouts against timm's forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_reg", "dinov3"])
def test_official_file_gives_timms_features(kind: str, tmp_path: Path) -> None:
    row = ROWS[kind]()
    sd = timm_state(row, seed=1)
    official = to_official(kind, sd)
    assert ("register_tokens" in official) == (kind == "dinov2_reg")
    if kind.startswith("dinov2"):
        assert official["pos_embed"].shape[1] == 1 + 37 * 37  # class position + the 518 px grid
    path = _save(official, tmp_path / f"{kind}_pretrain.pth")
    m = bb.build_backbone(row).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unexpected
        report = bb.load_checkpoint(m, path)
    assert report.layout == kind.split("_")[0] and not report.missing and not report.unexpected
    ref = _timm_model(row)
    ref.load_state_dict(sd, strict=True)  # timm's layout, as timm loads it
    images = torch.rand(2, 3, 3 * m.stride, 5 * m.stride)
    with torch.no_grad():
        got = m(images)
        want = timm_keys(ref, m.normalize(images))
    assert got.shape == (2, 48, 3, 5)
    assert (got - want).abs().max() <= 1e-6
    # timm's own converter on the official file gives the same tensors dncut loaded
    from timm.models import eva, vision_transformer

    fn = eva.checkpoint_filter_fn if kind == "dinov3" else vision_transformer.checkpoint_filter_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (timm's eva filter prints and skips the zero DINOv3 qkv.bias itself; dropped here to keep the log quiet)
        converted = fn({k: v.clone() for k, v in official.items()
                        if not (kind == "dinov3" and k.endswith("qkv.bias"))}, ref)
    own = m.model.state_dict()
    assert set(converted) == set(own)
    assert all(torch.equal(own[k], v) for k, v in converted.items())


def test_dinov3_keys_are_taken_before_the_rotary_embedding() -> None:
    """Same content at two positions: pre-RoPE keys agree, post-RoPE ones would not; the
    attention of features_and_attention is the model's own (rotated keys)."""
    m = bb.create_backbone(DINOV3).eval()
    patch = torch.rand(1, 3, 16, 16)
    images = patch.repeat(1, 1, 2, 3)  # (1, 3, 32, 48): six identical patches
    m.model.blocks[-1].attn.fused_attn = False
    seen = []
    handle = m.model.blocks[-1].attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            feats, attention = m.features_and_attention(images)
    finally:
        handle.remove()
        m.model.blocks[-1].attn.fused_attn = True
    # rotated keys differ by position even where the input does not: attention tells the patches apart
    model_attention = seen[0][:, :, 0, m.num_prefix_tokens:]  # (1, heads, h*w): CLS -> patches
    torch.testing.assert_close(attention, model_attention, rtol=0, atol=1e-6)
    assert attention.std(-1).max() > 1e-4
    # the keys themselves are content only up to what the earlier blocks mixed in (RoPE there too);
    # a one-block model has identical keys for identical patches
    one = bb.build_backbone(dataclasses.replace(spec(DINOV3), arch_kwargs=(("embed_dim", 48), ("depth", 1),
                                                                            ("num_heads", 4)))).eval()
    with torch.no_grad():
        k = one(images).flatten(2)[0]  # (C, 6)
    assert (k - k[:, :1]).abs().max() <= 1e-5


def test_dinov3_nonzero_qkv_bias_is_reported_not_dropped(tmp_path: Path) -> None:
    row = ROWS["dinov3"]()
    official = to_official("dinov3", timm_state(row, seed=2))
    official["blocks.0.attn.qkv.bias"] = torch.randn(3 * 48)
    with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.qkv\.bias"):
        report = bb.load_checkpoint(bb.build_backbone(row), _save(official, tmp_path / "bias.pth"))
    assert report.unexpected == ("blocks.0.attn.qkv.bias",)


def test_official_file_into_the_wrong_family_is_refused(tmp_path: Path) -> None:
    official = to_official("dinov3", timm_state(ROWS["dinov3"](), seed=3))
    with pytest.raises(ValueError, match=r"dinov3\.pth.*DINOV3.*Eva"):
        bb.create_backbone(DINOV2, checkpoint=_save(official, tmp_path / "dinov3.pth"))


def test_timm_layout_and_official_layout_load_the_same_tensors(tmp_path: Path) -> None:
    """timm's hub layout (what timm's filter makes of the official file) loads as it is."""
    for kind, name in (("dinov2_reg", DINOV2), ("dinov3", DINOV3)):
        row = spec(name)
        official = to_official(kind, timm_state(row, seed=4))
        a = bb.create_backbone(name, checkpoint=_save(official, tmp_path / f"{kind}_official.pth"))
        b = bb.create_backbone(name, checkpoint=_save(a.model.state_dict(), tmp_path / f"{kind}_timm.pth"))
        assert bb.load_checkpoint(b, str(tmp_path / f"{kind}_timm.pth")).layout == "plain"
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_position_grid_is_resampled_to_any_grid(tmp_path: Path) -> None:
    """A 37 x 37 official grid loads into a 16 x 16 network (224 px) and runs on any multiple of 14."""
    row = ROWS["dinov2_reg"](img_size=224)
    sd37 = timm_state(ROWS["dinov2_reg"](), seed=5)
    m = bb.build_backbone(row).eval()
    bb.load_checkpoint(m, _save(to_official("dinov2_reg", sd37), tmp_path / "reg.pth"))
    assert m.model.pos_embed.shape == (1, 16 * 16, 48)
    for h, w in ((2, 2), (16, 16), (7, 11), (40, 3)):
        with torch.no_grad():
            assert m(torch.rand(1, 3, 14 * h, 14 * w)).shape == (1, 48, h, w)


@pytest.mark.parametrize("name", [DINOV2, DINOV3])
def test_register_and_storage_tokens_are_never_graph_nodes(name: str) -> None:
    """Through the one inference path: the NCut map has exactly the patch grid's cells."""
    from dncut.eval.predict import Predictor, network_input

    m = bb.create_backbone(name).eval()
    s = m.stride
    image = np.random.default_rng(0).integers(0, 255, (5 * s + 3, 7 * s - 2, 3), dtype=np.uint8)
    for image_size in (None, 6 * s):
        net, _ = network_input(image, stride=s, image_size=image_size, pad_rgb=m.spec.pad_rgb)
        assert net.shape[0] % s == 0 and net.shape[1] % s == 0
        (out,), errors = Predictor(m, ["simple"], "eigh").predict([net])
        assert not errors
        assert out["simple_map"].shape == (net.shape[0] // s, net.shape[1] // s)
        assert m.model.num_prefix_tokens == 5  # CLS + 4 registers / storage tokens


# ----------------------------------------------------------------------------------------------
# Wrapper prefixes and trusted unpickling (issue 26)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "_orig_mod.module.", "module._orig_mod.",
                                    "module.backbone._orig_mod."])
def test_compile_and_ddp_wrapper_prefixes_are_stripped(prefix: str, tmp_path: Path) -> None:
    torch.manual_seed(6)
    ref = bb.create_backbone("vit_tiny_test").model.state_dict()
    path = _save({f"{prefix}{k}": v for k, v in ref.items()}, tmp_path / "wrapped.pth")
    m = bb.create_backbone("vit_tiny_test", checkpoint=path)
    own = m.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.items())


def _with_objects(tmp_path: Path) -> str:
    torch.manual_seed(7)
    sd = bb.create_backbone("vit_tiny_test").model.state_dict()
    return _save({"state_dict": sd, "epoch": np.int64(3), "best": np.float32(0.5),
                  "data_dir": pathlib.PosixPath("/data/imagenet")}, tmp_path / "with_objects.pth")


def test_objects_beside_the_weights_need_the_trust_key(tmp_path: Path) -> None:
    path = _with_objects(tmp_path)
    with pytest.raises(ValueError) as err:
        bb.create_backbone("vit_tiny_test", checkpoint=path)
    assert path in str(err.value) and "model.trusted_checkpoint: true" in str(err.value)
    m = bb.create_backbone("vit_tiny_test", checkpoint=path, trusted=True)
    torch.manual_seed(7)
    ref = bb.create_backbone("vit_tiny_test").model.state_dict()
    assert all(torch.equal(m.model.state_dict()[k], v) for k, v in ref.items())


def test_trust_key_is_a_documented_config_key() -> None:
    from dncut.config import ModelConfig

    field = ModelConfig.model_fields["trusted_checkpoint"]
    assert field.default is False and "trust" in field.description
    assert weights.TRUST_KEY == "model.trusted_checkpoint"


def test_layout_errors_name_the_file(tmp_path: Path) -> None:
    path = _save({"epoch": 1, "note": "x", "lr": 0.1}, tmp_path / "notes.pth")
    with pytest.raises(ValueError, match=rf"{tmp_path}/notes\.pth: unrecognised checkpoint layout"):
        bb.create_backbone("vit_tiny_test", checkpoint=path)


def test_official_file_over_s3_goes_through_the_storage_handle(monkeypatch: pytest.MonkeyPatch) -> None:
    from dncut import storage

    options = object()
    files: dict[str, bytes] = {}
    seen: list[object] = []
    monkeypatch.setattr(storage, "read_bytes", lambda uri, s3=None: (seen.append(s3), files[uri])[1])
    import io

    buf = io.BytesIO()
    torch.save(to_official("dinov3", timm_state(spec(DINOV3), seed=8)), buf)
    files["s3://weights/dinov3_vits16_pretrain.pth"] = buf.getvalue()
    m = bb.create_backbone(DINOV3, checkpoint="s3://weights/dinov3_vits16_pretrain.pth",
                           store=Storage(options))  # type: ignore[arg-type]
    assert seen == [options] and m.name == DINOV3


def test_trust_key_reaches_the_training_model(tmp_path: Path) -> None:
    from dncut.config import load_config
    from dncut.train import build_model

    path = _with_objects(tmp_path)
    with pytest.raises(ValueError, match=r"with_objects\.pth.*model\.trusted_checkpoint: true"):
        build_model(load_config("configs/train/smoke.yaml", [f"model.checkpoint={path}"]))
    model = build_model(load_config("configs/train/smoke.yaml", [f"model.checkpoint={path}",
                                                                 "model.trusted_checkpoint=true"]))
    torch.manual_seed(7)
    ref = bb.create_backbone("vit_tiny_test").model.state_dict()
    assert all(torch.equal(model.encoder.model.state_dict()[k], v) for k, v in ref.items())
