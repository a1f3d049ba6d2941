"""NCut evaluation methods: patch features -> foreground masks (pure torch / numpy, no Ray).

The evaluation methods are ``dncut.eval.predict.METHODS`` (``dncut.config.EvalMethod``): the
NCut methods ``NCUT_METHODS`` run here (``most``'s clustering in ``dncut.eval.most``), ``found``
is a trained 1x1 head (``dncut.eval.found``) whose logits only share the post-processing here.
Simple and TokenCut are batched: every image of a batch shares one grid size ``(h, w)`` and one
NCut call solves all their graphs at once.

* ``simple_ncut(features: (B, C, h, w)) -> (z2: (B, h, w), masks: (B, h, w) bool)``: the
  authors' "Simple" protocol (REFERENCE §2): keys L2-normalised, relu graph with τ = 0,
  normalized Laplacian, foreground = the minority side (flip z2 if
  0.5 < fraction(z2 > 0) < 1), mask = z2 > 0, no connected-component step.
* ``tokencut(features: (B, C, h, w)) -> TokenCutOutput`` (REFERENCE §3): binary graph
  τ = 0.2, eps 1e-5, generalized eigenvector y2 of (D − A) y = λ D y, bipartition
  y2 > mean(y2), seed = argmax |y2|, flip when the seed is background, keep the
  4-connected component holding the seed; box = component extent in patch units,
  half-open ``(x0, y0, x1, y1)`` (multiply by the patch size for pixels).

* ``ncut_maps(maps: list of (C, h_i, w_i), methods) -> per image {<method>_map, <method>_mask,
  tokencut_box, most_boxes}``: the ``NCUT_METHODS`` on maps of any grids; maps with the same node count n = h * w
  share one batched NCut call (what the evaluation job's actors run).

Precision: ``"eigh"`` (the reference) solves in float64; iterative solvers run in float32 at
``EVAL_TOL`` (1e-5): masks need z2's sign pattern, not gradients.

Post-processing helpers (numpy, one image at a time):

* ``upsample_map(map: (h, w), size=(H, W), canvas=..., content=...) -> (H, W) float``:
  bilinear upsampling of a grid map to the image, with the padding removed first.
* ``upsample_mask(mask: (h, w) bool, ...) -> (H, W) bool``: the same, thresholded at 0.5.
* ``clean_binary(mask: (H, W) bool) -> (H, W) bool``: TokenCut's clean-up of the bilateral
  solver's binary output (fill holes, keep the largest component).
* ``largest_component_box(mask: (h, w) bool) -> (4,)``: the box a ``simple`` mask gives for
  object discovery (largest 4-connected component, patch units).
* ``box_to_pixels(box, patch, size) -> (4,)``: patch-unit box -> pixel box, clipped to the
  image (TokenCut clips to the unpadded image size).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import Tensor

from dncut.config import EvalMethod
from dncut.ncut import normalized_cut

NCUT_METHODS: tuple[str, ...] = tuple(m for m in typing.get_args(EvalMethod) if m != "found")
"""The evaluation methods that cut the patch graph (every ``EvalMethod`` but FOUND's trained head)."""

SIMPLE_TAU = 0.0  # relu graph threshold of the Simple protocol (authors)
TOKENCUT_TAU = 0.2  # TokenCut's binary graph threshold
TOKENCUT_EPS = 1e-5  # TokenCut's weight of the removed edges
EVAL_TOL = 1e-5  # iterative solvers' residual tolerance here: masks need z2's sign pattern, not gradients
CONSTANT_TOL = 1e-5  # patches whose unit features all agree this closely: no graph to cut (error)
EXACT_SOLVERS = ("eigh",)  # the float64 references; iterative solvers run in float32 here (inference)


def _solver_dtype(solver: str) -> torch.dtype:
    return torch.float64 if solver in EXACT_SOLVERS else torch.float32


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, C, h, w) tensor, got {shape}")
    if features.shape[2] * features.shape[3] < 2:
        raise ValueError(f"the patch grid needs at least 2 cells, got {tuple(features.shape[2:])}")
    unit = F.normalize(features.detach().flatten(2).float(), dim=1)  # (B, C, n): what the graph compares
    same = (unit - unit[:, :, :1]).abs().amax(dim=(1, 2)) <= CONSTANT_TOL  # (B,); NaN: False (the NCut raises)
    if bool(same.any()):
        raise ValueError(f"features are the same for every patch (after L2 normalisation) in batch items "
                         f"{torch.nonzero(same).flatten().tolist()}: the graph has no cut, any mask would be arbitrary")


def _tokens(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, n, C) with n = h * w in row-major order."""
    return features.flatten(2).transpose(1, 2)  # (B, h*w, C)


# --------------------------------------------------------------------------- Simple
def simple_ncut(features: Tensor, *, solver: str, tol: float | None = EVAL_TOL) -> tuple[Tensor, Tensor]:
    """The authors' "Simple" NCut evaluation (REFERENCE §2).

    Args:
        features: ``(B, C, h, w)`` patch features (keys for a ViT).
        solver: NCut eigensolver (a key of ``dncut.ncut.SOLVERS``); callers pass the config's
            ``ncut.solver`` (its one default), ``"eigh"`` is the float64 reference.
        tol: residual tolerance of an iterative solver (``normalized_cut``), which runs in
            float32 here (``"eigh"``, the reference, in float64). With ``EVAL_TOL`` (1e-5) z2 is
            within ~tol * 2 / gap of the exact one, so only nodes that close to the threshold
            can differ (agreement with the exact solver and the peers: ``docs/benchmarks.md``).

    Returns:
        ``(z2 (B, h, w), masks (B, h, w) bool)``: z2 oriented so that its positive side is the
        minority (foreground) side unless every entry is positive; mask = z2 > 0.
    """
    _check_features(features)
    b, _, h, w = features.shape
    z = _simple_z(_tokens(features), solver, tol).reshape(b, h, w)  # (B, h, w)
    return z, z > 0


def _simple_z(tokens: Tensor, solver: str, tol: float | None) -> Tensor:
    """Oriented z2 ``(B, n)`` of the Simple protocol for tokens ``(B, n, C)`` (any grid)."""
    result = normalized_cut(tokens, normalize=True, tau=SIMPLE_TAU, affinity="relu",
                            laplacian="normalized", solver=solver, tol=tol, solver_dtype=_solver_dtype(solver))
    z = result.eigvec  # (B, n)
    frac = (z > 0).float().mean(-1)  # (B,)
    flip = (frac > 0.5) & (frac < 1.0)  # (B,)
    return torch.where(flip.unsqueeze(-1), -z, z)  # (B, n)


# --------------------------------------------------------------------------- TokenCut
@dataclass
class TokenCutOutput:
    """What :func:`tokencut` returns for a batch.

    Attributes:
        eigvec: ``(B, h, w)`` generalized eigenvector y2, oriented so the seed is positive
            relative to the mean (the seed lies in the foreground).
        masks: ``(B, h, w)`` bool, the 4-connected component of the bipartition holding the seed.
        bipartition: ``(B, h, w)`` bool, y2 > mean(y2) after orientation (before the component step).
        seeds: ``(B,)`` int64 flat index (row-major) of the seed patch.
        boxes: ``(B, 4)`` int64 half-open box ``(x0, y0, x1, y1)`` of the component in patch units.
    """

    eigvec: Tensor
    masks: Tensor
    bipartition: Tensor
    seeds: Tensor
    boxes: Tensor


def seed_component(bipartition: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 4-connected component of ``bipartition`` that holds ``seed``, and its box.

    Args:
        bipartition: ``(h, w)`` bool foreground patches; ``bipartition.flat[seed]`` must be True.
        seed: flat (row-major) index of the seed patch.

    Returns:
        ``(component (h, w) bool, box (4,) int64)``, box = ``(x0, y0, x1, y1)`` half-open, patch units.
    """
    labels, _ = ndi.label(bipartition)  # default structure: 4-connectivity in 2-D
    label = labels.flat[seed]
    if label == 0:
        raise ValueError(f"seed {seed} is not in the foreground of the bipartition")
    component = labels == label  # (h, w)
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)
    return component, box


def largest_component_box(mask: np.ndarray) -> np.ndarray:
    """Box of the largest 4-connected component of a grid mask (the box of a ``simple`` mask).

    Args:
        mask: ``(h, w)`` bool.

    Returns:
        ``(4,)`` int64 half-open ``(x0, y0, x1, y1)`` in patch units; the whole grid if empty.
    """
    labels, count = ndi.label(mask)
    if count == 0:
        return np.array([0, 0, mask.shape[1], mask.shape[0]], dtype=np.int64)
    sizes = np.bincount(labels.ravel())  # (count + 1,)
    sizes[0] = 0
    seed = int(np.flatnonzero(labels.ravel() == sizes.argmax())[0])
    return seed_component(mask, seed)[1]


def tokencut(features: Tensor, *, tau: float = TOKENCUT_TAU, eps: float = TOKENCUT_EPS,
             solver: str, tol: float | None = EVAL_TOL) -> TokenCutOutput:
    """TokenCut (Wang et al.) on a batch of feature maps (REFERENCE §3).

    Args:
        features: ``(B, C, h, w)`` patch features (keys for a ViT).
        tau: binary graph threshold on the cosine similarity (0.2).
        eps: weight of the edges below ``tau`` (1e-5).
        solver: NCut eigensolver (a key of ``dncut.ncut.SOLVERS``).
        tol: residual tolerance of an iterative solver, as in :func:`simple_ncut`.

    Returns:
        :class:`TokenCutOutput` with y2 maps, component masks, bipartitions, seeds and boxes.
    """
    _check_features(features)
    b, _, h, w = features.shape
    y, part, seeds = _tokencut_y(_tokens(features), tau, eps, solver, tol)  # (B, n), (B, n), (B,)
    part_np = part.reshape(b, h, w).cpu().numpy()  # (B, h, w)
    masks, boxes = [], []
    for i in range(b):
        component, box = seed_component(part_np[i], int(seeds[i]))
        masks.append(component)
        boxes.append(box)
    return TokenCutOutput(
        eigvec=y.reshape(b, h, w),  # (B, h, w)
        masks=torch.from_numpy(np.stack(masks)).to(features.device),  # (B, h, w)
        bipartition=part.reshape(b, h, w),  # (B, h, w)
        seeds=seeds,
        boxes=torch.from_numpy(np.stack(boxes)),  # (B, 4)
    )


def _tokencut_y(tokens: Tensor, tau: float, eps: float, solver: str,
                tol: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """TokenCut's NCut on tokens ``(B, n, C)`` (any grid): oriented y2 ``(B, n)``, bipartition
    ``(B, n)`` bool (seed side True) and seeds ``(B,)``."""
    unit = F.normalize(tokens.detach().float(), dim=-1)  # (B, n, C)
    complete = (unit @ unit.transpose(1, 2)).flatten(1).amin(-1) > tau  # (B,): every pair above tau
    if bool(complete.any()):
        raise ValueError(f"TokenCut: every patch pair is more similar than tau={tau} in batch items "
                         f"{torch.nonzero(complete).flatten().tolist()}: the binary graph is complete, no cut")
    result = normalized_cut(tokens, normalize=True, tau=tau, affinity="binary", laplacian="normalized",
                            solver=solver, eps=eps, tol=tol, solver_dtype=_solver_dtype(solver))
    y = result.gen_eigvec  # (B, n)
    part = y > y.mean(-1, keepdim=True)  # (B, n)
    seeds = y.abs().argmax(-1)  # (B,)
    seed_fg = part.gather(-1, seeds.unsqueeze(-1)).squeeze(-1)  # (B,)
    y = torch.where(seed_fg.unsqueeze(-1), y, -y)  # (B, n)
    part = torch.where(seed_fg.unsqueeze(-1), part, ~part)  # (B, n)
    return y, part, seeds


# --------------------------------------------------------------------------- any grids at once
def ncut_maps(maps: Sequence[Tensor], methods: Sequence[str], *, solver: str,
              tol: float | None = EVAL_TOL) -> list[dict[str, np.ndarray]]:
    """The NCut methods on feature maps of any grids: maps with the same node count n = h * w (e.g.
    13 x 20 and 20 x 13) share one batched NCut call per method, then each is post-processed
    on its own grid (what the evaluation job's actors run).

    Args:
        maps: ``(C, h_i, w_i)`` feature maps, one per image.
        methods: a subset of ``NCUT_METHODS``.
        solver, tol: as :func:`simple_ncut`.

    Returns:
        Per image ``{<method>_map (h, w) float, <method>_mask (h, w) bool}`` plus
        ``tokencut_box (4,) int64`` (patch units), as :func:`simple_ncut` / :func:`tokencut` give,
        and ``most_boxes (k, 4)`` (patch units, largest cluster first; ``most_map`` / ``most_mask``
        are its seeds), as :func:`dncut.eval.most.most_clusters` gives.
    """
    for m in maps:
        _check_features(m.unsqueeze(0))
    out: list[dict[str, np.ndarray]] = [{} for _ in maps]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault((m.shape[0], m.shape[1] * m.shape[2]), []).append(i)
    for idx in groups.values():
        tokens = torch.stack([maps[i].flatten(1).T for i in idx])  # (g, n, C)
        grids = [tuple(maps[i].shape[1:]) for i in idx]
        if "simple" in methods:
            z = _simple_z(tokens, solver, tol).cpu().numpy()  # (g, n)
            for k, i in enumerate(idx):
                out[i]["simple_map"] = z[k].reshape(grids[k])
                out[i]["simple_mask"] = out[i]["simple_map"] > 0
        if "tokencut" in methods:
            y, part, seeds = (t.cpu().numpy() for t in _tokencut_y(tokens, TOKENCUT_TAU, TOKENCUT_EPS, solver, tol))
            for k, i in enumerate(idx):
                component, box = seed_component(part[k].reshape(grids[k]), int(seeds[k]))
                out[i].update(tokencut_map=y[k].reshape(grids[k]), tokencut_mask=component, tokencut_box=box)
        if "most" in methods:
            from dncut.eval.most import most_clusters

            for k, i in enumerate(idx):
                boxes, _, seeds_grid = most_clusters(tokens[k].cpu().numpy(), *grids[k])
                out[i].update(most_map=seeds_grid.astype(np.float32), most_mask=seeds_grid, most_boxes=boxes)
    return out


# --------------------------------------------------------------------------- upsampling
def _check_geometry(grid: tuple[int, int], canvas: tuple[int, int] | None,
                    content: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    canvas = tuple(canvas) if canvas is not None else grid
    content = tuple(content) if content is not None else canvas
    if content[0] > canvas[0] or content[1] > canvas[1] or min(content) < 1:
        raise ValueError(f"content {content} must be a non-empty top-left part of the canvas {canvas}")
    return canvas, content


def upsample_map(values: np.ndarray, size: tuple[int, int], *, canvas: tuple[int, int] | None = None,
                 content: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinearly upsample a grid map to the image, removing the padding first.

    The grid covers a ``canvas`` (the network input, H_c x W_c pixels) whose top-left
    ``content`` part is the image (the rest is padding); the content is then resized to
    ``size``. With no padding (``content == canvas``) this is one bilinear resize
    ``(h, w) -> size`` (align_corners=False), as the Simple protocol does.

    Args:
        values: ``(h, w)`` float map (e.g. z2, or a mask as 0/1).
        size: ``(H, W)`` of the original image.
        canvas: ``(H_c, W_c)`` network input size in pixels; default ``(h, w)``.
        content: ``(H_v, W_v)`` unpadded part of the canvas; default the whole canvas.

    Returns:
        ``(H, W)`` float32 map.
    """
    values = np.array(values, dtype=np.float32)  # a writable copy for torch
    if values.ndim != 2:
        raise ValueError(f"values must be an (h, w) map, got shape {values.shape}")
    canvas, content = _check_geometry(values.shape, canvas, content)
    x = torch.from_numpy(values)[None, None]  # (1, 1, h, w)
    if content != canvas:
        x = F.interpolate(x, size=canvas, mode="bilinear", align_corners=False)  # (1, 1, Hc, Wc)
        x = x[:, :, : content[0], : content[1]]  # (1, 1, Hv, Wv)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)  # (1, 1, H, W)
    return x[0, 0].numpy()  # (H, W)


def upsample_mask(mask: np.ndarray, size: tuple[int, int], *, canvas: tuple[int, int] | None = None,
                  content: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinearly upsample a grid mask to the image and threshold it at 0.5.

    Args:
        mask: ``(h, w)`` bool.
        size: ``(H, W)`` of the original image.
        canvas: see :func:`upsample_map`.
        content: see :func:`upsample_map`.

    Returns:
        ``(H, W)`` bool mask.
    """
    return upsample_map(np.asarray(mask, dtype=np.float32), size, canvas=canvas, content=content) > 0.5


def image_mask(method: str, grid_map: np.ndarray, grid_mask: np.ndarray, size: tuple[int, int], *,
               canvas: tuple[int, int] | None = None, content: tuple[int, int] | None = None) -> np.ndarray:
    """A method's foreground mask at the image's size ``(H, W)`` bool, as that method's authors
    upsample it: ``found``: its logits ``grid_map`` bilinearly upsampled, > 0 (sigmoid > 0.5, FOUND);
    every other method: its grid mask upsampled and thresholded at 0.5 (:func:`upsample_mask`)."""
    if method == "found":
        return upsample_map(grid_map, size, canvas=canvas, content=content) > 0
    return upsample_mask(grid_mask, size, canvas=canvas, content=content)


def clean_binary(mask: np.ndarray) -> np.ndarray:
    """TokenCut's clean-up of the solver's binary mask: fill holes, keep the largest component.

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` bool; an empty mask stays empty.
    """
    filled = ndi.binary_fill_holes(np.asarray(mask, dtype=bool))  # (H, W)
    labels, count = ndi.label(filled)
    if count <= 1:
        return filled
    sizes = np.bincount(labels.ravel())  # (count + 1,)
    sizes[0] = 0
    return labels == int(sizes.argmax())


def box_to_pixels(box: np.ndarray, patch: int, size: tuple[int, int]) -> np.ndarray:
    """Patch-unit box -> pixel box, clipped to the unpadded image (as TokenCut).

    Args:
        box: ``(4,)`` half-open ``(x0, y0, x1, y1)`` in patch units.
        patch: patch size (stride) in pixels of the network input.
        size: ``(H, W)`` of the image the box must fit (no padding).

    Returns:
        ``(4,)`` float64 half-open pixel box.
    """
    px = np.asarray(box, dtype=np.float64) * patch  # (4,)
    px[2] = min(px[2], size[1])
    px[3] = min(px[3], size[0])
    return px
