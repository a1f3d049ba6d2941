"""NCut training losses: mask consistency with sign handling, structural regularization.

Sec. 3.3-3.4 of the paper (Eq. 9-12) with the sign rule of the authors' code (REFERENCE §2).
The NCut layer gives one eigenvector per aligned overlap map; masks are
``sigmoid(z2 / T)``. The online branch's mask ``m1`` is pulled towards the (detached)
target branch's mask ``m2`` or its complement ``1 - m2`` (an eigenvector's sign is
arbitrary), and pushed away from three collapse templates (horizontal halves, vertical
halves, uniform).

Masks are row-major: a (B, n) eigenvector of an (h, w) map is ``m.reshape(B, h, w)``.

Shapes:
    masks_from_eigvec(z2 (B, n)) -> (B, n)
    orient_and_filter(m1 (B, n), m2 (B, n)) -> (m2_oriented (B, n), keep (B,), iou (B,))
    bce(pred (B, ...), target (B, ...)) -> (B,)
    mask_consistency_loss(m1, m2, keep (B,)) -> ()
    pixel_consistency_loss(f1 (B, C, h, w), f2 (B, C, h, w), keep (B,)) -> ()
    mask_templates(m1 (B, h, w)) -> (B, 3, h, w)
    structural_regularization(m1 (B, h, w)) -> ()
    NCutLoss()(z_online (B, h, w), z_target (B, h, w)) -> (loss (), parts dict)
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

Consistency = Literal["mask", "pixel"]

BCE_EPS = 1e-6
"""Predictions are clamped to [BCE_EPS, 1 - BCE_EPS] before the log: a saturated sigmoid
(exactly 0 or 1 in float32) would give log(0) = -inf. Each BCE term is then bounded by
-log(1e-6) ~ 13.8 nats, which also bounds the (maximised) regularization terms; the clamp
stops the gradient of entries that are already that saturated."""

IOU_TOL = 1e-6
"""Slack in ``iou >= threshold`` so that a threshold lowered by repeated float steps
(0.5 - 0.05 = 0.44999...) still admits an IoU of exactly 0.45."""

TEMPLATE_NAMES = ("horizontal", "vertical", "uniform")


# --------------------------------------------------------------------------- masks and signs


def masks_from_eigvec(z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Soft foreground masks from NCut eigenvectors.

    Args:
        z2: (B, n) or (B, h, w) second eigenvectors.
        temperature: T in sigmoid(z2 / T), > 0 (0.05 in the authors' code).

    Returns:
        Masks in (0, 1), same shape as ``z2``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.sigmoid(z2 / temperature)


def binary_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of the masks ``a > threshold`` and ``b > threshold``, per sample.

    Args:
        a: (B, ...) soft masks.
        b: (B, ...) soft masks.
        threshold: binarisation level.

    Returns:
        (B,) float IoU; 1 where both binary masks are empty (identical).
    """
    a_bin = a.detach().flatten(1) > threshold  # (B, n)
    b_bin = b.detach().flatten(1) > threshold  # (B, n)
    inter = (a_bin & b_bin).sum(1).float()
    union = (a_bin | b_bin).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def pass_threshold(
    iou: torch.Tensor, iou_threshold: float = 0.5, min_pass: int = 20, step: float = 0.05
) -> float:
    """The IoU threshold after lowering: start at ``iou_threshold``, lower by ``step`` until
    at least ``min(min_pass, B)`` samples have ``iou >= threshold`` (see ``IOU_TOL``).

    Args:
        iou: (B,) per-sample IoUs in [0, 1].
        iou_threshold: starting threshold.
        min_pass: how many samples must pass (capped at B).
        step: decrement, > 0.

    Returns:
        The threshold used (<= 0 only when fewer samples would pass otherwise).
    """
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if min_pass < 1:
        raise ValueError(f"min_pass must be >= 1, got {min_pass}")
    needed = min(min_pass, iou.numel())
    threshold = float(iou_threshold)
    for _ in range(math.ceil(max(threshold, 0.0) / step) + 1):
        if int((iou >= threshold - IOU_TOL).sum()) >= needed:
            break
        threshold -= step
    return threshold


def orient_and_filter(
    m1: torch.Tensor,
    m2: torch.Tensor,
    *,
    iou_threshold: float = 0.5,
    min_pass: int = 20,
    step: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resolve the eigenvector sign of ``m2`` against ``m1`` and select reliable samples.

    The authors' rule: per sample, binarise at 0.5 and compute IoU(m1, m2) and
    IoU(m1, 1 - m2); keep the orientation with the higher IoU (a tie keeps ``m2``). A sample
    enters the loss when that IoU >= threshold, the threshold starting at ``iou_threshold``
    and lowered by ``step`` until at least ``min(min_pass, B)`` samples pass
    (``pass_threshold``). Pairs whose masks disagree whatever the sign carry no usable
    signal, but the batch always keeps some samples.

    Args:
        m1: (B, n) or (B, h, w) online masks (only read; no gradient flows through the rule).
        m2: same shape, target masks.
        iou_threshold: starting IoU threshold (0.5).
        min_pass: minimum number of samples kept (20, capped at B).
        step: threshold decrement (0.05).

    Returns:
        m2_oriented: ``m2`` or ``1 - m2`` per sample, same shape as ``m2``.
        keep: (B,) bool, samples that pass.
        iou: (B,) IoU of ``m1`` with ``m2_oriented``.
    """
    if m1.shape != m2.shape:
        raise ValueError(f"m1 and m2 must have the same shape, got {tuple(m1.shape)} and {tuple(m2.shape)}")
    iou_same = binary_iou(m1, m2)  # (B,)
    iou_flip = binary_iou(m1, 1.0 - m2)  # (B,)
    use_flip = iou_flip > iou_same  # (B,)
    view = (-1,) + (1,) * (m2.ndim - 1)
    m2_oriented = torch.where(use_flip.view(view), 1.0 - m2, m2)  # use_flip as (B, 1, ...)
    iou = torch.where(use_flip, iou_flip, iou_same)
    threshold = pass_threshold(iou, iou_threshold, min_pass, step)
    keep = iou >= threshold - IOU_TOL
    return m2_oriented, keep, iou


# --------------------------------------------------------------------------- consistency


def bce(pred: torch.Tensor, target: torch.Tensor, eps: float = BCE_EPS) -> torch.Tensor:
    """Binary cross-entropy of Eq. 9, per sample.

    ``-(1/n) sum_i [target_i log pred_i + (1 - target_i) log(1 - pred_i)]`` over all
    non-batch entries. Argument roles follow the authors' code (``nn.BCELoss()(m1, m2)``):
    the log is taken of ``pred`` (the online mask, which gets the gradient) and ``target``
    is the soft label, so ``L_bce(m1, stop_grad(m2))`` of Eq. 10 is ``bce(m1, m2.detach())``
    and is minimised at ``m1 = m2``. (Eq. 9 as printed puts the log on its second argument.)
    ``pred`` is clamped to [eps, 1 - eps] (see ``BCE_EPS``).

    Args:
        pred: (B, ...) probabilities.
        target: (B, ...) probabilities, same shape.
        eps: clamp for the log.

    Returns:
        (B,) mean BCE per sample.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = pred.flatten(1).clamp(eps, 1.0 - eps)  # (B, n)
    t = target.flatten(1)  # (B, n)
    return -(t * torch.log(p) + (1.0 - t) * torch.log1p(-p)).mean(1)


def _masked_mean(per_sample: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B,) values over ``keep``; 0 (still in the graph) when nothing is kept."""
    if keep is None:
        return per_sample.mean()
    weights = keep.to(per_sample.dtype)  # (B,)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


def mask_consistency_loss(
    m1: torch.Tensor, m2: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """L_mask of Eq. 10: BCE(m1, stop_grad(m2)) averaged over the kept samples.

    Args:
        m1: (B, n) or (B, h, w) online masks.
        m2: same shape, target masks (already oriented); detached here.
        keep: (B,) bool samples to average over (None: all).

    Returns:
        Scalar loss.
    """
    return _masked_mean(bce(m1, m2.detach()), keep)


def pixel_consistency_loss(
    f1: torch.Tensor, f2: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-consistency ablation (Table 5): BYOL loss per aligned position.

    ``2 - 2 cos(f1[:, :, i, j], stop_grad(f2[:, :, i, j]))`` (the squared distance of the
    L2-normalised vectors), averaged over positions, then over kept samples.

    Args:
        f1: (B, C, h, w) aligned online features (predictor output).
        f2: (B, C, h, w) aligned target features; detached here.
        keep: (B,) bool samples to average over (None: all).

    Returns:
        Scalar loss in [0, 4].
    """
    if f1.shape != f2.shape or f1.ndim != 4:
        raise ValueError(f"f1 and f2 must both be (B, C, h, w), got {tuple(f1.shape)} and {tuple(f2.shape)}")
    cos = F.cosine_similarity(f1, f2.detach(), dim=1, eps=1e-8)  # (B, h, w)
    return _masked_mean((2.0 - 2.0 * cos).flatten(1).mean(1), keep)  # (B, h*w) -> (B,) -> ()


# --------------------------------------------------------------------------- regularization


def _split_means(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each mask over its > 0.5 entries and over its <= 0.5 entries.

    Args:
        m: (B, h, w) masks.

    Returns:
        (fg, bg), each (B,). A side with no entries takes the other side's mean (the
        global mean), so that all templates become uniform for a mask entirely on one side.
    """
    flat = m.flatten(1)  # (B, n)
    is_fg = (flat > 0.5).to(flat.dtype)  # (B, n)
    n_fg, n_bg = is_fg.sum(1), (1.0 - is_fg).sum(1)  # (B,)
    fg = (flat * is_fg).sum(1) / n_fg.clamp(min=1.0)
    bg = (flat * (1.0 - is_fg)).sum(1) / n_bg.clamp(min=1.0)
    fg = torch.where(n_fg > 0, fg, bg)
    bg = torch.where(n_bg > 0, bg, fg)
    return fg, bg


def mask_templates(m1: torch.Tensor) -> torch.Tensor:
    """The three collapse templates of Fig. 3, built from ``m1``'s own values (detached).

    With ``fg``/``bg`` = mean of m1 over its > 0.5 / <= 0.5 entries:
    0 horizontal: top ``h // 2`` rows ``fg``, the other rows ``bg``;
    1 vertical: left ``w // 2`` columns ``fg``, the other columns ``bg``;
    2 uniform: the global mean of m1 everywhere.
    The "flipped" horizontal/vertical versions (fg and bg swapped) are the spatial flips
    ``t.flip(-2)`` / ``t.flip(-1)`` (identical to swapping values when h, w are even).

    Args:
        m1: (B, h, w) masks.

    Returns:
        (B, 3, h, w) templates, no gradient.
    """
    if m1.ndim != 3:
        raise ValueError(f"m1 must be (B, h, w), got {tuple(m1.shape)}")
    m = m1.detach()
    batch, height, width = m.shape
    fg, bg = _split_means(m)  # (B,), (B,)
    fg, bg = fg[:, None, None], bg[:, None, None]  # (B, 1, 1)
    top = (torch.arange(height, device=m.device) < height // 2)[None, :, None]  # (1, h, 1)
    left = (torch.arange(width, device=m.device) < width // 2)[None, None, :]  # (1, 1, w)
    horizontal = torch.where(top, fg, bg).expand(batch, height, width)  # (B, h, w)
    vertical = torch.where(left, fg, bg).expand(batch, height, width)  # (B, h, w)
    uniform = m.flatten(1).mean(1)[:, None, None].expand(batch, height, width)  # (B, h, w)
    return torch.stack([horizontal, vertical, uniform], dim=1)  # (B, 3, h, w)


def template_bce(m1: torch.Tensor, eps: float = BCE_EPS) -> torch.Tensor:
    """BCE of ``m1`` against each template, per sample: (B, h, w) -> (B, 3).

    Columns: horizontal (min over the template and its flip), vertical (same), uniform.
    """
    templates = mask_templates(m1)  # (B, 3, h, w)
    h, v, u = templates.unbind(1)  # each (B, h, w)
    bce_h = torch.minimum(bce(m1, h, eps), bce(m1, h.flip(-2), eps))  # (B,)
    bce_v = torch.minimum(bce(m1, v, eps), bce(m1, v.flip(-1), eps))  # (B,)
    return torch.stack([bce_h, bce_v, bce(m1, u, eps)], dim=1)  # (B, 3)


def structural_regularization(m1: torch.Tensor, eps: float = BCE_EPS) -> torch.Tensor:
    """L_reg of Eq. 11: ``-sum_templates BCE(m1, template)``, averaged over the batch.

    Minimising it pushes ``m1`` away from the horizontal, vertical and uniform templates.
    Like the authors' code, it uses every sample (not only those passing the IoU filter).

    Args:
        m1: (B, h, w) online masks.
        eps: BCE clamp (bounds each term, see ``BCE_EPS``).

    Returns:
        Scalar (negative) regularization loss.
    """
    return -template_bce(m1, eps).sum(1).mean()


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of (B, n) tensors; 0 where either row is constant."""
    xc = x - x.mean(1, keepdim=True)  # (B, n)
    yc = y - y.mean(1, keepdim=True)  # (B, n)
    denom = xc.norm(dim=1) * yc.norm(dim=1)  # (B,)
    cov = (xc * yc).sum(1)
    return torch.where(denom > 1e-12, cov / denom.clamp(min=1e-12), torch.zeros_like(cov))


@torch.no_grad()
def template_similarity(m: torch.Tensor) -> dict[str, float]:
    """Collapse indicators in [0, 1] (1 = collapsed), averaged over the batch.

    horizontal: |Pearson correlation| of ``m`` with a top-half/bottom-half ±1 map (either
    orientation); vertical: same with left/right halves; uniform: ``1 - 2 std(m)`` (a binary
    mask covering a fraction p has std sqrt(p (1 - p)), so only a nearly constant map gets
    close to 1). A centred blob scores ~0 on horizontal/vertical.

    Args:
        m: (B, h, w) soft masks in [0, 1].

    Returns:
        {"horizontal": float, "vertical": float, "uniform": float}.
    """
    if m.ndim != 3:
        raise ValueError(f"m must be (B, h, w), got {tuple(m.shape)}")
    batch, height, width = m.shape
    flat = m.detach().float().flatten(1)  # (B, n)
    rows = torch.arange(height, device=m.device)[:, None].expand(height, width)  # (h, w)
    cols = torch.arange(width, device=m.device)[None, :].expand(height, width)  # (h, w)
    halves_h = torch.where(rows < height // 2, 1.0, -1.0).reshape(1, -1).expand(batch, -1)  # (B, n)
    halves_v = torch.where(cols < width // 2, 1.0, -1.0).reshape(1, -1).expand(batch, -1)  # (B, n)
    horizontal = _pearson(flat, halves_h).abs()  # (B,)
    vertical = _pearson(flat, halves_v).abs()  # (B,)
    uniform = (1.0 - 2.0 * flat.std(1, unbiased=False)).clamp(0.0, 1.0)  # (B,)
    return {"horizontal": float(horizontal.mean()), "vertical": float(vertical.mean()),
            "uniform": float(uniform.mean())}


def is_collapsed(sim: dict[str, float], threshold: float = 0.9) -> bool:
    """True when any collapse indicator of ``template_similarity`` reaches ``threshold``."""
    return any(value >= threshold for value in sim.values())


# --------------------------------------------------------------------------- the loss module


class BranchPair(NamedTuple):
    """One direction of the symmetrised loss: the online branch against the target branch.

    ``z_online``/``z_target``: (B, h, w) or (B, n) eigenvectors of the aligned maps of the
    branch with the predictor (gradient flows) and of the other branch (detached inside).
    ``f_online``/``f_target``: (B, C, h, w) aligned features, needed for ``"pixel"`` only.
    """

    z_online: torch.Tensor
    z_target: torch.Tensor
    f_online: torch.Tensor | None = None
    f_target: torch.Tensor | None = None


def _as_maps(z: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    """(B, h, w) as is; (B, n) -> (B, h, w) with ``shape`` or a square n."""
    if z.ndim == 3:
        return z
    if z.ndim != 2:
        raise ValueError(f"eigenvectors must be (B, h, w) or (B, n), got {tuple(z.shape)}")
    if shape is None:
        side = math.isqrt(z.shape[1])
        if side * side != z.shape[1]:
            raise ValueError(f"n={z.shape[1]} is not square: pass shape=(h, w)")
        shape = (side, side)
    return z.reshape(z.shape[0], *shape)  # (B, h, w)


class NCutLoss(nn.Module):
    """L = L_consistency + alpha * L_reg (Eq. 12) for one direction, or both (``symmetric``).

    One direction (``forward``): masks ``m1 = sigmoid(z_online / T)`` and
    ``m2 = sigmoid(z_target / T)``; **the target side is detached inside**
    (``z_target``, ``f_target``), so gradients reach the online branch only. ``m2``'s sign
    is resolved and unreliable samples dropped by ``orient_and_filter``; ``"mask"``
    consistency is BCE(m1, m2) on the kept samples (Eq. 10), ``"pixel"`` is the BYOL loss
    between aligned features on all samples (Table 5 ablation). L_reg (Eq. 11) acts on m1.

    Symmetrised loss (Sec. 3.3): the model computes the aligned maps twice, once with the
    predictor on view 1 (online a, target b) and once on view 2 (online b, target a); then
    ``loss, parts = criterion.symmetric(BranchPair(za_online, zb_target),
    BranchPair(zb_online, za_target))`` sums both directions, as the authors' code does.

    Args:
        alpha: weight of L_reg (0.05; without it masks collapse, Fig. 5).
        temperature: T of the mask sigmoid (0.05).
        consistency: "mask" (the paper) or "pixel" (ablation).
        regularization: add alpha * L_reg.
        iou_threshold: starting IoU threshold of the sign/filter rule (0.5).
        min_pass: samples that must pass the filter (20, capped at B).
        step: threshold decrement (0.05).
    """

    def __init__(
        self,
        alpha: float = 0.05,
        temperature: float = 0.05,
        consistency: Consistency = "mask",
        regularization: bool = True,
        iou_threshold: float = 0.5,
        min_pass: int = 20,
        step: float = 0.05,
    ) -> None:
        super().__init__()
        if consistency not in get_args(Consistency):
            raise ValueError(f"consistency must be one of {get_args(Consistency)}, got {consistency!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if min_pass < 1 or step <= 0:
            raise ValueError(f"min_pass must be >= 1 and step > 0, got min_pass={min_pass}, step={step}")
        self.alpha = alpha
        self.temperature = temperature
        self.consistency = consistency
        self.regularization = regularization
        self.iou_threshold = iou_threshold
        self.min_pass = min_pass
        self.step = step

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, consistency={self.consistency!r}, "
                f"regularization={self.regularization}, iou_threshold={self.iou_threshold}, "
                f"min_pass={self.min_pass}")

    def forward(
        self,
        z_online: torch.Tensor,
        z_target: torch.Tensor,
        f_online: torch.Tensor | None = None,
        f_target: torch.Tensor | None = None,
        *,
        shape: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Loss of one direction.

        Args:
            z_online: (B, h, w), or (B, n) with ``shape`` (or square n), online eigenvectors.
            z_target: same shape, target eigenvectors (detached here).
            f_online: (B, C, h, w) aligned online features ("pixel" only).
            f_target: (B, C, h, w) aligned target features ("pixel" only; detached here).
            shape: (h, w) of (B, n) eigenvectors.

        Returns:
            loss: scalar tensor.
            parts: detached diagnostics: floats ``loss``, ``l_consistency``, ``l_mask`` or
            ``l_pixel``, ``l_reg``, ``pass_fraction``, ``iou_threshold``, ``iou_mean``,
            ``sim_horizontal``, ``sim_vertical``, ``sim_uniform``, ``collapsed`` (bool); and
            tensors ``keep`` (B,) bool and ``iou`` (B,).
        """
        z1 = _as_maps(z_online, shape)  # (B, h, w)
        z2 = _as_maps(z_target.detach(), shape)  # (B, h, w)
        if z1.shape != z2.shape:
            raise ValueError(f"online and target eigenvectors differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
        m1 = masks_from_eigvec(z1, self.temperature)  # (B, h, w)
        m2 = masks_from_eigvec(z2, self.temperature)  # (B, h, w)
        m2, keep, iou = orient_and_filter(m1.detach(), m2, iou_threshold=self.iou_threshold,
                                          min_pass=self.min_pass, step=self.step)
        if self.consistency == "mask":
            l_cons = mask_consistency_loss(m1, m2, keep)
        else:
            if f_online is None or f_target is None:
                raise ValueError("consistency='pixel' needs f_online and f_target")
            keep = torch.ones_like(keep)
            l_cons = pixel_consistency_loss(f_online, f_target.detach(), keep)
        l_reg = structural_regularization(m1) if self.regularization else m1.new_zeros(())
        loss = l_cons + self.alpha * l_reg
        sim = template_similarity(m1)
        parts = {
            "loss": float(loss.detach()),
            "l_consistency": float(l_cons.detach()),
            f"l_{self.consistency}": float(l_cons.detach()),
            "l_reg": float(l_reg.detach()),
            "pass_fraction": float(keep.float().mean()),
            "iou_threshold": pass_threshold(iou, self.iou_threshold, self.min_pass, self.step),
            "iou_mean": float(iou.mean()),
            **{f"sim_{name}": value for name, value in sim.items()},
            "collapsed": is_collapsed(sim),
            "keep": keep.detach(),
            "iou": iou.detach(),
        }
        return loss, parts

    def symmetric(
        self, ab: BranchPair, ba: BranchPair, *, shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Sum of both directions (online a vs target b, online b vs target a).

        Args:
            ab: the direction with the predictor on view 1.
            ba: the direction with the predictor on view 2.
            shape: (h, w) of (B, n) eigenvectors.

        Returns:
            loss: scalar, the sum of both directions' losses.
            parts: float diagnostics averaged over the two directions (``loss`` is the sum,
            ``collapsed`` true if either direction is), tensors ``keep``/``iou`` (2, B).
        """
        loss_ab, parts_ab = self(*ab, shape=shape)
        loss_ba, parts_ba = self(*ba, shape=shape)
        parts: dict = {}
        for key, value in parts_ab.items():
            other = parts_ba[key]
            if isinstance(value, torch.Tensor):
                parts[key] = torch.stack([value, other])
            elif isinstance(value, bool):
                parts[key] = value or other
            else:
                parts[key] = 0.5 * (value + other)
        loss = loss_ab + loss_ba
        parts["loss"] = float(loss.detach())
        return loss, parts
