"""Differentiable Normalized Cuts (Liu & Gould, Sec. 3.2; Shi & Malik).

The layer turns patch features into the Fiedler vector of their affinity graph::

    features (B, n, C) --affinity--> W (B, n, n) --laplacian--> L (B, n, n)
                       --solver--> eigvec z2 (B, n), eigval lambda2 (B,)

* Affinity (Eq. 1): ``"relu"`` is W = max(f f^T, 0), entries <= tau set to ``eps``
  (1e-6, as the authors' code); ``"binary"`` is TokenCut's W = 1[f f^T > tau] with ``eps``
  (1e-5) elsewhere. Self-loops are kept. The ``eps`` floor keeps every graph connected, so
  lambda1 = 0 is simple and z1 is known in closed form.
* Laplacian: ``"normalized"`` is L = I - D^-1/2 W D^-1/2 (Eq. 6, the default);
  ``"unnormalized"`` is L = D - W (the authors' training code).
* Output: z2 with unit L2 norm and a deterministic sign: the sum of its entries is > 0
  (the authors' rule); where that sum is numerically zero (|sum| <= 1e-6, always so for
  D - W since its z2 is orthogonal to 1) the entry of largest magnitude is made positive. For the normalized Laplacian the
  generalized eigenvector y2 = D^-1/2 z2 of (D - W) y = lambda D y (what TokenCut
  thresholds; y2^T D y2 = 1, the same scaling as ``scipy.linalg.eigh(D - W, D)``) comes
  from the same call.
* Backward (Eq. 7-8): for the loss gradients g = dl/dz2 and h = dl/dlambda2,
  dl/dL = sym(v z2^T) + h z2 z2^T with v = Z diag(c) Z^T g, c_i = 1 / (lambda2 - lambda_i)
  for i != 2. It reuses the eigendecomposition of the forward (O(n^2) per graph, no
  pseudo-inverse, no second decomposition). Degenerate gaps rule: a coefficient whose gap
  |lambda2 - lambda_i| <= ``GAP_EPS`` (1e-9 relative to the spectrum's scale) is set to 0, i.e.
  the pseudo-inverse of Eq. 8 drops near-zero pivots exactly as it drops the pivot of
  lambda2 itself. Gradients stay finite for repeated eigenvalues (e.g. constant features).
* Precision: the products f f^T (and the threshold test) run in the input dtype, as in the
  peers' float32 code; W, the Laplacian and the
  eigensolver run in ``solver_dtype`` (float64 by default) whatever the input dtype; outputs
  are cast back to the input dtype. Autocast is off for the whole layer (never bf16).

Solvers are registered in ``SOLVERS``: ``"eigh"`` (exact, ``torch.linalg.eigh``; the reference)
and the fast batched block solver ``"lobpcg"`` (:mod:`dncut.ncut.lobpcg`: block LOBPCG forward
on the complement of z1, deflated-CG backward, per-graph residual test, exact eigh fallback for
the graphs that fail, counted in ``n_fallback`` and ``dncut.ncut.lobpcg.STATS``; n <= 32 uses eigh).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dncut.ncut.exact import GAP_EPS, eigh_solver, pinv_coefficients
from dncut.ncut.lobpcg import lobpcg_solver
from dncut.ncut.graph import (AFFINITIES, LAPLACIANS, Affinity, Laplacian, affinity_matrix,
                              fix_sign, laplacian_matrix)

__all__ = ["NCutResult", "NonFiniteFeaturesError", "normalized_cut", "SOLVERS", "DTYPE_TOL", "register_solver", "affinity_matrix",
           "laplacian_matrix", "fix_sign", "pinv_coefficients", "GAP_EPS"]


@dataclass
class NCutResult:
    """What :func:`normalized_cut` returns.

    Attributes:
        eigvec: ``(B, n)`` z2, unit L2 norm, sign fixed (sum of entries >= 0).
        eigval: ``(B,)`` lambda2 of the chosen Laplacian.
        gen_eigvec: ``(B, n)`` y2 = D^-1/2 z2 for the normalized Laplacian (same sign as z2),
            ``None`` for the unnormalized one.
        degree: ``(B, n)`` node degrees D of the graph.
        n_fallback: batch items that the fast solver handed to the exact solver (0 for eigh).
    """

    eigvec: Tensor
    eigval: Tensor
    gen_eigvec: Tensor | None
    degree: Tensor
    n_fallback: int = 0


DTYPE_TOL: dict[torch.dtype, float] = {torch.float32: 1e-7}
"""Default ``tol`` per input dtype: solving beyond the features' own precision buys nothing
(float32 gradients then match float64 ones to ~1e-6 relative, as the exact solver's do)."""

SolverFn = Callable[..., tuple[Tensor, Tensor, int]]
SOLVERS: dict[str, SolverFn] = {"eigh": eigh_solver}
SOLVERS["lobpcg"] = lobpcg_solver


def register_solver(name: str, fn: SolverFn) -> None:
    """Make ``fn(lap, degree, *, laplacian, init, tol) -> (z2, lambda2, n_fallback)`` a solver.

    ``tol`` is always passed (``None`` or a float; see :func:`normalized_cut`); a solver without
    a tolerance accepts and ignores it, as ``eigh`` does.
    """
    SOLVERS[name] = fn




class NonFiniteFeaturesError(ValueError):
    """Features with NaN/Inf reached the NCut layer; ``items`` are the bad batch indices."""

    def __init__(self, items: list[int]) -> None:
        super().__init__(f"features contain NaN/Inf in batch items {items}")
        self.items = items


def _validate(features: Tensor, init: Tensor | None) -> None:
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, n, C), got {tuple(features.shape)}")
    b, n, c = features.shape
    if n < 2:
        raise ValueError(f"a graph needs n >= 2 nodes, got n={n} (features {tuple(features.shape)})")
    if c < 1 or b < 1:
        raise ValueError(f"features must have B >= 1 and C >= 1, got {tuple(features.shape)}")
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"features must be float32 or float64, got {features.dtype}")
    finite = torch.isfinite(features).flatten(1).all(-1)  # (B,)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise NonFiniteFeaturesError(bad)
    if init is not None:
        if init.device != features.device:
            raise ValueError(f"init device ({init.device}) does not match the features device ({features.device})")
        if init.shape[:2] != (b, n):
            raise ValueError(f"init must have shape (B, n[, k]) = ({b}, {n}, ...), got {tuple(init.shape)}")


def normalized_cut(features: Tensor, *, normalize: bool = True, tau: float = 0.0,
                   affinity: Affinity = "relu", laplacian: Laplacian = "normalized",
                   solver: str = "eigh", eps: float | None = None,
                   init: Tensor | None = None, tol: float | None = None,
                   solver_dtype: torch.dtype = torch.float64) -> NCutResult:
    """Differentiable NCut: Fiedler vector of the patch graph of ``features``.

    Args:
        features: ``(B, n, C)`` float32/float64 on any device; may require grad.
        normalize: L2-normalise each feature along C first (cosine affinities).
        tau: affinity threshold (0 for the paper, 0.2 for TokenCut's binary graph).
        affinity: ``"relu"`` or ``"binary"`` (see module docstring).
        laplacian: ``"normalized"`` (paper Eq. 6) or ``"unnormalized"`` (D - W).
        solver: a key of ``SOLVERS``: ``"eigh"`` (exact reference) or ``"lobpcg"`` (fast).
        eps: weak-edge weight; default 1e-6 (relu) or 1e-5 (binary).
        init: optional warm start ``(B, n)`` or ``(B, n, k)`` for iterative solvers.
        tol: tolerance of iterative solvers: forward ||L z2 - lambda2 z2|| <= tol * (spectrum
            bound), backward CG relative residual <= tol. ``None`` follows the input's
            precision: :data:`DTYPE_TOL` (1e-7, about float32's unit roundoff, for float32
            features; the solver's default, 1e-10, for float64). Inference that only thresholds
            z2 can use ~1e-5. Ignored by ``"eigh"``.
        solver_dtype: dtype of W, L and the eigensolver: float64 (default; what the gradient
            targets need) or float32 (half the memory traffic, tolerances >= ~4e-6: inference).

    Returns:
        :class:`NCutResult` with ``eigvec (B, n)``, ``eigval (B,)``, ``gen_eigvec (B, n)``
        (normalized Laplacian only) and ``degree (B, n)``, in the input dtype.

    Raises:
        NonFiniteFeaturesError: NaN/Inf features (a ``ValueError``; ``.items`` = the bad batch items).
        ValueError: wrong rank or dtype, n < 2, unknown option, ``init`` on another device.
    """
    _validate(features, init)
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {sorted(SOLVERS)}")
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity={affinity!r} is not one of {AFFINITIES}")
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian={laplacian!r} is not one of {LAPLACIANS}")
    if solver_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"solver_dtype must be torch.float32 or torch.float64, got {solver_dtype}")
    dtype = features.dtype
    tol = DTYPE_TOL.get(dtype) if tol is None else tol
    with torch.autocast(features.device.type, enabled=False):  # graph and solver in their dtypes, never bf16
        f = F.normalize(features, dim=-1) if normalize else features
        w = affinity_matrix(f, affinity=affinity, tau=tau, eps=eps, dtype=solver_dtype)  # (B, n, n)
        lap, degree = laplacian_matrix(w, laplacian=laplacian)  # (B, n, n), (B, n)
        z, lam, n_fallback = SOLVERS[solver](lap, degree, laplacian=laplacian,
                                             init=None if init is None else init.to(solver_dtype), tol=tol)
    y = z * degree.rsqrt() if laplacian == "normalized" else None  # (B, n)
    return NCutResult(
        eigvec=z.to(dtype),
        eigval=lam.to(dtype),
        gen_eigvec=None if y is None else y.to(dtype),
        degree=degree.to(dtype),
        n_fallback=n_fallback,
    )
