"""The one inference path: image -> network input -> backbone -> NCut -> grid maps.

Training-time validation (``dncut.eval.validate``), the demo, the benches and the evaluation
jobs' Ray Data actors (``dncut.eval.stages.NCutPredictor``) all run these two steps, so the resize/pad rule,
the solver, its dtype and tolerance, and the sign rule cannot drift apart::

    image (H, W, 3) uint8
      -> network_input: resize, long side image_size, sides rounded to multiples of the stride
         (bilinear, PIL); or image_size None: pad bottom / right to a multiple of the stride
         with the backbone's mean colour (0 after its normalisation, as the peers pad tensors)
         -> input (Hc, Wc, 3) uint8, content (2,) = unpadded part
      -> Predictor: inputs of one size share one backbone call ((g, 3, Hc, Wc) uint8; the
         backbone scales and normalises), maps of one node count n = h * w share one NCut call
         (``dncut.eval.methods.ncut_maps``: float32 iterative solver at EVAL_TOL, eigh in float64)
         -> per image {<method>_map (h, w), <method>_mask (h, w) bool, tokencut_box (4,)}

Upsampling to the image and scoring are the next stage (``dncut.eval.stages.score_row``).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dncut.config import EvalMethod

METHODS: tuple[str, ...] = typing.get_args(EvalMethod)
"""Every evaluation method, in the config's order (``dncut.config.EvalMethod`` owns the list)."""


def input_geometry(height: int, width: int, *, stride: int, image_size: int | None) -> tuple[int, int, bool]:
    """Network input size of an image.

    Args:
        height: image height H.
        width: image width W.
        stride: backbone stride (patch size).
        image_size: long side to resize to (sides rounded to the nearest stride multiple);
            ``None`` = pad to the next multiple instead (the discovery protocol).

    Returns:
        ``(Hc, Wc, resize)``: the input size and whether the image is resized (else padded).
    """
    if image_size is None:
        return math.ceil(height / stride) * stride, math.ceil(width / stride) * stride, False
    scale = image_size / max(height, width)
    return _snap(height * scale, stride), _snap(width * scale, stride), True


def _snap(length: float, stride: int) -> int:
    """Nearest positive multiple of ``stride``."""
    return max(stride, int(round(length / stride)) * stride)


def network_input(image: np.ndarray, *, stride: int, image_size: int | None,
                  pad_rgb: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """``image (H, W, 3) uint8 -> (input (Hc, Wc, 3) uint8, content (Hv, Wv))``, see the module doc.

    Args:
        pad_rgb: padding colour, the backbone spec's ``pad_rgb``.
    """
    hc, wc, resize = input_geometry(image.shape[0], image.shape[1], stride=stride, image_size=image_size)
    if resize:
        net = np.asarray(Image.fromarray(image).resize((wc, hc), Image.BILINEAR), dtype=np.uint8)  # (Hc, Wc, 3)
        return net, (hc, wc)
    net = np.empty((hc, wc, 3), np.uint8)  # (Hc, Wc, 3), padded bottom / right
    net[...] = pad_rgb
    net[: image.shape[0], : image.shape[1]] = image
    return net, (image.shape[0], image.shape[1])


class Predictor:
    """Backbone + NCut on a batch of network inputs; one bad image fails alone.

    Args:
        backbone: a ``dncut.backbones.Backbone`` (RGB in [0, 1] -> (B, C, H/s, W/s)); used in
            eval mode, on ``device``.
        methods: subset of ``METHODS`` (``dncut.config.EvalMethod``).
        solver: NCut eigensolver (``cfg.ncut.solver``).
        device: where the backbone and the NCut run.
        found_head: FOUND's head (``dncut.eval.found.FoundHead``) trained on this backbone's
            features; required with method ``found``.
    """

    def __init__(self, backbone: torch.nn.Module, methods: Sequence[str], solver: str,
                 device: str | torch.device = "cpu", found_head: torch.nn.Module | None = None) -> None:
        from dncut.ncut import SOLVERS

        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"methods {bad or list(methods)} invalid; valid choices: {list(METHODS)}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown NCut solver {solver!r}; registered: {sorted(SOLVERS)}")
        if "found" in methods and found_head is None:
            raise ValueError("method found needs a FOUND head (eval.found_heads, `dncut found-train`)")
        self.backbone = backbone
        self.methods = tuple(dict.fromkeys(methods))
        self.solver = solver
        self.device = torch.device(device)
        self.found_head = found_head.eval().to(self.device) if found_head is not None else None

    def features(self, inputs: list[np.ndarray]) -> list[torch.Tensor]:
        """Same-size uint8 inputs ``(Hc, Wc, 3)`` -> feature maps ``(C, h, w)``, one per input
        (the caller holds eval / inference mode; ``predict`` does)."""
        x = torch.from_numpy(np.stack(inputs)).to(self.device)  # (g, Hc, Wc, 3) uint8
        return list(self.backbone(x.permute(0, 3, 1, 2)).float())  # (g, 3, Hc, Wc) -> g x (C, h, w)

    def _ncut(self, maps: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """NCut methods (``ncut_maps``) and FOUND's head (logits ``found_map``, ``found_mask`` = logits > 0)."""
        from dncut.eval.methods import ncut_maps

        out = ncut_maps(maps, [m for m in self.methods if m != "found"], solver=self.solver)
        if self.found_head is not None and "found" in self.methods:
            for found, m in zip(out, maps):
                logits = self.found_head(m.unsqueeze(0))[0].float().cpu().numpy()  # (h, w)
                found.update(found_map=logits, found_mask=logits > 0)
        return out

    @staticmethod
    def _each(fn: Callable, items: dict[int, Any], results: dict[int, Any], errors: dict[int, str]) -> None:
        """``results[i] = fn([items[i] ...])`` for all at once; if that raises, one by one, so that
        only the bad image fails (its reason in ``errors``)."""
        order = sorted(items)
        try:
            results.update(zip(order, fn([items[i] for i in order])))
        except Exception:  # noqa: BLE001
            for i in order:
                try:
                    results[i] = fn([items[i]])[0]
                except Exception as exc:  # noqa: BLE001
                    errors[i] = f"{type(exc).__name__}: {exc}"

    def predict(self, inputs: Sequence[np.ndarray | None]) -> tuple[list[dict | None], dict[int, str]]:
        """Grid maps of a batch.

        Args:
            inputs: network inputs ``(Hc, Wc, 3)`` uint8 (``network_input``); ``None`` = skip.

        Returns:
            ``(results, errors)``: per input ``{<method>_map, <method>_mask, tokencut_box}`` or
            ``None``; ``errors[i]`` the reason input ``i`` failed.
        """
        was_training = [m.training for m in self.backbone.modules()]
        self.backbone.eval()
        try:
            with torch.inference_mode():
                return self._predict(inputs)
        finally:
            for m, mode in zip(self.backbone.modules(), was_training):
                m.training = mode

    def _predict(self, inputs: Sequence[np.ndarray | None]) -> tuple[list[dict | None], dict[int, str]]:
        errors: dict[int, str] = {}
        by_size: dict[tuple[int, ...], dict[int, np.ndarray]] = {}  # the backbone needs one input size
        for i, x in enumerate(inputs):
            if x is not None:
                by_size.setdefault(tuple(x.shape), {})[i] = x
        maps: dict[int, torch.Tensor] = {}
        for group in by_size.values():
            self._each(self.features, group, maps, errors)
        by_nodes: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # NCut: one call per node count
        for i, m in maps.items():
            by_nodes.setdefault((m.shape[0], m.shape[1] * m.shape[2]), {})[i] = m
        found: dict[int, dict] = {}
        for group in by_nodes.values():
            self._each(self._ncut, group, found, errors)
        return [found.get(i) for i in range(len(inputs))], errors
