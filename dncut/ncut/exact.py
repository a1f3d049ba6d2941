"""Exact Fiedler solver: full ``torch.linalg.eigh`` forward, Eq. 7-8 backward.

lap (B, n, n) -> z2 (B, n), lambda2 (B,). The reference every other solver is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dncut.ncut.graph import Laplacian, fix_sign

GAP_EPS = 1e-9



def pinv_coefficients(evals: Tensor, lam: Tensor) -> Tensor:
    """Diagonal of (lambda2 I - Lambda)^+ with the degenerate-gap rule.

    Args:
        evals: ``(B, n)`` all eigenvalues. lam: ``(B,)`` lambda2.

    Returns:
        ``(B, n)`` 1 / (lam - evals_i), 0 where |lam - evals_i| <= GAP_EPS * max(1, |spectrum|).
    """
    gap = lam.unsqueeze(-1) - evals  # (B, n)
    scale = evals.abs().amax(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
    small = gap.abs() <= GAP_EPS * scale
    return torch.where(small, torch.zeros_like(gap), 1.0 / torch.where(small, torch.ones_like(gap), gap))


class _EighFiedler(torch.autograd.Function):
    """z2, lambda2 of symmetric ``L (B, n, n)`` by a full eigh; backward by Eq. 7-8."""

    @staticmethod
    def forward(ctx, lap: Tensor) -> tuple[Tensor, Tensor]:
        evals, evecs = torch.linalg.eigh(lap)  # (B, n), (B, n, n)
        lam = evals[:, 1]  # (B,)
        z = evecs[:, :, 1]  # (B, n)
        signed = fix_sign(z)
        evecs = evecs.clone()
        evecs[:, :, 1] = signed
        ctx.save_for_backward(evals, evecs)
        return signed, lam

    @staticmethod
    def backward(ctx, g_z: Tensor | None, g_lam: Tensor | None) -> Tensor:
        evals, evecs = ctx.saved_tensors
        z = evecs[:, :, 1]  # (B, n)
        # dl/dL = sym(v z^T) + h z z^T = sym(w z^T) with w = v + h z: one outer product
        w = torch.zeros_like(z)
        if g_z is not None:
            coef = pinv_coefficients(evals, evals[:, 1])  # (B, n); coef[:, 1] == 0
            proj = (evecs.transpose(1, 2) @ g_z.unsqueeze(-1)).squeeze(-1)  # (B, n) Z^T g
            w = w + (evecs @ (coef * proj).unsqueeze(-1)).squeeze(-1)  # (B, n) v
        if g_lam is not None:
            w = w + g_lam.unsqueeze(-1) * z  # sym((h z) z^T) = h z z^T
        outer = w.unsqueeze(-1) * z.unsqueeze(-2)  # (B, n, n) w z^T
        return 0.5 * (outer + outer.transpose(1, 2))


def eigh_solver(lap: Tensor, degree: Tensor, *, laplacian: Laplacian, init: Tensor | None = None,
                tol: float | None = None) -> tuple[Tensor, Tensor, int]:
    """Exact solver: ``(z2 (B, n), lambda2 (B,), n_fallback=0)``; ``init`` and ``tol`` are ignored."""
    z, lam = _EighFiedler.apply(lap)
    return z, lam, 0
