"""The exact Differentiable NCut layer against independent references."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from dncut.ncut import affinity_matrix, laplacian_matrix, normalized_cut


def clustered_features(b=3, n=24, c=32, k=2, seed=0, dtype=torch.float64, noise=0.3):
    """Features from k clusters. With C < n the relu graph W = f f^T has rank <= C, so the
    normalized Laplacian has eigenvalue 1 repeated: torch's generic eigh backward is NaN
    there, so reference comparisons use C > n."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, c, generator=g, dtype=dtype)
    labels = torch.randint(0, k, (b, n), generator=g)
    f = centres.gather(1, labels.unsqueeze(-1).expand(b, n, c)) + noise * torch.randn(b, n, c, generator=g, dtype=dtype)
    return f


def reference_z2(features, *, affinity="relu", tau=0.0, laplacian="normalized", eps=None):
    """Plain float64 autograd through torch.linalg.eigh, written independently of the layer."""
    f = F.normalize(features.double(), dim=-1)
    a = f @ f.transpose(1, 2)
    e = (1e-6 if affinity == "relu" else 1e-5) if eps is None else eps
    if affinity == "relu":
        w = a * (a > tau) + e * (a <= tau)
    else:
        w = (a > tau).double() + e * (a <= tau).double()
    d = w.sum(-1)
    if laplacian == "normalized":
        lap = torch.eye(w.shape[-1], dtype=w.dtype) - w / torch.sqrt(d.unsqueeze(-1) * d.unsqueeze(-2))
    else:
        lap = torch.diag_embed(d) - w
    evals, evecs = torch.linalg.eigh(lap)
    return evecs[..., 1], evals[:, 1]


def same_up_to_sign(a, b, atol):
    s = torch.sign((a * b).sum(-1, keepdim=True))
    return torch.allclose(a, s * b, atol=atol)


def sign_rule_holds(z):
    """Independent statement of the documented rule."""
    for zi in z:
        total = zi.sum().item()
        if abs(total) > 1e-6:
            assert total > 0
        else:
            assert zi[zi.abs().argmax()] > 0
    return True


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
@pytest.mark.parametrize("affinity", ["relu", "binary"])
def test_forward_matches_reference(affinity, laplacian):
    f = clustered_features(seed=1)
    out = normalized_cut(f, affinity=affinity, tau=0.2 if affinity == "binary" else 0.0, laplacian=laplacian)
    z_ref, lam_ref = reference_z2(f, affinity=affinity, tau=0.2 if affinity == "binary" else 0.0, laplacian=laplacian)
    assert torch.allclose(out.eigval, lam_ref, atol=1e-10)
    assert same_up_to_sign(out.eigvec, z_ref, atol=1e-8)
    assert torch.allclose(out.eigvec.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert sign_rule_holds(out.eigvec)


def test_generalized_eigvec_matches_scipy():
    """TokenCut's y2 of (D - W) y = lambda D y, from scipy's generalized solver."""
    f = clustered_features(b=2, n=30, c=40, seed=2)
    out = normalized_cut(f, affinity="binary", tau=0.2)
    for i in range(2):
        fi = F.normalize(f[i], dim=-1).numpy()
        a = fi @ fi.T
        w = np.where(a > 0.2, 1.0, 1e-5)
        d = np.diag(w.sum(1))
        vals, vecs = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 1])
        y = vecs[:, 0]
        y = y * np.sign(y.sum()) if abs(y.sum()) > 1e-12 else y
        got = out.gen_eigvec[i].numpy()
        # sign rule for y2 follows z2 (sum of z2 >= 0); compare up to sign, then check the D-scaling
        assert abs(abs(np.dot(got, d @ y)) - 1.0) < 1e-8
        assert np.allclose(np.abs(got), np.abs(y), atol=1e-7)
        assert abs(out.eigval[i].item() - vals[0]) < 1e-9


def test_two_disconnected_cliques_split_exactly():
    """Orthogonal features: W is block-diagonal up to eps, so z2 is constant on each clique."""
    n1, n2 = 5, 7
    f = torch.zeros(1, n1 + n2, 2, dtype=torch.float64)
    f[0, :n1, 0] = 1.0
    f[0, n1:, 1] = 1.0
    out = normalized_cut(f)
    z = out.eigvec[0]
    assert (z[:n1] > 0).all() == (z[n1:] < 0).all()
    assert torch.sign(z[:n1]).unique().numel() == 1 and torch.sign(z[n1:]).unique().numel() == 1
    assert torch.sign(z[0]) != torch.sign(z[-1])
    # hand-computed: within each clique z2 ∝ sqrt(degree) = sqrt(clique size) (up to eps)
    assert torch.allclose(z[:n1], z[0].expand(n1), atol=1e-6)
    assert torch.allclose(z[n1:], z[-1].expand(n2), atol=1e-6)
    # orthogonal to z1 ∝ D^1/2 1: n1*sqrt(n1)*z_a + n2*sqrt(n2)*z_b = 0, unit norm
    za, zb = z[0].item(), z[-1].item()
    assert abs(n1 * math.sqrt(n1) * za + n2 * math.sqrt(n2) * zb) < 1e-5
    assert abs(out.eigval[0].item()) < 1e-4  # nearly disconnected: lambda2 ~ 0


def test_path_graph_fiedler_is_cosine():
    """Unnormalized Laplacian of a path: z2_k ∝ cos(pi (k + 1/2) / n), lambda2 = 2 - 2 cos(pi / n).

    A path graph as features: with the relu affinity and tau between neighbour and
    non-neighbour similarities, W is the path adjacency (plus eps and self loops; self loops
    cancel in D - W). Features on a quarter circle with spacing below the threshold angle.
    """
    n = 10
    step = 0.05
    theta = torch.arange(n, dtype=torch.float64) * step
    f = torch.stack([torch.cos(theta), torch.sin(theta)], -1).unsqueeze(0)  # (1, n, 2)
    tau = math.cos(1.5 * step)  # only i ~ j and i == i pass
    # binary affinity gives unit weights on the path
    out = normalized_cut(f, affinity="binary", tau=tau, laplacian="unnormalized", eps=1e-12)
    k = torch.arange(n, dtype=torch.float64)
    expect = torch.cos(math.pi * (k + 0.5) / n)
    expect = expect / expect.norm()
    z = out.eigvec[0]
    assert abs(abs(torch.dot(z, expect).item()) - 1.0) < 1e-9
    assert abs(out.eigval[0].item() - (2 - 2 * math.cos(math.pi / n))) < 1e-9
    # normalized path Laplacian: also a known closed form for lambda2? check D^-1/2 z2 is monotone
    out_n = normalized_cut(f, affinity="binary", tau=tau, eps=1e-12)
    y = out_n.gen_eigvec[0]
    assert (torch.diff(y) > 0).all() or (torch.diff(y) < 0).all()


def test_float32_in_float32_out_and_accuracy():
    f = clustered_features(seed=3)
    out32 = normalized_cut(f.float())
    out64 = normalized_cut(f)
    assert out32.eigvec.dtype == torch.float32 and out32.eigval.dtype == torch.float32
    assert torch.allclose(out32.eigvec.double(), out64.eigvec, atol=1e-5)


def test_sign_rule_deterministic():
    f = clustered_features(seed=4)
    a = normalized_cut(f).eigvec
    b = normalized_cut(f.flip(0)).eigvec.flip(0)
    assert torch.equal(a, b)
    assert sign_rule_holds(a)
    c = normalized_cut(f, laplacian="unnormalized").eigvec
    assert sign_rule_holds(c)


# ----------------------------------------------------------------------------- backward


def test_gradcheck_float64():
    f = clustered_features(b=2, n=10, c=4, seed=5).requires_grad_(True)

    def fn(x):
        out = normalized_cut(x)
        return out.eigvec, out.eigval

    assert torch.autograd.gradcheck(fn, (f,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("laplacian", ["normalized", "unnormalized"])
def test_backward_matches_autograd_through_eigh(laplacian):
    f = clustered_features(b=3, n=20, c=32, seed=6)
    w_loss = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f1 = f.clone().requires_grad_(True)
    out = normalized_cut(f1, laplacian=laplacian)
    ((out.eigvec * w_loss).sum() + out.eigval.sum()).backward()
    f2 = f.clone().requires_grad_(True)
    z, lam = reference_z2(f2, laplacian=laplacian)
    z = z * torch.sign((z * out.eigvec.detach()).sum(-1, keepdim=True))  # same orientation
    ((z * w_loss).sum() + lam.sum()).backward()
    assert torch.allclose(f1.grad, f2.grad, rtol=1e-6, atol=1e-8)


def test_backward_float32_matches_float64():
    f = clustered_features(b=2, n=16, seed=7)
    g = {}
    for dt in (torch.float32, torch.float64):
        x = f.to(dt).requires_grad_(True)
        (normalized_cut(x).eigvec[:, :5].sum()).backward()
        g[dt] = x.grad.double()
        assert x.grad.dtype == dt
    assert torch.allclose(g[torch.float32], g[torch.float64], rtol=1e-4, atol=1e-5)


def test_finite_difference_sign_invariant_loss():
    """Directional derivative of sum(z2^4) (sign invariant) against central differences."""
    f = clustered_features(b=1, n=12, c=5, seed=8)
    d = torch.randn_like(f)
    x = f.clone().requires_grad_(True)
    (normalized_cut(x).eigvec ** 4).sum().backward()
    analytic = (x.grad * d).sum().item()
    h = 1e-6
    lp = (normalized_cut(f + h * d).eigvec ** 4).sum().item()
    lm = (normalized_cut(f - h * d).eigvec ** 4).sum().item()
    assert abs(analytic - (lp - lm) / (2 * h)) < 1e-6 * max(1.0, abs(analytic))


# ----------------------------------------------------------------------------- bad input


def test_nan_and_inf_raise_their_own_type_naming_the_batch_items():
    """Callers catch the type (a ValueError subclass), never the message text."""
    from dncut.ncut import NonFiniteFeaturesError

    f = clustered_features(b=4, n=8)
    f[1, 2, 0] = float("nan")
    f[3, 0, 1] = float("inf")
    with pytest.raises(NonFiniteFeaturesError, match=r"\[1, 3\]") as info:
        normalized_cut(f)
    assert info.value.items == [1, 3] and isinstance(info.value, ValueError)
    with pytest.raises(ValueError) as other:  # other bad input is not mistaken for non-finite features
        normalized_cut(clustered_features(b=1, n=1))
    assert not isinstance(other.value, NonFiniteFeaturesError)


@pytest.mark.parametrize("shape", [(8, 4), (2, 1, 4), (1, 2, 3, 4)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError):
        normalized_cut(torch.randn(*shape))


def test_bad_dtype_and_options():
    with pytest.raises(ValueError, match="float32 or float64"):
        normalized_cut(torch.ones(1, 4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="solver"):
        normalized_cut(torch.randn(1, 4, 3), solver="nope")
    with pytest.raises(ValueError, match="affinity"):
        normalized_cut(torch.randn(1, 4, 3), affinity="gauss")
    with pytest.raises(ValueError, match="laplacian"):
        normalized_cut(torch.randn(1, 4, 3), laplacian="random_walk")


def test_mismatched_devices():
    f = torch.randn(1, 4, 3)
    init = torch.randn(1, 4, device="meta")
    with pytest.raises(ValueError, match="device"):
        normalized_cut(f, init=init)


@pytest.mark.parametrize("kind", ["constant", "duplicated", "zeros", "two_values"])
def test_degenerate_graphs_finite(kind):
    b, n, c = 2, 9, 4
    if kind == "constant":
        f = torch.ones(b, n, c, dtype=torch.float64)
    elif kind == "zeros":
        f = torch.zeros(b, n, c, dtype=torch.float64)
    elif kind == "duplicated":
        f = clustered_features(b, n, c).repeat(1, 1, 1)
        f[:, 1:4] = f[:, :1]
    else:
        f = torch.ones(b, n, c, dtype=torch.float64)
        f[:, ::2, 0] = -1.0
    for dt in (torch.float32, torch.float64):
        x = f.to(dt).requires_grad_(True)
        out = normalized_cut(x)
        ((out.eigvec ** 2 * torch.arange(n)).sum() + out.eigval.sum()).backward()
        assert torch.isfinite(out.eigvec).all() and torch.isfinite(out.eigval).all()
        assert torch.isfinite(x.grad).all()
        assert torch.allclose(out.eigvec.double().norm(dim=-1), torch.ones(b, dtype=torch.float64), atol=1e-5)


def test_graph_building_blocks():
    f = F.normalize(torch.tensor([[[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]], dtype=torch.float64), dim=-1)
    w = affinity_matrix(f)
    # hand computed: cos = [[1, .6, -1], [.6, 1, -.6], [-1, -.6, 1]] -> negatives become eps
    expect = torch.tensor([[[1, .6, 1e-6], [.6, 1, 1e-6], [1e-6, 1e-6, 1]]], dtype=torch.float64)
    assert torch.allclose(w, expect)
    lap, d = laplacian_matrix(w, laplacian="unnormalized")
    assert torch.allclose(lap.sum(-1), torch.zeros(1, 3, dtype=torch.float64), atol=1e-12)
    lap_n, _ = laplacian_matrix(w)
    assert torch.allclose(lap_n @ d.sqrt().unsqueeze(-1), torch.zeros(1, 3, 1, dtype=torch.float64), atol=1e-12)


def test_autocast_does_not_reach_the_graph():
    """Under bf16 autocast (the backbone's, train.amp) f f^T must stay in the input dtype."""
    g = torch.Generator().manual_seed(7)
    f = torch.randn(3, 50, 24, generator=g)
    ref = normalized_cut(f, tau=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalized_cut(f, tau=0.1)
    assert out.eigvec.dtype == torch.float32
    torch.testing.assert_close(out.eigvec, ref.eigvec, rtol=0, atol=0)
    torch.testing.assert_close(out.eigval, ref.eigval, rtol=0, atol=0)
    f = torch.randn(2, 60, 24, generator=g)
    for solver_dtype in (torch.float32, torch.float64):  # the solver too runs outside autocast
        ref = normalized_cut(f, solver="lobpcg", solver_dtype=solver_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = normalized_cut(f, solver="lobpcg", solver_dtype=solver_dtype)
        torch.testing.assert_close(out.eigvec, ref.eigvec, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.0, -1e-6, 1.5])
def test_eps_outside_0_1_is_rejected(eps):
    with pytest.raises(ValueError, match="eps"):
        normalized_cut(torch.randn(1, 10, 4), eps=eps)


@pytest.mark.parametrize("solver", ["eigh", "lobpcg"])
def test_float32_solver_dtype_matches_float64(solver):
    """solver_dtype=float32 (inference) solves the same graph to float32 accuracy."""
    g = torch.Generator().manual_seed(8)
    centres = torch.randn(3, 40, generator=g)
    f = centres[torch.randint(0, 3, (4, 120), generator=g)] + 0.8 * torch.randn(4, 120, 40, generator=g)
    ref = normalized_cut(f.double(), tau=0.2, affinity="binary", solver="eigh")
    out = normalized_cut(f, tau=0.2, affinity="binary", solver=solver, solver_dtype=torch.float32, tol=1e-5)
    assert out.eigvec.dtype == torch.float32
    cos = (out.eigvec.double() * ref.eigvec).sum(-1).abs()
    assert (1 - cos).max().item() <= 1e-6
    assert (out.eigval.double() - ref.eigval).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="solver_dtype"):
        normalized_cut(f, solver_dtype=torch.float16)
