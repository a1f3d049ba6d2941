"""Fast batched Fiedler solver: block LOBPCG forward, deflated-CG backward (``solver="lobpcg"``).

lap (B, n, n), degree (B, n) -> z2 (B, n) (unit, ``fix_sign``), lambda2 (B,), n_fallback: the
contract of :func:`dncut.ncut.exact.eigh_solver`, without a full eigendecomposition. Only batched
matmuls, batched Cholesky (``cholesky_ex``, ``info`` checked per graph), triangular solves and
``eigh`` of (3k x 3k) <= 32 x 32 Rayleigh-Ritz matrices. Works in ``lap``'s dtype (float64 from
``normalized_cut``); tolerances are raised to 30 ulp for float32.

Forward, block LOBPCG (Knyazev 2001) on z1-perp, block k = 4, search space [X, R, P]:

* z1 is known (D^1/2 1 / ||.|| or 1 / sqrt(n)); every new direction is projected off [z1, X]
  twice, so the smallest Ritz pair is (lambda2, z2). Residuals of D - W are Jacobi-scaled.
* [R, P] is orthonormalised by shifted Cholesky-QR3 (Fukaya et al. 2020): the first Cholesky
  of the column-normalised Gram matrix carries a shift of ~11 (nm + m^2) u, so dependent or
  vanishing columns (R -> 0 at convergence, P in span X) cannot break it; two plain passes
  restore orthonormality. Exactly-zero columns (P at the start) are swapped for random ones.
* Convergence per graph: ||L z2 - lambda2 z2|| <= ``tol`` * bound (bound = 2, or 2 max degree;
  tol 1e-10 by default, ``normalized_cut`` passes 1e-7 for float32 features; |dz2| ~
  tol * bound / gap, |dlambda2| ~ (tol * bound)^2 / gap). Converged and
  broken graphs are frozen on the device at once (``torch.where``); every ``check_every``
  iterations one host sync ends the loop when all are done and, eagerly, compacts the batch.
  ``torch.linalg.eigh`` itself syncs on CUDA (it checks ``info``): one more sync per iteration.
* Fallback to ``torch.linalg.eigh`` for those graphs only: no convergence in ``max_iter``, a
  Cholesky ``info != 0``, non-finite values, or a failed final true-residual check. Counted in
  ``n_fallback`` and :data:`STATS`.
* Warm start ``init`` (B, n) or (B, n, k0): its first k columns join k seeded random ones
  (zero / non-finite columns are replaced); starting at the exact z2 converges at iteration 0.
* n <= ``SMALL_N`` (32) uses the exact solver directly (not a fallback).

Backward (Eq. 7-8 without Z): v = (lambda2 I - L)^+ g = (z1^T g / lambda2) z1 + v_perp, with
M v_perp = -P g, M = P (L - lambda2 I) P, P = I - z1 z1^T - z2 z2^T (PD on range P), solved by
deflated (Jacobi-preconditioned for D - W) CG (Saad et al. 2000): the other Ritz vectors
Y = [x3 .. x_{k+1}] enter in closed form (Galerkin on Y), CG runs M-orthogonally to them until
||r|| <= ``cg_tol`` ||b||; graphs that fail (cap, p^T M p <= 0, true-residual check) use the
exact formula. dl/dL = sym(v z2^T) + h z2 z2^T, as exact.py. Tiny gaps (exact.py's rule):
coefficients with |lambda2 - lambda_i| <= GAP_EPS * max(1, max_i L_ii) (within 2x of exact.py's
max(1, lambda_max)) are 0 -- z1's when lambda2 is tiny, Y directions with a tiny Galerkin
eigenvalue (also projected out of CG). Repeated eigenvalues and constant features give no NaN.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from dncut.ncut.exact import GAP_EPS, eigh_solver, pinv_coefficients
from dncut.ncut.graph import LAPLACIANS, Laplacian, fix_sign

__all__ = ["LobpcgOptions", "OPTIONS", "LobpcgStats", "STATS", "reset_stats", "lobpcg_solver", "SMALL_N",
           "REPLAYS", "MAX_REPLAYS", "clear_replays",
           "null_vector", "spectrum_bound", "reachable_tol", "resolvent_apply"]

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
        shrink: compact the working batch when at most this fraction is still iterating
            (eager runs only; a CUDA graph keeps the batch whole, frozen graphs stay put).
        cuda_graphs: keep a persistent forward step and a persistent backward CG step per
            shape (:data:`REPLAYS`, at most :data:`MAX_REPLAYS`): static buffers that each call
            copies its start into and, on CUDA, one captured CUDA graph of a step (forward: all
            between two Rayleigh-Ritz eigh calls), replayed by every later same-shape call; no
            batch compaction. Costs two more (B, n, n) copies of L per shape (one per step).
            Elsewhere (CPU) the same buffers run eagerly. Off by default until measured on a GPU
            (per-call capture, the earlier design, only matched eager speed on an H200).

    ``normalized_cut`` passes a ``tol`` (for float32 features :data:`dncut.ncut.DTYPE_TOL`, 1e-7)
    that replaces both ``tol`` and ``cg_tol`` for that call; pass ``tol=`` to it to choose.
    """

    block: int = 4
    max_iter: int = 100
    check_every: int = 2
    tol: float = 1e-10
    cg_tol: float = 1e-10
    cg_max_iter: int = 150
    shrink: float = 0.75
    cuda_graphs: bool = False


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


def reachable_tol(tol: float, dtype: torch.dtype, ulps: float = 30.0) -> float:
    """``tol`` raised to what ``dtype`` can reach (``ulps`` units): float32 gets ~4e-6 (30 ulp)."""
    return max(tol, ulps * torch.finfo(dtype).eps)


def _project_out(w: Tensor, q: Tensor) -> Tensor:
    """w - q q^T w for ``w (B, n, m)`` and orthonormal ``q (B, n, p)``."""
    return torch.baddbmm(w, q, q.mT @ w, alpha=-1.0)


def _cholqr_shift(n: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(m, m)`` shift 11 (nm + m(m+1)) u I of shifted Cholesky-QR (Fukaya et al. 2020)."""
    return 11.0 * (n * m + m * (m + 1)) * torch.finfo(dtype).eps * torch.eye(m, dtype=dtype, device=device)


def _orthonormalize(w: Tensor, q: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis of span(w) off span(q): shifted Cholesky-QR3 (Fukaya et al. 2020).

    w is projected off q twice; pass 1 factors the column-normalised Gram matrix plus a shift
    of ~11 (nm + m^2) u, so it succeeds however dependent the columns are (a dependent column
    comes out as a unit noise direction, harmless for Rayleigh-Ritz); two plain Cholesky-QR
    passes restore orthonormality to ~u. Exactly-zero columns must be replaced beforehand.

    Args:
        w: ``(B, n, m)`` candidate columns, none exactly zero.
        q: ``(B, n, p)`` orthonormal columns to stay off.
        shift: ``(m, m)`` from :func:`_cholqr_shift`.

    Returns:
        ``(w (B, n, m) orthonormal, info (B,) int)``; ``info != 0`` where a Cholesky
        factorisation failed (non-finite input).
    """
    w = _project_out(_project_out(w, q), q)
    gram = w.mT @ w  # (B, m, m)
    inv = gram.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(w.dtype).tiny).rsqrt()  # (B, m)
    chol, info = torch.linalg.cholesky_ex(gram * (inv.unsqueeze(-1) * inv.unsqueeze(-2)) + shift)
    w = _project_out(w @ torch.linalg.solve_triangular(chol.mT, torch.diag_embed(inv), upper=True, left=False), q)
    for _ in range(2):
        chol, info_k = torch.linalg.cholesky_ex(w.mT @ w)
        w = torch.linalg.solve_triangular(chol.mT, w, upper=True, left=False)  # w R^-1
        info = info + info_k
    return w, info


def _rr_matrix(s: Tensor, a_s: Tensor, safe: Tensor) -> tuple[Tensor, Tensor]:
    """2 x sym(s^T a_s) ``(B, m, m)`` for Rayleigh-Ritz on the orthonormal ``s (B, n, m)``.

    Non-finite graphs get ``safe (m, m)`` instead (eigh may raise on NaN) and ``ok (B,)`` False.
    """
    h = s.mT @ a_s  # (B, m, m)
    h = h + h.mT
    ok = torch.isfinite(h.sum((-2, -1)))  # (B,)
    return torch.where(ok[:, None, None], h, safe), ok


def _fill_empty(w: Tensor, spare: Tensor) -> Tensor:
    """Replace exactly-zero (or non-finite) columns of ``w (B, n, m)`` by those of ``spare``."""
    sq = w.square().sum(1, keepdim=True)  # (B, 1, m)
    return torch.where(sq > torch.finfo(w.dtype).tiny, w, spare)


# ----------------------------------------------------------------------------- forward


def _random_columns(lap: Tensor, m: int) -> Tensor:
    """``(B, n, m)`` standard normal columns from a fixed-seed generator on ``lap``'s device, the
    same ``(n, m)`` block for every graph: a graph's result does not depend on its batch (its
    size, its neighbours, its position), so batched and one-by-one inference agree."""
    gen = torch.Generator(device=lap.device).manual_seed(SEED)
    block = torch.randn(1, lap.shape[1], m, generator=gen, device=lap.device, dtype=lap.dtype)  # (1, n, m)
    return block.expand(lap.shape[0], -1, -1).contiguous()  # (B, n, m)


def _initial_columns(lap: Tensor, init: Tensor | None, k: int, spare: Tensor) -> Tensor:
    """Starting columns ``(B, n, k0 + k)``: up to k of ``init`` then the k columns of ``spare``.

    Zero or non-finite ``init`` columns are replaced by further random columns.
    """
    if init is None:
        return spare[..., :k]
    start = init.to(lap.dtype)
    if start.dim() == 2:
        start = start.unsqueeze(-1)  # (B, n, 1)
    start = start[..., :k]
    start = torch.where(torch.isfinite(start), start, 0.0)
    start = _fill_empty(start, spare[..., k:k + start.shape[-1]])
    return torch.cat([start, spare[..., :k]], dim=-1)  # (B, n, k0 + k)


@dataclass
class _State:
    """Tensors of one LOBPCG run, updated in place (so one CUDA graph can replay a step).

    Shapes: lap (B, n, n), q1 (B, n, 1) = z1, tol_abs (B,), spare (B, n, 2k), precond (B, n)
    or None; block x, ax = L x, p (B, n, k), theta (B, k); flags done, broken (B,); the
    expansion w (B, n, 2k), s = [x, w] and a_s = L s (B, n, 3k), h (B, 3k, 3k) = 2 s^T L s,
    good (B,); eigh of h into eig_val (B, 3k), eig_vec (B, 3k, 3k).
    """

    lap: Tensor
    q1: Tensor
    tol_abs: Tensor
    spare: Tensor
    precond: Tensor | None
    x: Tensor
    ax: Tensor
    theta: Tensor
    p: Tensor
    done: Tensor
    broken: Tensor
    w: Tensor
    s: Tensor
    a_s: Tensor
    h: Tensor
    good: Tensor
    eig_val: Tensor
    eig_vec: Tensor

    def rows(self, rows: Tensor) -> "_State":
        """The state of the graphs ``rows`` only (compaction)."""
        return _State(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                         for f in fields(self)})


def _expand(st: _State, shift: Tensor, safe: Tensor) -> None:
    """Residual test, then new directions [R, P] and the Rayleigh-Ritz matrix, in place."""
    r = torch.addcmul(st.ax, st.x, st.theta.unsqueeze(1), value=-1.0)  # (B, n, k) = L X - X Theta
    st.done.logical_or_(r[..., 0].norm(dim=-1) <= st.tol_abs)
    if st.precond is not None:
        r = r * st.precond.unsqueeze(-1)
    w, info = _orthonormalize(_fill_empty(torch.cat([r, st.p], -1), st.spare), torch.cat([st.q1, st.x], -1), shift)
    st.w.copy_(w)  # (B, n, 2k)
    torch.cat([st.x, w], -1, out=st.s)  # (B, n, 3k)
    torch.cat([st.ax, st.lap @ w], -1, out=st.a_s)  # (B, n, 3k)
    h, ok = _rr_matrix(st.s, st.a_s, safe)
    st.h.copy_(h)
    st.good.copy_(ok & (info == 0))


def _update(st: _State, keep: Tensor) -> None:
    """Accept the k smallest Ritz pairs of ``eig_*`` for the live graphs, in place.

    Frozen graphs (converged or broken) take the coefficients ``keep`` = [I_k; 0] ``(3k, k)``,
    which reproduce their block x exactly from s = [x, w] (and give p = 0, refilled later).
    """
    k = st.x.shape[-1]
    live = ~(st.done | st.broken)
    upd = live & st.good
    st.broken.logical_or_(live ^ upd)  # a live graph that failed a factorisation or went non-finite
    c = torch.where(upd[:, None, None], st.eig_vec[..., :k], keep)  # (B, 3k, k)
    torch.bmm(st.s, c, out=st.x)
    torch.bmm(st.a_s, c, out=st.ax)
    torch.bmm(st.w, c[:, k:], out=st.p)
    st.theta.copy_(torch.where(upd[:, None], 0.5 * st.eig_val[:, :k], st.theta))


def _capture(step, device: torch.device):
    """A CUDA graph of the in-place ``step()``, or None if capture fails."""
    try:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
        return graph
    except RuntimeError as err:  # an op that cannot be captured: stay eager
        logger.debug("lobpcg: CUDA graph capture failed (%s); running eagerly", err)
        return None


@dataclass
class _Replay:
    """A persistent in-place step (``cuda_graphs``): static buffers reused by same-shape calls.

    Each call copies its start into ``state`` (a dataclass of tensors); ``step()`` runs
    ``fn(state)`` -- replayed from one captured CUDA graph on CUDA (captured after one eager run),
    eagerly on the same buffers elsewhere or if capture failed.
    """

    state: Any
    fn: Callable[[Any], None]
    device: torch.device
    graph: "torch.cuda.CUDAGraph | None" = None
    eager_runs: int = 0
    tried: bool = False

    def step(self) -> None:
        if self.graph is None and not self.tried and self.eager_runs >= 1 and self.device.type == "cuda":
            self.tried = True
            self.graph = _capture(lambda: self.fn(self.state), self.device)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(self.state)
            self.eager_runs += 1


REPLAYS: "OrderedDict[tuple, _Replay]" = OrderedDict()
"""Persistent steps by (kind, shapes, dtype, device), least recently used first."""
MAX_REPLAYS = 4


def clear_replays() -> None:
    """Drop the persistent steps (and their buffers and CUDA graphs)."""
    REPLAYS.clear()


def _clone(obj):
    """Own copies of the tensors of a dataclass (recursively); None stays None."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    return type(obj)(**{f.name: None if getattr(obj, f.name) is None else _clone(getattr(obj, f.name))
                        for f in fields(obj)})


def _load(dst, src) -> None:
    """Copy the tensors of dataclass ``src`` into the same-shape ones of ``dst``, in place."""
    for f in fields(src):
        value = getattr(src, f.name)
        if isinstance(value, Tensor):
            getattr(dst, f.name).copy_(value)
        elif value is not None:
            _load(getattr(dst, f.name), value)


def _persistent(key: tuple, start, fn: Callable[[Any], None], device: torch.device) -> _Replay:
    """The persistent step ``key``, its buffers loaded with ``start``.

    A new entry owns copies of ``start``: the caller's tensors (L, z1 -- saved for backward) are
    never buffers that a later call overwrites. The fields are copied whole on each call; the
    scratch ones (w, s, a_s, h, eig_*) are rewritten before they are read.
    """
    rep = REPLAYS.get(key)
    if rep is None:
        # normal tensors (later calls may run outside inference mode), without autograd history
        with torch.inference_mode(False), torch.no_grad():
            rep = REPLAYS[key] = _Replay(_clone(start), fn, device)
        while len(REPLAYS) > MAX_REPLAYS:
            REPLAYS.popitem(last=False)
    else:
        _load(rep.state, start)
        REPLAYS.move_to_end(key)
    return rep


@dataclass
class _Forward:
    """What one forward step reads and writes: the state plus its constants (see ``_iterate``)."""

    st: _State
    shift: Tensor
    safe: Tensor
    keep: Tensor


def _forward_step(f: _Forward) -> None:
    _update(f.st, f.keep)
    _expand(f.st, f.shift, f.safe)


def _iterate(lap: Tensor, z1: Tensor, bound: Tensor, init: Tensor | None, opts: LobpcgOptions,
             precond: Tensor | None = None) -> tuple["_State", int]:
    """Block LOBPCG on z1-perp for the k smallest eigenpairs; see the module docstring.

    Args:
        lap: ``(B, n, n)``. z1: ``(B, n)`` unit null vector. bound: ``(B,)`` spectrum bound.
        init: optional warm start ``(B, n)`` or ``(B, n, k0)``. opts: the knobs.
        precond: optional diagonal preconditioner ``(B, n)`` applied to the residuals.

    Returns:
        ``(state, iterations)``: the whole batch's final block ``x``, ``theta`` and flags
        ``done`` (converged), ``broken`` (Cholesky info or non-finite values seen); with
        ``cuda_graphs`` these four are copies, the other fields are the persistent buffers
        (valid until the next same-shape call).
    """
    k = opts.block
    b, n, _ = lap.shape
    q1 = z1.unsqueeze(-1)  # (B, n, 1)
    spare = _random_columns(lap, 2 * k)  # (B, n, 2k): start, and stand-ins for empty columns
    start = _initial_columns(lap, init, k, spare)  # (B, n, m0)
    w, info = _orthonormalize(start, q1, _cholqr_shift(n, start.shape[-1], lap.dtype, lap.device))
    aw = lap @ w  # (B, n, m0)
    h, ok = _rr_matrix(w, aw, torch.eye(start.shape[-1], dtype=lap.dtype, device=lap.device))
    theta, c = torch.linalg.eigh(h)
    theta, x = 0.5 * theta, w @ c[..., :k]  # (B, m0), (B, n, k)
    st = _State(lap=lap, q1=q1, tol_abs=opts.tol * bound, spare=spare, precond=precond, x=x,
                ax=aw @ c[..., :k], theta=theta[:, :k].contiguous(), p=torch.zeros_like(x),
                done=torch.zeros(b, dtype=torch.bool, device=lap.device), broken=~(ok & (info == 0)),
                w=lap.new_empty(b, n, 2 * k), s=lap.new_empty(b, n, 3 * k), a_s=lap.new_empty(b, n, 3 * k),
                h=lap.new_empty(b, 3 * k, 3 * k), good=torch.zeros(b, dtype=torch.bool, device=lap.device),
                eig_val=lap.new_empty(b, 3 * k), eig_vec=lap.new_empty(b, 3 * k, 3 * k))
    shift = _cholqr_shift(n, 2 * k, lap.dtype, lap.device)  # (2k, 2k)
    safe = torch.eye(3 * k, dtype=lap.dtype, device=lap.device)  # (3k, 3k)
    keep = safe[:, :k]  # (3k, k)
    rep = None
    if opts.cuda_graphs:
        key = ("forward", b, n, k, lap.dtype, lap.device, precond is None)
        rep = _persistent(key, _Forward(st, shift, safe, keep), _forward_step, lap.device)
        st, shift, safe, keep = rep.state.st, rep.state.shift, rep.state.safe, rep.state.keep
    out = st
    idx = torch.arange(b, device=lap.device)
    _expand(st, shift, safe)  # iteration 0: residual test of the initial block
    it = 0
    while True:
        if it % opts.check_every == 0 or it == opts.max_iter:
            finished = st.done | st.broken
            n_active = int((~finished).sum())  # the one host sync of this check
            if n_active == 0 or it == opts.max_iter:
                break
            if rep is None and n_active <= opts.shrink * idx.numel():  # compact to the live graphs
                if st is not out:
                    _write_back(out, st, idx)
                rows = torch.nonzero(~finished).flatten()
                idx, st = idx[rows], st.rows(rows)
        torch.linalg.eigh(st.h, out=(st.eig_val, st.eig_vec))  # (3k x 3k) Rayleigh-Ritz; syncs on CUDA
        if rep is None:
            _update(st, keep)
            _expand(st, shift, safe)
        else:
            rep.step()
        it += 1
    if st is not out:
        _write_back(out, st, idx)
    if rep is not None:  # the buffers belong to the next same-shape call
        out = _State(**{f.name: getattr(out, f.name) for f in fields(out)})
        out.x, out.theta, out.done, out.broken = out.x.clone(), out.theta.clone(), out.done.clone(), out.broken.clone()
        out.lap = lap
    STATS.iterations += it
    return out, it


def _write_back(out: _State, st: _State, idx: Tensor) -> None:
    """Copy the block of the compacted state ``st`` into the rows ``idx`` of ``out``."""
    out.x[idx], out.theta[idx], out.done[idx], out.broken[idx] = st.x, st.theta, st.done, st.broken


def _solve(lap: Tensor, degree: Tensor, laplacian: Laplacian, init: Tensor | None,
           opts: LobpcgOptions) -> tuple[Tensor, Tensor, Tensor, int]:
    """Forward without autograd: ``(ritz vectors (B, n, k), ritz values (B, k), z1 (B, n), n_fallback)``."""
    z1 = null_vector(degree.to(lap.dtype), laplacian)  # (B, n)
    bound = spectrum_bound(degree.to(lap.dtype), laplacian)  # (B,)
    precond = _jacobi(lap, laplacian)  # (B, n) or None
    opts = replace(opts, tol=reachable_tol(opts.tol, lap.dtype))
    blk, _ = _iterate(lap, z1, bound, init, opts, precond)
    x, theta = blk.x, blk.theta
    res = torch.addcmul(lap @ x[..., :1], theta[:, None, :1], x[..., :1], value=-1.0).norm(dim=(1, 2))  # (B,)
    bad = ~(blk.done & ~blk.broken & (res <= 10.0 * opts.tol * bound) & torch.isfinite(x).flatten(1).all(-1))
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


@dataclass
class _Cg:
    """Deflated preconditioned CG on M = P (L - lambda2 I) P (see :func:`resolvent_apply`).

    Shapes: lap (B, n, n), lam3 (B, 1, 1), qb (B, n, m + 2) hard-deflated directions, yd and
    myd (B, n, m) the Galerkin directions Y and M Y, coef (B, m, 1) = 1 / diag(Y^T M Y) (0 where
    degenerate), cdiag (B, n, 1) Jacobi or None; iterate x, residual r, direction p (B, n, 1),
    rz = r^T z and target (B, 1, 1), active (B, 1, 1) bool.
    """

    lap: Tensor
    lam3: Tensor
    qb: Tensor
    yd: Tensor
    myd: Tensor
    coef: Tensor
    cdiag: Tensor | None
    target: Tensor | None = None
    x: Tensor | None = None
    r: Tensor | None = None
    p: Tensor | None = None
    rz: Tensor | None = None
    active: Tensor | None = None


def _cg_op(c: _Cg, v: Tensor) -> Tensor:
    """M v ``(B, n, c)``: (L - lambda2 I) v with the deflated directions projected out."""
    return _project_out(torch.addcmul(c.lap @ v, c.lam3, v, value=-1.0), c.qb)


def _cg_search(c: _Cg, rv: Tensor) -> Tensor:
    """Preconditioned, deflated direction z - Y E^+ (M Y)^T z of the residual ``rv (B, n, 1)``."""
    zv = rv if c.cdiag is None else _project_out(c.cdiag * rv, c.qb)
    return torch.baddbmm(zv, c.yd, c.coef * (c.myd.mT @ zv), alpha=-1.0)


def _cg_step(c: _Cg) -> None:
    """One CG step for the active graphs, in place (alpha = 0 freezes the others)."""
    tiny = torch.finfo(c.x.dtype).tiny
    mp = _cg_op(c, c.p)
    alpha = c.rz / (c.p.mT @ mp).clamp_min(tiny) * c.active
    c.x.addcmul_(alpha, c.p)
    c.r.addcmul_(alpha, mp, value=-1.0)
    zn = _cg_search(c, c.r)
    rz_new = c.r.mT @ zn
    c.p.copy_(torch.addcmul(zn, rz_new / c.rz.clamp_min(tiny), c.p))
    c.rz.copy_(rz_new)
    c.active.logical_and_((c.r.mT @ c.r) > c.target)


def resolvent_apply(lap: Tensor, z1: Tensor, z: Tensor, lam: Tensor, ritz: Tensor, g: Tensor,
                    opts: LobpcgOptions = OPTIONS, precond: Tensor | None = None) -> tuple[Tensor, int, int]:
    """v = (lambda2 I - L)^+ g without the eigendecomposition (deflated preconditioned CG).

    Args:
        lap: ``(B, n, n)``. z1: ``(B, n)`` null vector. z: ``(B, n)`` z2. lam: ``(B,)`` lambda2.
        ritz: ``(B, n, m)`` further Ritz vectors (x3 ...), orthonormal, off z1 and z2.
        g: ``(B, n)`` the vector to map.
        opts: tolerances (``cg_tol``, ``cg_max_iter``, ``check_every``).
        precond: optional positive diagonal ``(B, n)`` (Jacobi), applied as P C P.

    Returns:
        ``(v (B, n), n_fallback, cg_iterations)``.
    """
    dtype = lap.dtype
    gap_eps = GAP_EPS * _gap_scale(lap)  # (B,)
    c1 = torch.where(lam.abs() > gap_eps, 1.0 / torch.where(lam.abs() > gap_eps, lam, 1.0), 0.0)  # (B,)
    v1 = (c1 * (z1 * g).sum(-1)).unsqueeze(-1) * z1  # (B, n) closed form along z1 (lambda1 = 0)
    q2 = torch.stack([z1, z], dim=-1)  # (B, n, 2)
    lam3 = lam[:, None, None]  # (B, 1, 1)

    def shifted(v: Tensor) -> Tensor:
        return torch.addcmul(lap @ v, lam3, v, value=-1.0)  # (L - lambda2 I) v, (B, n, c)

    u = _project_out(ritz, q2)  # (B, n, m)
    mu = _project_out(shifted(u), q2)  # (B, n, m)
    e_mat = u.mT @ mu
    e_mat = 0.5 * (e_mat + e_mat.mT)  # (B, m, m) Galerkin matrix of M on span(U)
    e_ok = torch.isfinite(e_mat.sum((-2, -1)))  # (B,)
    e_mat = torch.where(e_ok[:, None, None], e_mat, torch.eye(e_mat.shape[-1], dtype=dtype, device=lap.device))
    e, rot = torch.linalg.eigh(e_mat)  # (B, m), (B, m, m)
    y, my = u @ rot, mu @ rot  # (B, n, m): Y^T M Y = diag(e)
    null = e.abs() <= gap_eps.unsqueeze(-1)  # (B, m): degenerate with lambda2 -> coefficient 0
    coef = torch.where(null, 0.0, 1.0 / torch.where(null, 1.0, e)).unsqueeze(-1)  # (B, m, 1)
    live = (~null).to(dtype).unsqueeze(1)  # (B, 1, m)
    yd, myd = y * live, my * live
    qb = torch.cat([q2, y * (1.0 - live)], dim=-1)  # (B, n, m + 2): hard-deflated directions
    cg = _Cg(lap=lap, lam3=lam3, qb=qb, yd=yd, myd=myd, coef=coef,
             cdiag=None if precond is None else precond.unsqueeze(-1))
    b = -_project_out(g.unsqueeze(-1), qb)  # (B, n, 1)
    cg.target = reachable_tol(opts.cg_tol, dtype, 300.0) ** 2 * (b.mT @ b)  # (B, 1, 1) on squared norms
    cg.x = yd @ (coef * (yd.mT @ b))  # (B, n, 1): Galerkin part on Y, closed form
    cg.r = torch.baddbmm(b, myd, coef * (yd.mT @ b), alpha=-1.0)  # residual, off span(Y)
    cg.p = _cg_search(cg, cg.r)
    cg.rz = cg.r.mT @ cg.p  # (B, 1, 1)
    cg.active = (cg.r.mT @ cg.r) > cg.target
    live_cg = cg
    rep = None
    if opts.cuda_graphs:
        key = ("cg", *yd.shape, dtype, lap.device, precond is None)
        rep = _persistent(key, cg, _cg_step, lap.device)
        live_cg = rep.state
    it = 0
    while it < opts.cg_max_iter and bool(live_cg.active.any()):  # the one host sync per check_every steps
        for _ in range(min(opts.check_every, opts.cg_max_iter - it)):
            if rep is None:
                _cg_step(cg)
            else:
                rep.step()
            it += 1
    x, active = (cg.x, cg.active) if rep is None else (live_cg.x.clone(), live_cg.active.clone())
    tiny = torch.finfo(dtype).tiny
    # p^T M p <= 0 (M not PD: an undeflated tiny gap) or NaN blows x up: the true residual catches it
    true_res = (b - _cg_op(cg, x)).square().sum((1, 2))  # (B,)
    allowed = torch.maximum(100.0 * cg.target, (1e3 * torch.finfo(dtype).eps) ** 2 * (b.mT @ b)).flatten()  # (B,)
    bad = active.flatten() | ~(true_res <= allowed + tiny) | ~torch.isfinite(x).flatten(1).all(-1) | ~e_ok
    v = v1 + x.squeeze(-1)
    rows = torch.nonzero(bad).flatten()
    if rows.numel():
        v = v.index_copy(0, rows, _exact_resolvent(lap[rows], g[rows]))
        logger.debug("lobpcg backward: %d of %d graphs used the exact formula", rows.numel(), lap.shape[0])
    return v, int(rows.numel()), it


def _jacobi(lap: Tensor, laplacian: Laplacian) -> Tensor | None:
    """Diagonal preconditioner ``(B, n)`` 1 / L_ii for D - W (wide diagonal); None for I - ..."""
    if laplacian == "normalized":
        return None
    return 1.0 / lap.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(lap.dtype).tiny ** 0.5)


class _RitzFiedler(torch.autograd.Function):
    """Packages the forward's (z2, lambda2) with the deflated-CG backward of Eq. 7-8."""

    @staticmethod
    def forward(ctx, lap: Tensor, z: Tensor, lam: Tensor, z1: Tensor, ritz: Tensor,
                laplacian: Laplacian, opts: LobpcgOptions) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(lap, z, lam, z1, ritz)
        ctx.opts, ctx.laplacian = opts, laplacian
        return z.clone(), lam.clone()

    @staticmethod
    def backward(ctx, g_z: Tensor | None, g_lam: Tensor | None):
        lap, z, lam, z1, ritz = ctx.saved_tensors
        v = torch.zeros_like(z)
        if g_z is not None:
            v, n_bad, n_it = resolvent_apply(lap, z1, z, lam, ritz, g_z.to(lap.dtype), ctx.opts,
                                             _jacobi(lap, ctx.laplacian))
            STATS.backward_calls += 1
            STATS.backward_fallbacks += n_bad
            STATS.cg_iterations += n_it
        second = 0.5 * v if g_lam is None else 0.5 * v + g_lam.to(lap.dtype).unsqueeze(-1) * z  # (B, n)
        grad = torch.stack([0.5 * v, z], -1) @ torch.stack([z, second], -1).mT  # (B, n, n) sym(v z^T) + h z z^T
        return grad, None, None, None, None, None, None


def lobpcg_solver(lap: Tensor, degree: Tensor, *, laplacian: Laplacian, init: Tensor | None = None,
                  tol: float | None = None, options: LobpcgOptions | None = None) -> tuple[Tensor, Tensor, int]:
    """Fast solver: ``(z2 (B, n), lambda2 (B,), n_fallback)``; differentiable w.r.t. ``lap``.

    Args:
        lap: ``(B, n, n)`` Laplacian (float64 from ``normalized_cut``; any float dtype works).
        degree: ``(B, n)`` node degrees (gives z1 and the spectrum bound; not differentiated).
        laplacian: ``"normalized"`` or ``"unnormalized"``: which Laplacian ``lap`` is.
        init: optional warm start ``(B, n)`` or ``(B, n, k0)``.
        tol: sets both ``options.tol`` (forward residual relative to the spectrum bound) and
            ``options.cg_tol`` (backward CG relative residual); ``None`` keeps them (1e-10).
        options: overrides :data:`OPTIONS`.

    Returns:
        z2 with unit norm and ``fix_sign`` applied, lambda2, and the number of graphs that fell
        back to the exact eigh (also added to :data:`STATS`).
    """
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian={laplacian!r} is not one of {LAPLACIANS}")
    opts = OPTIONS if options is None else options
    if tol is not None:
        if not 0.0 < tol < 1.0:
            raise ValueError(f"tol={tol} must be in (0, 1)")
        opts = replace(opts, tol=tol, cg_tol=tol)
    if not 1 <= opts.block <= 10:
        raise ValueError(f"block={opts.block} must be in 1..10 (search space 3 * block <= 32)")
    if lap.shape[-1] <= max(SMALL_N, 3 * opts.block + 1):
        return eigh_solver(lap, degree, laplacian=laplacian)
    with torch.no_grad():
        x, theta, z1, n_fallback = _solve(lap.detach(), degree.detach(), laplacian,
                                          None if init is None else init.detach(), opts)
    z = fix_sign(x[..., 0] / x[..., 0].norm(dim=-1, keepdim=True))  # (B, n)
    STATS.calls += 1
    STATS.items += lap.shape[0]
    STATS.forward_fallbacks += n_fallback
    z, lam = _RitzFiedler.apply(lap, z, theta[:, 0], z1, x[..., 1:], laplacian, opts)
    return z, lam, n_fallback
