"""Fast batched Fiedler solver: block LOBPCG forward, deflated-CG backward (``solver="lobpcg"``).

lap (B, n, n) symmetric PSD Laplacian, degree (B, n) -> z2 (B, n) (unit, ``fix_sign``),
lambda2 (B,), n_fallback. Same contract and outputs as :func:`dncut.ncut.exact.eigh_solver`,
without a full eigendecomposition: only batched matmuls, batched Cholesky
(``cholesky_ex``, ``info`` checked per item), triangular solves and ``eigh`` of small
(<= 3 * block <= 32) Rayleigh-Ritz matrices, which PyTorch batches on CUDA.

Forward (block LOBPCG, Knyazev 2001, with the basis handling of Hetmaniuk & Lehoucq 2006):

* z1 is known: D^1/2 1 / ||.|| (normalized L) or 1 / sqrt(n) (L = D - W). Every basis
  vector is projected off z1 (twice), so the iteration works in z1-perp, where the smallest
  eigenpair is (lambda2, z2). Spectrum bound ``bound``: 2 (normalized), 2 max(degree) (D - W).
* Block X (n, k) of Ritz vectors, search space [X, R, P] (3k columns). [R, P] is projected
  off [z1, X] twice, its columns normalised, then orthonormalised by Cholesky-QR twice:
  the first Cholesky (tiny shift) reveals the columns that are numerically dependent on the
  previous ones (diagonal pivot < ``DEP_TOL``) or vanish; those are dropped (zeroed and
  shifted to the top of the Rayleigh-Ritz spectrum), R before P. Rayleigh-Ritz keeps the
  k smallest Ritz pairs; P = the [R, P] part of the new X.
* Convergence per graph: ||L z2 - lambda2 z2|| <= ``tol * bound`` (``tol`` = 1e-10: float64
  grade, so z2 error ~ tol * bound / gap and lambda2 error ~ (tol * bound)^2 / gap). A
  converged or broken item is frozen on the device at once (``torch.where``; no host sync);
  every ``check_every`` iterations one host sync stops the loop when all are done and
  compacts the batch to the items still iterating. Converged items are never iterated
  further, which is what removes the breakdown of running past convergence (R -> 0).
* Fallback: items that do not converge in ``max_iter``, break down (Cholesky ``info != 0``,
  non-finite values, too few live basis columns) or fail the final true-residual check
  (||L z2 - lambda2 z2|| recomputed from L) are solved by ``torch.linalg.eigh`` -- those items
  only. Their number is returned as ``n_fallback`` and added to :data:`STATS`.
* Warm start: ``init`` (B, n) or (B, n, k0) (first ``block`` columns used) joins ``block``
  random columns from a fixed-seed generator on the device; the first Rayleigh-Ritz picks the
  best k of that span. Starting from the exact z2 converges at iteration 0.
* n <= ``SMALL_N`` (32): the exact solver is used directly (small batched eigh is fast and
  a 3k-column search space would not fit in z1-perp); not counted as a fallback.

Backward (Eq. 7-8 without Z): for g = dl/dz2, h = dl/dlambda2,
v = (lambda2 I - L)^+ g = (z1^T g / lambda2) z1 + v_perp, where v_perp solves
M v_perp = -P g, M = P (L - lambda2 I) P, P = I - z1 z1^T - z2 z2^T (PD on range P).
Deflated CG (Saad et al. 2000) with the forward's other Ritz vectors Y = [x3 .. x_{k+1}]:
their components come in closed form (Galerkin on Y, exact for any Y), CG runs on the
M-orthogonal complement, per item until ||r|| <= ``cg_tol`` ||b||, with a final
true-residual check; items that fail (cap, breakdown p^T M p <= 0) use the exact eigh formula.
Then dl/dL = sym(v z2^T) + h z2 z2^T, as :mod:`dncut.ncut.exact`.
Tiny gaps (``GAP_EPS`` rule of exact.py): coefficients of directions with
|lambda2 - lambda_i| <= GAP_EPS * max(1, max_i L_ii) are set to 0: z1's when lambda2 is tiny,
and the Ritz directions of Y whose deflated eigenvalue is tiny (they are also projected
out of the CG space). ``max(1, max L_ii)`` is within a factor 2 of exact.py's
``max(1, lambda_max)``. No NaN/Inf for repeated eigenvalues or constant features (a fully
degenerate M breaks CG down -> exact formula for that item, counted in ``STATS``).

Precision: the solver works in the dtype of ``lap`` (float64 from ``normalized_cut``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dncut.ncut.exact import GAP_EPS, eigh_solver, pinv_coefficients
from dncut.ncut.graph import LAPLACIANS, Laplacian, fix_sign

__all__ = ["LobpcgOptions", "OPTIONS", "LobpcgStats", "STATS", "reset_stats", "lobpcg_solver", "SMALL_N"]

logger = logging.getLogger(__name__)

SMALL_N = 32
SEED = 20240611


@dataclass(frozen=True)
class LobpcgOptions:
    """Knobs of the solver (module default :data:`OPTIONS`).

    Attributes:
        block: k, columns of the block X (search space 3k <= 32). 4 suits Fiedler vectors.
        max_iter: iterations before an item falls back to eigh.
        check_every: iterations between host syncs (convergence check + batch compaction).
        tol: residual tolerance relative to the spectrum bound (2 or 2 max degree).
        cg_tol: relative residual tolerance of the backward's deflated CG.
        cg_max_iter: CG iterations before an item falls back to the exact formula.
        shrink: compact the working batch when at most this fraction is still iterating.
    """

    block: int = 4
    max_iter: int = 100
    check_every: int = 4
    tol: float = 1e-10
    cg_tol: float = 1e-10
    cg_max_iter: int = 150
    shrink: float = 0.75


OPTIONS = LobpcgOptions()


@dataclass
class LobpcgStats:
    """Running counters (module instance :data:`STATS`) for training logs."""

    calls: int = 0
    items: int = 0
    forward_fallbacks: int = 0
    backward_calls: int = 0
    backward_fallbacks: int = 0
    iterations: int = 0
    cg_iterations: int = 0


STATS = LobpcgStats()


def reset_stats() -> LobpcgStats:
    """Return a copy of :data:`STATS` and zero it."""
    old = LobpcgStats(**{f.name: getattr(STATS, f.name) for f in fields(STATS)})
    for f in fields(STATS):
        setattr(STATS, f.name, 0)
    return old


# ----------------------------------------------------------------------------- small pieces


def null_vector(degree: Tensor, laplacian: Laplacian) -> Tensor:
    """z1 ``(B, n)``: unit null vector of L (D^1/2 1 normalised, or 1 / sqrt(n))."""
    if laplacian == "normalized":
        s = degree.clamp_min(0).sqrt()  # (B, n)
        return s / s.norm(dim=-1, keepdim=True)
    return torch.full_like(degree, degree.shape[-1] ** -0.5)


def spectrum_bound(degree: Tensor, laplacian: Laplacian) -> Tensor:
    """Upper bound ``(B,)`` on the spectrum: 2 (normalized) or 2 max degree (Gershgorin)."""
    if laplacian == "normalized":
        return torch.full_like(degree[:, 0], 2.0)
    return 2.0 * degree.amax(-1)


def _project_out(w: Tensor, q: Tensor) -> Tensor:
    """w - q q^T w for ``w (B, n, m)`` and orthonormal ``q (B, n, p)``."""
    return w - q @ (q.mT @ w)


def _orthonormalize(w: Tensor, q: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal basis of span(w) off span(q), dropping dependent columns.

    Args:
        w: ``(B, n, m)`` candidate columns. q: ``(B, n, p)`` orthonormal columns to stay off.
        drop: ``(B, m)`` columns already known to be absent.

    Returns:
        ``(w (B, n, m), keep (B, m), ok (B,))``: orthonormal kept columns, zero dropped ones,
        ``ok`` False where a Cholesky factorisation failed (non-finite input).
    """
    dtype, m = w.dtype, w.shape[-1]
    unit = torch.finfo(dtype).eps
    shift = 50.0 * m * unit
    dep_tol = 10.0 * shift ** 0.5
    norm0 = w.norm(dim=1)  # (B, m)
    w = _project_out(_project_out(w, q), q)
    norm = w.norm(dim=1)  # (B, m)
    keep = ~drop & torch.isfinite(norm) & (norm > 1e3 * unit * norm0) & (norm > torch.finfo(dtype).tiny * 1e6)
    w = torch.where(keep.unsqueeze(1), w / norm.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1), 0.0)
    eye = torch.eye(m, dtype=dtype, device=w.device)
    gram = w.mT @ w  # (B, m, m)
    gram = gram + torch.diag_embed((~keep).to(dtype)) + shift * eye
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    keep = keep & (chol.diagonal(dim1=-2, dim2=-1) > dep_tol)  # pivot = distance to previous columns
    km = keep.to(dtype)
    w = w * km.unsqueeze(1)
    gram = gram * (km.unsqueeze(-1) * km.unsqueeze(-2)) + torch.diag_embed(1.0 - km)
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = ok & (info == 0)
    w = torch.linalg.solve_triangular(chol.mT, w, upper=True, left=False)  # w R^-1
    w = _project_out(w, q)
    gram = w.mT @ w + torch.diag_embed(1.0 - km)
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = ok & (info == 0)
    w = torch.linalg.solve_triangular(chol.mT, w, upper=True, left=False)
    return w, keep, ok


def _rayleigh_ritz(s: Tensor, a_s: Tensor, keep: Tensor, big: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz pairs of L on the orthonormal basis ``s (B, n, m)`` with ``a_s = L s``.

    Dropped columns (``keep`` False) get the Ritz value ``big (B,)`` and no coupling, so they
    sort last. Non-finite items get a harmless matrix and ``ok`` False (eigh on CPU raises on NaN).

    Returns:
        ``(theta (B, m) ascending, c (B, m, m), ok (B,))``.
    """
    dtype, m = s.dtype, s.shape[-1]
    h = s.mT @ a_s  # (B, m, m)
    h = 0.5 * (h + h.mT)
    km = keep.to(dtype)
    h = h * (km.unsqueeze(-1) * km.unsqueeze(-2)) + torch.diag_embed((1.0 - km) * big.unsqueeze(-1))
    ok = torch.isfinite(h).flatten(1).all(-1)  # (B,)
    safe = torch.diag_embed(torch.arange(m, dtype=dtype, device=s.device).expand_as(km))
    h = torch.where(ok[:, None, None], h, safe)
    theta, c = torch.linalg.eigh(h)
    return theta, c, ok


# ----------------------------------------------------------------------------- forward


@dataclass
class _Block:
    """Result of the iteration for the whole batch."""

    x: Tensor  # (B, n, k) Ritz vectors, x[..., 0] ~ z2
    theta: Tensor  # (B, k) Ritz values
    converged: Tensor  # (B,) bool
    broken: Tensor  # (B,) bool: breakdown seen (Cholesky info, non-finite, rank loss)
    iterations: int


def _initial_columns(lap: Tensor, init: Tensor | None, k: int) -> Tensor:
    """Starting columns ``(B, n, k0 + k)``: up to k of ``init`` then k seeded random ones."""
    b, n, _ = lap.shape
    gen = torch.Generator(device=lap.device).manual_seed(SEED)
    rand = torch.randn(b, n, k, generator=gen, device=lap.device, dtype=lap.dtype)  # (B, n, k)
    if init is None:
        return rand
    start = init.to(lap.dtype)
    if start.dim() == 2:
        start = start.unsqueeze(-1)  # (B, n, 1)
    return torch.cat([start[..., :k], rand], dim=-1)  # (B, n, k0 + k)


def _iterate(lap: Tensor, z1: Tensor, bound: Tensor, start: Tensor, opts: LobpcgOptions,
             precond: Tensor | None = None) -> _Block:
    """Block LOBPCG on z1-perp for the k smallest eigenpairs; see the module docstring.

    ``precond`` ``(B, n)``: optional diagonal preconditioner applied to the residuals.
    """
    b, n, _ = lap.shape
    k, dtype, device = opts.block, lap.dtype, lap.device
    big = 10.0 * bound + 1.0  # (B,)
    tol_abs = opts.tol * bound  # (B,)
    q1 = z1.unsqueeze(-1)  # (B, n, 1)
    no_drop = torch.zeros(start.shape[0], start.shape[-1], dtype=torch.bool, device=device)
    w, keep, ok = _orthonormalize(start, q1, no_drop)
    aw = lap @ w  # (B, n, m0)
    theta, c, ok_rr = _rayleigh_ritz(w, aw, keep, big)
    x, ax, theta = w @ c[..., :k], aw @ c[..., :k], theta[:, :k]  # (B, n, k), (B, n, k), (B, k)
    broken = ~(ok & ok_rr & torch.isfinite(theta).all(-1) & (theta[:, -1] < 0.5 * big))
    p = torch.zeros_like(x)
    p_live = torch.zeros(b, k, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out_x, out_theta = x.clone(), theta.clone()
    out_done = torch.zeros(b, dtype=torch.bool, device=device)
    out_broken = broken.clone()
    idx = torch.arange(b, device=device)
    keep_x = torch.ones(b, k, dtype=torch.bool, device=device)
    it = 0
    for it in range(opts.max_iter + 1):
        r = ax - x * theta.unsqueeze(1)  # (B, n, k)
        r = _project_out(r, q1)
        done = done | ((r[..., 0].norm(dim=-1) <= tol_abs) & ~broken)
        if it % opts.check_every == 0 or it == opts.max_iter:
            finished = done | broken
            out_x[idx], out_theta[idx], out_done[idx], out_broken[idx] = x, theta, done, broken
            n_active = int((~finished).sum())  # the one host sync of this check
            if n_active == 0 or it == opts.max_iter:
                break
            if n_active <= opts.shrink * idx.numel():
                rows = torch.nonzero(~finished).flatten()
                idx, lap, z1, q1, bound, big, tol_abs = (t[rows] for t in (idx, lap, z1, q1, bound, big, tol_abs))
                precond = None if precond is None else precond[rows]
                x, ax, theta, p, p_live, r, keep_x = (t[rows] for t in (x, ax, theta, p, p_live, r, keep_x))
                done, broken = done[rows], broken[rows]
        active = ~(done | broken)  # (B,)
        if precond is not None:
            r = r * precond.unsqueeze(-1)
        w, keep, ok = _orthonormalize(torch.cat([r, p], -1), torch.cat([q1, x], -1),
                                      torch.cat([torch.zeros_like(p_live), ~p_live], -1))  # (B, n, 2k)
        aw = lap @ w  # (B, n, 2k)
        s, a_s = torch.cat([x, w], -1), torch.cat([ax, aw], -1)  # (B, n, 3k)
        theta_new, c, ok_rr = _rayleigh_ritz(s, a_s, torch.cat([keep_x, keep], -1), big)
        c = c[..., :k]  # (B, 3k, k)
        theta_new = theta_new[:, :k]
        good = ok & ok_rr & torch.isfinite(theta_new).all(-1) & (theta_new[:, -1] < 0.5 * big)
        broken = broken | (active & ~good)
        upd = (active & good)[:, None, None]
        x = torch.where(upd, s @ c, x)
        ax = torch.where(upd, a_s @ c, ax)
        p = torch.where(upd, w @ c[:, k:], p)
        theta = torch.where(upd[:, :, 0], theta_new, theta)
        p_live = p_live | upd[:, :, 0]
    STATS.iterations += it
    return _Block(x=out_x, theta=out_theta, converged=out_done, broken=out_broken, iterations=it)


def _true_residual(lap: Tensor, z: Tensor, lam: Tensor) -> Tensor:
    """||L z - lam z|| ``(B,)`` recomputed from L."""
    return (lap @ z.unsqueeze(-1)).squeeze(-1).sub(lam.unsqueeze(-1) * z).norm(dim=-1)


def _solve(lap: Tensor, degree: Tensor, laplacian: Laplacian, init: Tensor | None,
           opts: LobpcgOptions) -> tuple[Tensor, Tensor, Tensor, int]:
    """Forward without autograd: ``(ritz vectors (B, n, k), ritz values (B, k), z1 (B, n), n_fallback)``."""
    z1 = null_vector(degree.to(lap.dtype), laplacian)  # (B, n)
    bound = spectrum_bound(degree.to(lap.dtype), laplacian)  # (B,)
    precond = None
    if laplacian == "unnormalized":  # Jacobi: D - W has a wide diagonal, I - D^-1/2 W D^-1/2 does not
        precond = 1.0 / lap.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(lap.dtype).tiny ** 0.5)  # (B, n)
    blk = _iterate(lap, z1, bound, _initial_columns(lap, init, opts.block), opts, precond)
    x, theta = blk.x, blk.theta
    res = _true_residual(lap, x[..., 0], theta[:, 0])
    bad = ~(blk.converged & ~blk.broken & (res <= 10.0 * opts.tol * bound) & torch.isfinite(x).flatten(1).all(-1))
    rows = torch.nonzero(bad).flatten()
    n_fallback = int(rows.numel())
    if n_fallback:
        evals, evecs = torch.linalg.eigh(lap[rows])  # (F, n), (F, n, n)
        k = opts.block
        x = x.index_copy(0, rows, evecs[..., 1:k + 1])
        theta = theta.index_copy(0, rows, evals[:, 1:k + 1])
        logger.debug("lobpcg: %d of %d graphs fell back to eigh", n_fallback, lap.shape[0])
    return x, theta, z1, n_fallback


# ----------------------------------------------------------------------------- backward


def _gap_scale(lap: Tensor) -> Tensor:
    """``(B,)`` max(1, max_i L_ii): within a factor 2 of exact.py's max(1, lambda_max)."""
    return lap.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)


def _exact_resolvent(lap: Tensor, g: Tensor) -> Tensor:
    """(lambda2 I - L)^+ g ``(F, n)`` by a full eigh with exact.py's coefficients."""
    evals, evecs = torch.linalg.eigh(lap)  # (F, n), (F, n, n)
    coef = pinv_coefficients(evals, evals[:, 1])  # (F, n)
    proj = (evecs.mT @ g.unsqueeze(-1)).squeeze(-1)  # (F, n)
    return (evecs @ (coef * proj).unsqueeze(-1)).squeeze(-1)


def resolvent_apply(lap: Tensor, z1: Tensor, z: Tensor, lam: Tensor, ritz: Tensor, g: Tensor,
                    opts: LobpcgOptions = OPTIONS) -> tuple[Tensor, int, int]:
    """v = (lambda2 I - L)^+ g without the eigendecomposition (deflated CG).

    Args:
        lap: ``(B, n, n)``. z1: ``(B, n)`` null vector. z: ``(B, n)`` z2. lam: ``(B,)`` lambda2.
        ritz: ``(B, n, m)`` further Ritz vectors (x3 ...), orthonormal, off z1 and z2.
        g: ``(B, n)`` the vector to map.
        opts: tolerances (``cg_tol``, ``cg_max_iter``, ``check_every``).

    Returns:
        ``(v (B, n), n_fallback, cg_iterations)``.
    """
    dtype = lap.dtype
    gap_eps = GAP_EPS * _gap_scale(lap)  # (B,)
    c1 = torch.where(lam.abs() > gap_eps, 1.0 / torch.where(lam.abs() > gap_eps, lam, 1.0), 0.0)  # (B,)
    v1 = (c1 * (z1 * g).sum(-1)).unsqueeze(-1) * z1  # (B, n)
    q2 = torch.stack([z1, z], dim=-1)  # (B, n, 2)
    lam3 = lam[:, None, None]

    def shifted(v: Tensor) -> Tensor:
        return lap @ v - lam3 * v  # (B, n, c)

    u = _project_out(ritz, q2)  # (B, n, m)
    mu = _project_out(shifted(u), q2)  # (B, n, m)
    e_mat = u.mT @ mu
    e_mat = 0.5 * (e_mat + e_mat.mT)  # (B, m, m)
    e_ok = torch.isfinite(e_mat).flatten(1).all(-1)
    e_mat = torch.where(e_ok[:, None, None], e_mat, torch.eye(e_mat.shape[-1], dtype=dtype, device=lap.device))
    e, rot = torch.linalg.eigh(e_mat)  # (B, m), (B, m, m)
    y, my = u @ rot, mu @ rot  # (B, n, m): Y^T M Y = diag(e)
    null = e.abs() <= gap_eps.unsqueeze(-1)  # (B, m)
    coef = torch.where(null, 0.0, 1.0 / torch.where(null, 1.0, e)).unsqueeze(-1)  # (B, m, 1)
    live = (~null).to(dtype).unsqueeze(1)  # (B, 1, m)
    yd, myd = y * live, my * live
    qb = torch.cat([q2, y * (1.0 - live)], dim=-1)  # (B, n, m + 2): hard-deflated directions

    def op(v: Tensor) -> Tensor:
        return _project_out(shifted(v), qb)  # M v, (B, n, 1)

    b = -_project_out(g.unsqueeze(-1), qb)  # (B, n, 1)
    target = opts.cg_tol * b.norm(dim=(1, 2))  # (B,)
    x = yd @ (coef * (yd.mT @ b))  # Galerkin part on Y
    r = b - myd @ (coef * (yd.mT @ b))
    p = r - yd @ (coef * (myd.mT @ r))
    rr = (r * r).sum((1, 2))  # (B,)
    active = rr.sqrt() > target
    failed = ~e_ok
    it = 0
    for it in range(opts.cg_max_iter):
        if it % opts.check_every == 0 and not bool(active.any()):
            break
        mp = op(p)
        pmp = (p * mp).sum((1, 2))  # (B,)
        good = (pmp > 0) & torch.isfinite(pmp)
        failed = failed | (active & ~good)
        act = active & good
        alpha = torch.where(act, rr / torch.where(good, pmp, 1.0), 0.0)[:, None, None]
        x = x + alpha * p
        r = r - alpha * mp
        rr_new = (r * r).sum((1, 2))
        beta = torch.where(act, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)[:, None, None]
        p = torch.where(act[:, None, None], r + beta * p - yd @ (coef * (myd.mT @ r)), p)
        rr = torch.where(act, rr_new, rr)
        active = act & (rr_new.sqrt() > target)
    true_res = (b - op(x)).norm(dim=(1, 2))  # (B,)
    bad = failed | active | ~(true_res <= 10.0 * target + 10.0 * torch.finfo(dtype).tiny) | ~torch.isfinite(x).flatten(1).all(-1)
    v = v1 + x.squeeze(-1)
    rows = torch.nonzero(bad).flatten()
    if rows.numel():
        v = v.index_copy(0, rows, _exact_resolvent(lap[rows], g[rows]))
        logger.debug("lobpcg backward: %d of %d graphs used the exact formula", rows.numel(), lap.shape[0])
    return v, int(rows.numel()), it


class _RitzFiedler(torch.autograd.Function):
    """Packages the forward's (z2, lambda2) with the deflated-CG backward of Eq. 7-8."""

    @staticmethod
    def forward(ctx, lap: Tensor, z: Tensor, lam: Tensor, z1: Tensor, ritz: Tensor,
                opts: LobpcgOptions) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(lap, z, lam, z1, ritz)
        ctx.opts = opts
        return z.clone(), lam.clone()

    @staticmethod
    def backward(ctx, g_z: Tensor | None, g_lam: Tensor | None):
        lap, z, lam, z1, ritz = ctx.saved_tensors
        grad = torch.zeros_like(lap)
        if g_z is not None:
            v, n_bad, n_it = resolvent_apply(lap, z1, z, lam, ritz, g_z.to(lap.dtype), ctx.opts)
            STATS.backward_calls += 1
            STATS.backward_fallbacks += n_bad
            STATS.cg_iterations += n_it
            outer = v.unsqueeze(-1) * z.unsqueeze(-2)  # (B, n, n) v z^T
            grad = grad + 0.5 * (outer + outer.mT)
        if g_lam is not None:
            grad = grad + g_lam.to(lap.dtype)[:, None, None] * z.unsqueeze(-1) * z.unsqueeze(-2)
        return grad, None, None, None, None, None


def lobpcg_solver(lap: Tensor, degree: Tensor, *, laplacian: Laplacian, init: Tensor | None = None,
                  options: LobpcgOptions | None = None) -> tuple[Tensor, Tensor, int]:
    """Fast solver: ``(z2 (B, n), lambda2 (B,), n_fallback)``; differentiable w.r.t. ``lap``.

    Args:
        lap: ``(B, n, n)`` Laplacian (float64 from ``normalized_cut``; any float dtype works).
        degree: ``(B, n)`` node degrees (gives z1 and the spectrum bound; not differentiated).
        laplacian: ``"normalized"`` or ``"unnormalized"``: which Laplacian ``lap`` is.
        init: optional warm start ``(B, n)`` or ``(B, n, k0)``.
        options: overrides :data:`OPTIONS`.

    Returns:
        z2 with unit norm and ``fix_sign`` applied, lambda2, and the number of graphs that fell
        back to the exact eigh (also added to :data:`STATS`).
    """
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian={laplacian!r} is not one of {LAPLACIANS}")
    opts = OPTIONS if options is None else options
    if not 1 <= opts.block <= 10:
        raise ValueError(f"block={opts.block} must be in 1..10 (search space 3 * block <= 32)")
    if lap.shape[-1] <= max(SMALL_N, 3 * opts.block + 1):
        return eigh_solver(lap, degree, laplacian=laplacian, init=init)
    with torch.no_grad():
        x, theta, z1, n_fallback = _solve(lap.detach(), degree.detach(), laplacian,
                                          None if init is None else init.detach(), opts)
    z = fix_sign(x[..., 0] / x[..., 0].norm(dim=-1, keepdim=True))  # (B, n)
    STATS.calls += 1
    STATS.items += lap.shape[0]
    STATS.forward_fallbacks += n_fallback
    z, lam = _RitzFiedler.apply(lap, z, theta[:, 0], z1, x[..., 1:], opts)
    return z, lam, n_fallback
