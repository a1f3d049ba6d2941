"""Checkpoint layouts: read a checkpoint file and map its tensors onto a backbone's network.

``dncut.backbones`` builds the network (a timm / torchvision module); this module finds the
backbone's state dict inside the files users have and renames it to that module's keys::

    read_checkpoint(uri, store) -> obj  ->  unwrap_checkpoint(obj) -> (state dict, layout name)
        -> checkpoint_filter_fn(state dict, model) -> {model key: tensor}  ->  load_weights(...)

Layouts recognised (detected from the keys, never from the file name):

- wrappers, stripped first and nested in any order: ``torch.compile`` (``_orig_mod.``) and
  DDP / DataParallel (``module.``), with timm's own ``timm.models.clean_state_dict``;
- official DINO (``teacher``/``student``, ``backbone.``), MoCo v3 (``state_dict`` with
  ``base_encoder.``; the momentum encoder and predictor are dropped), MAE (``model``; the
  decoder and ``mask_token`` are dropped), timm / torchvision plain state dicts, EfficientNet-PyTorch
  names (mapped by position), and dncut's own export (``{"format": "dncut-backbone", ...}``);
- official DINOv2 hub files (``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``,
  ...: ``mask_token`` of shape (1, C), ``register_tokens``, a ``pos_embed`` holding the class position
  and a 37 x 37 grid) through timm's ``vision_transformer.checkpoint_filter_fn``, which folds the
  class position into ``cls_token`` for the register models and renames the tokens;
- official DINOv3 files (``storage_tokens``, ``mask_token``, ``rope_embed.periods``,
  ``ls1.gamma``, ``qkv.bias`` + ``qkv.bias_mask``) through timm's ``eva.checkpoint_filter_fn``
  (``storage_tokens`` -> ``reg_token``, ``ls1.gamma`` -> ``gamma_1``; the rotary periods are
  recomputed by the model, not loaded). A ``qkv.bias`` that the model has no parameter for is
  dropped when it is all zero (the released distilled models) and reported as unexpected otherwise.

``s3://`` files are read through a ``dncut.storage.Storage`` handle. Files are unpickled with
``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, the ``args`` entry of DINO and MAE
files); ``trusted=True`` (config ``model.trusted_checkpoint``) allows full unpickling for files that
hold other Python objects (numpy scalars, ``pathlib`` paths) -- only for files you trust.
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dncut.storage import Storage

EXPORT_FORMAT = "dncut-backbone"
# Keys of other networks that live beside a backbone in self-supervised checkpoints.
_FOREIGN_PREFIXES = ("decoder", "mask_token", "predictor.", "momentum_encoder.", "head.", "fc_norm.")
TRUST_KEY = "model.trusted_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` did: the detected layout and the keys that did not line up."""

    source: str
    layout: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def has_prefix(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``key`` starts with one of ``prefixes``."""
    return any(key.startswith(p) for p in prefixes)


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked`` counters (no influence on the features)."""
    return key.endswith("num_batches_tracked")


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


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


def read_checkpoint(uri: str, store: Storage | None = None, *, trusted: bool = False) -> Any:
    """Read a local or ``s3://`` checkpoint on CPU: ``.safetensors`` (by name or content) with
    ``safetensors``, anything else with ``torch.load``.

    Args:
        uri: Local path or ``s3://`` URI.
        store: Storage handle for ``s3://`` (default: the environment's S3 settings).
        trusted: Full unpickling (``weights_only=False``): runs code stored in the file; only for
            files you trust (config ``model.trusted_checkpoint``).

    Raises:
        ValueError: an unreadable safetensors file, or (untrusted) a file holding Python objects
            other than tensors and containers; the message names ``uri`` and the config key to set.
    """
    data = (store or Storage()).read_bytes(str(uri))
    if _is_safetensors(uri, data):
        return read_safetensors(data, str(uri))
    if trusted:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        what = ", ".join(unsafe[:3]) if unsafe else type(err).__name__
        raise CheckpointError(
            f"{uri}: holds Python objects besides tensors ({what}); if you trust this file, set "
            f"{TRUST_KEY}: true (full unpickling, which can run code stored in it)") from err


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def _strip(state_dict: dict[str, Tensor], prefix: str, keep_others: bool) -> dict[str, Tensor]:
    """Remove ``prefix`` from keys that carry it; drop the others unless ``keep_others``."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        elif keep_others:
            out[k] = v
    return out


def unwrap_checkpoint(obj: Any, source: str = "<memory>") -> tuple[dict[str, Tensor], str]:
    """Find the state dict inside a checkpoint object; return it and the layout's name
    (``dncut``, ``dino``, ``dino-student``, ``mocov3``, ``state_dict``, ``mae``, ``plain``).

    Raises:
        CheckpointError: not a dict, or no state dict found (names ``source``).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: checkpoint is a {type(obj).__name__}, expected a dict")
    if obj.get("format") == EXPORT_FORMAT:
        return dict(obj["state_dict"]), "dncut"
    for key, layout in (("teacher", "dino"), ("student", "dino-student"), ("state_dict", "state_dict"),
                        ("model", "mae")):
        if isinstance(obj.get(key), Mapping):
            sd = dict(obj[key])
            if layout == "state_dict" and any("base_encoder." in k for k in sd):
                layout = "mocov3"
            return sd, layout
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if tensors and len(tensors) >= len(obj) // 2:
        return tensors, "plain"
    raise CheckpointError(f"{source}: unrecognised checkpoint layout; top-level keys: {sorted(map(str, obj))[:20]}")


def official_layout(state_dict: Mapping[str, Any]) -> str | None:
    """``dinov2`` / ``dinov3`` for the official release layouts (after wrapper prefixes are
    stripped), else ``None``. DINOv2: ``register_tokens``, or a ``mask_token`` of shape (1, C)
    (MAE's is (1, 1, C)); DINOv3: ``storage_tokens``."""
    if "storage_tokens" in state_dict:
        return "dinov3"
    mask = state_dict.get("mask_token")
    if "register_tokens" in state_dict or (isinstance(mask, Tensor) and mask.ndim == 2):
        return "dinov2"
    return None


def _timm_filter(layout: str, model: nn.Module) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]:
    """timm's own converter of an official release into its layout."""
    if layout == "dinov3":
        from timm.models.eva import Eva, checkpoint_filter_fn
        kind = Eva
    else:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
        kind = VisionTransformer
    if not isinstance(model, kind):
        raise CheckpointError(f"an official {layout.upper()} file loads into a {kind.__name__}, not a "
                              f"{type(model).__name__}: pick a {layout} backbone (`dncut backbones`)")
    return checkpoint_filter_fn


def _convert_official(sd: dict[str, Tensor], layout: str, model: nn.Module) -> dict[str, Tensor]:
    """An official DINOv2 / DINOv3 state dict in ``model``'s (timm's) key names."""
    filter_fn = _timm_filter(layout, model)
    kept: dict[str, Tensor] = {}
    if layout == "dinov3":
        own = dict(model.named_parameters())
        for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
            if k.replace("qkv.bias", "q_bias") not in own:
                bias = sd.pop(k)  # (3C,) q, k, v; timm's filter would drop it with a print
                if bias.count_nonzero():
                    kept[k] = bias  # reported as unexpected: the model cannot hold it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's resampling notices
        out = filter_fn(dict(sd), model)
    return {**out, **kept}


def _map_in_order(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map foreign key names onto ``model``'s by position (counters skipped); shapes must agree."""
    src = [k for k in state_dict if not is_counter(k)]
    dst = [k for k, v in model.state_dict().items() if not is_counter(k)]
    if len(src) != len(dst):
        raise ValueError(f"cannot map by order: checkpoint has {len(src)} tensors, model has {len(dst)}")
    ref = model.state_dict()
    bad = [(s, d) for s, d in zip(src, dst) if state_dict[s].shape != ref[d].shape]
    if bad:
        s, d = bad[0]
        raise ValueError(f"cannot map by order: {s} {tuple(state_dict[s].shape)} vs {d} {tuple(ref[d].shape)}"
                         f" ({len(bad)} mismatches)")
    return {d: state_dict[s] for s, d in zip(src, dst)}


def resample_pos_embed(pos_embed: Tensor, model: nn.Module) -> Tensor:
    """A checkpoint's ViT position embedding ``(1, n_prefix + g*g, C)`` resized (timm's bicubic
    ``resample_abs_pos_embed``) to ``model``'s grid; returned unchanged when not square-resizable
    (then reported as a shape mismatch). ``n_prefix`` is 0 for ``no_embed_class`` models."""
    from timm.layers import resample_abs_pos_embed

    target = model.pos_embed
    if pos_embed.shape == target.shape:
        return pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    old = int(round(math.sqrt(pos_embed.shape[1] - prefix)))
    if old * old != pos_embed.shape[1] - prefix or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                                  num_prefix_tokens=prefix)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """Remap a backbone state dict from any supported layout to ``model``'s key names.

    Args:
        state_dict: Tensors of an unwrapped checkpoint (see ``unwrap_checkpoint``).
        model: The timm/torchvision module the keys are for (``Backbone.model``).

    Returns:
        A state dict with ``model``'s key names: ``_orig_mod.``/``module.`` wrappers stripped (timm's
        ``clean_state_dict``), ``base_encoder.`` keeps the MoCo v3 query encoder only, ``backbone.``
        keeps the DINO backbone only, official DINOv2 / DINOv3 files converted by timm's filters,
        EfficientNet-PyTorch ``_conv_stem``-style names mapped by position, keys of heads / decoders /
        predictors that ``model`` lacks dropped, a ViT ``pos_embed`` resized to the model's grid.
        Keys ``model`` does not know are left in for the caller to report.
    """
    from timm.models import clean_state_dict

    sd = clean_state_dict({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
    if any(k.startswith("base_encoder.") for k in sd):
        sd = _strip(sd, "base_encoder.", keep_others=False)
    if any(k.startswith("backbone.") for k in sd):
        sd = _strip(sd, "backbone.", keep_others=False)
    sd = clean_state_dict(sd)  # a wrapper inside the DINO / MoCo v3 prefix
    layout = official_layout(sd)
    if layout is not None:
        sd = _convert_official(sd, layout, model)
    if "_conv_stem.weight" in sd:
        sd = _map_in_order(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not has_prefix(k, _FOREIGN_PREFIXES)}
    if "pos_embed" in sd and isinstance(getattr(model, "pos_embed", None), Tensor):
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model)
    return sd


def load_weights(model: nn.Module, obj: Any, *, name: str, used_keys: list[str], source: str = "<memory>",
                 max_missing_fraction: float = 0.5) -> LoadReport:
    """Load a checkpoint object (as ``read_checkpoint`` returns it) into ``model``.

    Args:
        model: The network (``Backbone.model``).
        obj: Checkpoint in any supported layout.
        name: The backbone's name, for messages and the export check.
        used_keys: ``model`` keys that influence the features (``Backbone.used_state_keys()``).
        source: Where it came from, for messages.
        max_missing_fraction: Raise if more than this fraction of ``used_keys`` is missing.

    Returns:
        A ``LoadReport``. Missing / unexpected keys also raise a ``UserWarning``.

    Raises:
        CheckpointError: unknown layout, shape mismatches, or mostly missing weights (names ``source``).
    """
    raw, layout = unwrap_checkpoint(obj, source)
    if layout == "dncut" and obj.get("backbone") != name:
        warnings.warn(f"{source}: exported from backbone {obj.get('backbone')!r}, loading into {name!r}",
                      stacklevel=3)
    try:
        sd = checkpoint_filter_fn(raw, model)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{source} ({layout}): {err}") from err
    layout = official_layout(raw) or layout
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} ({layout}) does not fit {name}: " + "; ".join(mismatched[:5])
                              + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""))
    missing = tuple(k for k in used_keys if k not in sd)
    unexpected = tuple(k for k in sd if k not in own)
    if len(missing) > max_missing_fraction * len(used_keys):
        raise CheckpointError(f"{source} ({layout}) is missing {len(missing)} of {len(used_keys)} {name} tensors"
                              f" (e.g. {list(missing[:5])}); checkpoint keys look like {list(raw)[:5]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing or unexpected:
        warnings.warn(f"{source} ({layout}) -> {name}: {len(missing)} missing {list(missing[:8])}, "
                      f"{len(unexpected)} unexpected {list(unexpected[:8])}", stacklevel=3)
    loaded = sum(1 for k in sd if k in own)
    return LoadReport(source=str(source), layout=layout, loaded=loaded, missing=missing, unexpected=unexpected)
