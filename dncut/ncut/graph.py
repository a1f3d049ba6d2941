"""Patch graphs: affinity W and Laplacian L of features, and the eigenvector sign rule.

features (B, n, C) -> W (B, n, n) -> L (B, n, n), degree (B, n). Pure functions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Affinity = Literal["relu", "binary"]
Laplacian = Literal["normalized", "unnormalized"]

AFFINITIES = ("relu", "binary")
LAPLACIANS = ("normalized", "unnormalized")
DEFAULT_EPS = {"relu": 1e-6, "binary": 1e-5}
SIGN_TOL = 1e-6



def affinity_matrix(features: Tensor, *, affinity: Affinity = "relu", tau: float = 0.0,
                    eps: float | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Affinity W of patch features.

    Args:
        features: ``(B, n, C)``, already L2-normalised if cosine affinities are wanted.
        affinity: ``"relu"`` (W = f f^T where f f^T > tau, else eps) or ``"binary"``
            (W = 1 where f f^T > tau, else eps).
        tau: threshold on f f^T.
        eps: floor for weak edges; default 1e-6 (relu) / 1e-5 (binary).
        dtype: dtype of W (default: the features'). The products f f^T and the threshold
            test are taken in the features' dtype, as the peers' float32 code does.

    Returns:
        ``(B, n, n)`` symmetric, strictly positive weights.
    """
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity={affinity!r} is not one of {AFFINITIES}")
    eps = DEFAULT_EPS[affinity] if eps is None else eps
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps={eps} must be in (0, 1]: the weight of weak edges, which keeps the graph connected")
    dtype = features.dtype if dtype is None else dtype
    a = features @ features.transpose(1, 2)  # (B, n, n)
    strong = a > tau
    if affinity == "relu":
        return torch.where(strong, a.to(dtype), eps)
    return strong.to(dtype).clamp_min_(eps)  # exactly 1 or eps (a bool-masked where is slow on CPU)


def laplacian_matrix(w: Tensor, *, laplacian: Laplacian = "normalized") -> tuple[Tensor, Tensor]:
    """Graph Laplacian of ``w``.

    Args:
        w: ``(B, n, n)`` symmetric affinities with positive degrees.
        laplacian: ``"normalized"`` (I - D^-1/2 W D^-1/2) or ``"unnormalized"`` (D - W).

    Returns:
        ``(L (B, n, n), degree (B, n))``.
    """
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian={laplacian!r} is not one of {LAPLACIANS}")
    d = w.sum(-1)  # (B, n)
    if laplacian == "unnormalized":
        lap = w.neg()  # (B, n, n)
        lap.diagonal(dim1=-2, dim2=-1).add_(d)
        return lap, d
    s = d.rsqrt().unsqueeze(-1)  # (B, n, 1)
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.addcmul(eye, w, s * s.mT, value=-1.0), d  # I - D^-1/2 W D^-1/2 (s_i s_j: symmetric)


def fix_sign(z: Tensor) -> Tensor:
    """Deterministic sign for unit eigenvectors ``z (B, n)``.

    The sum of entries is made positive; where it is numerically zero (|sum| <= SIGN_TOL,
    always the case for D - W, whose z2 is orthogonal to 1) the entry of largest magnitude
    (the first one on exact ties) is made positive instead.
    """
    total = z.sum(-1)  # (B,)
    idx = z.abs().argmax(-1, keepdim=True)  # (B, 1)
    tie_sign = torch.sign(z.gather(-1, idx).squeeze(-1))
    sign = torch.where(total.abs() > SIGN_TOL, torch.sign(total), tie_sign)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return z * sign.unsqueeze(-1)
