"""Benchmark the NCut layer against a plain ``torch.linalg.eigh`` + autograd baseline.

For each (B, n) it times, on the same inputs (features ``(B, n, 384)`` float32):

* ``baseline``: L built the same way, ``torch.linalg.eigh(L)`` with PyTorch's generic eigh
  backward (O(n^3) per graph), z2 = eigvecs[..., 1];
* each dncut solver (``eigh``: full eigh forward, Eq. 7-8 backward; ``lobpcg``: block LOBPCG
  forward, deflated-CG backward).

Reported per case: forward ms, forward+backward ms, backward-alone ms (best of the repeats; a
method whose warm-up call takes longer than ``--max-seconds`` is repeated fewer times), peak
memory (CUDA: ``max_memory_allocated``; CPU: growth of the process's max RSS), accuracy against
the exact z2 (min |cos|, max |lambda2 error|), the solver's fallback count, and for ``lobpcg``
the iterations per forward, CG iterations per backward and backward fallbacks; and the number
of aten ops (views excluded) of one forward+backward, the kernel launches on CUDA.

Run::

    python bench/ncut_layer.py                        # CPU: (64, 196), (16, 784)
    python bench/ncut_layer.py --device cuda          # GPU: (512, 196), (128, 784)
    python bench/ncut_layer.py --sizes 8x196 --repeats 2 --out /tmp/x.json
    python bench/ncut_layer.py --solvers lobpcg --no-baseline   # only the fast solver

JSON goes to stdout and to ``--out`` (default ``bench/results/ncut_layer_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dncut.ncut import SOLVERS, affinity_matrix, fix_sign, laplacian_matrix, lobpcg, normalized_cut

DEFAULT_SIZES = {"cpu": ["64x196", "16x784"], "cuda": ["512x196", "128x784"]}


def make_features(b: int, n: int, c: int, device: str, seed: int = 0) -> torch.Tensor:
    """Clustered features ``(b, n, c)``: a foreground blob and background, like patch keys."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(n ** 0.5))
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = torch.rand(b, 2, generator=g) * side * 0.5 + side * 0.25
    r = (torch.rand(b, generator=g) * 0.25 + 0.15) * side
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    fg = (d2 < r[:, None, None] ** 2).flatten(1)[:, :n].float()  # (b, n)
    proto = torch.randn(b, 2, c, generator=g)
    f = proto[:, :1] * (1 - fg[..., None]) + proto[:, 1:] * fg[..., None]
    f = f + 0.8 * torch.randn(b, n, c, generator=g)
    return f.to(device)


def graph_of(features: torch.Tensor) -> torch.Tensor:
    """L ``(B, n, n)`` float64 as ``normalized_cut`` builds it (f f^T in the input dtype, W and L float64)."""
    return laplacian_matrix(affinity_matrix(F.normalize(features, dim=-1), dtype=torch.float64))[0]


def baseline_forward(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain eigh + autograd on the same graph as the layer's."""
    evals, evecs = torch.linalg.eigh(graph_of(features))
    return fix_sign(evecs[..., 1]).to(features.dtype), evals[:, 1].to(features.dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fit_repeats(repeats: int, max_seconds: float, one_call_s: float) -> int:
    """At most ``repeats``, at least 1, and no more than fit in ``max_seconds``."""
    return max(1, min(repeats, int(min(max_seconds / max(one_call_s, 1e-9), repeats))))


def timed(fn, device: str, repeats: int, max_seconds: float = float("inf")) -> tuple[float, object]:
    """Best wall time (ms) of ``fn`` after one warm-up call; fewer repeats if the call is slow."""
    t0 = time.perf_counter()
    out = fn()  # warm-up
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(fit_repeats(repeats, max_seconds, warm)):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), out


# ops that only make views / metadata: no kernel launch on CUDA
VIEW_OPS = {"aten::mT", "aten::unsqueeze", "aten::slice", "aten::select", "aten::expand", "aten::view",
            "aten::transpose", "aten::diagonal", "aten::reshape", "aten::squeeze", "aten::as_strided",
            "aten::t", "aten::permute", "aten::alias", "aten::detach", "aten::flatten", "aten::to",
            "aten::lift_fresh", "aten::empty", "aten::result_type", "aten::empty_like", "aten::new_empty",
            "aten::_unsafe_view", "aten::expand_as", "aten::numpy_T", "aten::contiguous"}


def count_ops(fn) -> int:
    """Top-level (dispatched from Python or autograd) aten calls of ``fn()`` that do work, views
    excluded: a device-independent count of kernel launches, which bound small-batch GPU time."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def loss_of(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """A sign-invariant loss touching z2 and lambda2."""
    return (z ** 4).sum() + lam.sum()


def bench_one(name: str, forward, features: torch.Tensor, device: str, repeats: int,
              max_seconds: float = float("inf")) -> dict:
    def fwd():
        with torch.no_grad():
            return forward(features)

    def fwd_bwd():
        x = features.detach().requires_grad_(True)
        z, lam = forward(x)[:2]
        loss_of(z, lam).backward()
        return x.grad

    def bwd_only():
        x = features.detach().requires_grad_(True)
        z, lam = forward(x)[:2]
        loss = loss_of(z, lam)
        sync(device)
        t0 = time.perf_counter()
        loss.backward()
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_ms, out = timed(fwd, device, repeats, max_seconds)
    lobpcg.reset_stats()
    fb_ms, _ = timed(fwd_bwd, device, repeats, max_seconds)
    stats = lobpcg.reset_stats()
    first = bwd_only()
    bwd_ms = min([first] + [bwd_only() for _ in range(fit_repeats(repeats, max_seconds, first * 1e-3) - 1)])
    row = {"method": name, "forward_ms": round(fwd_ms, 3), "forward_backward_ms": round(fb_ms, 3),
           "backward_ms": round(bwd_ms, 3), "ops_forward_backward": count_ops(fwd_bwd)}
    if device == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        row["peak_rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    row["_z"], row["_lam"] = out[0].double(), out[1].double()
    if len(out) > 2:
        row["fallbacks"] = int(out[2])
    if stats.calls:
        row["lobpcg_iterations_per_forward"] = round(stats.iterations / stats.calls, 2)
        row["cg_iterations_per_backward"] = round(stats.cg_iterations / max(stats.backward_calls, 1), 2)
        row["backward_fallbacks"] = stats.backward_fallbacks
    return row


def layer(solver: str):
    def forward(x):
        r = normalized_cut(x, solver=solver)
        return r.eigvec, r.eigval, r.n_fallback
    return forward


def eig_backward_only(features: torch.Tensor, device: str, repeats: int) -> dict:
    """Backward of the eigen step alone, from the same L (B, n, n) float64 with grad.

    The layer's Eq. 7-8 backward (O(n^2) per graph given Z) against PyTorch's generic eigh
    backward (O(n^3): Z (F o Z^T G Z) Z^T); graph construction is excluded from both.
    """
    from dncut.ncut.exact import eigh_solver

    with torch.no_grad():
        lap = graph_of(features)

    def generic():
        x = lap.clone().requires_grad_(True)
        evals, evecs = torch.linalg.eigh(x)
        return x, (evecs[..., 1] ** 4).sum() + evals[:, 1].sum()

    def eq78():
        x = lap.clone().requires_grad_(True)
        z, lam, _ = eigh_solver(x, None, laplacian=None)  # the exact solver: Eq. 7-8 backward; degree unused
        return x, (z ** 4).sum() + lam.sum()

    out = {}
    for name, make in (("generic_eigh_backward_ms", generic), ("eq7_8_backward_ms", eq78)):
        times = []
        for _ in range(repeats + 1):
            _, loss = make()
            sync(device)
            t0 = time.perf_counter()
            loss.backward()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = round(min(times[1:]), 3)
    out["speedup"] = round(out["generic_eigh_backward_ms"] / max(out["eq7_8_backward_ms"], 1e-9), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="*", help="BxN cases, e.g. 64x196 16x784")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="repeat a measurement at most this long (slow eigh baselines run once or twice)")
    ap.add_argument("--solvers", nargs="*", default=sorted(SOLVERS), help=f"dncut solvers (have: {sorted(SOLVERS)})")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = args.sizes or DEFAULT_SIZES[args.device]
    report = {"bench": "ncut_layer", "device": args.device, "torch": torch.__version__,
              "machine": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "channels": args.channels, "dtype": "float32", "cases": []}
    for size in sizes:
        b, n = map(int, size.lower().split("x"))
        feats = make_features(b, n, args.channels, args.device)
        rows = []
        if not args.no_baseline:
            rows.append(bench_one("baseline_eigh_autograd", baseline_forward, feats, args.device, args.repeats,
                                  args.max_seconds))
        for s in args.solvers:
            rows.append(bench_one(f"dncut_{s}", layer(s), feats, args.device, args.repeats, args.max_seconds))
        exact = next((r for r in rows if r["method"] in ("baseline_eigh_autograd", "dncut_eigh")), None)
        if exact is None:
            with torch.no_grad():
                ref_z, ref_lam = (t.double() for t in baseline_forward(feats))
        else:
            ref_z, ref_lam = exact["_z"], exact["_lam"]
        for r in rows:
            r["min_abs_cos_vs_exact"] = round(float((r["_z"] * ref_z).sum(-1).abs().min()), 7)
            r["max_abs_lambda2_err"] = float((r["_lam"] - ref_lam).abs().max())
            del r["_z"], r["_lam"]
        case = {"B": b, "n": n, "results": rows}
        base = next((r for r in rows if r["method"] == "baseline_eigh_autograd"), None)
        if base:
            case["speedup_vs_baseline"] = {
                r["method"]: {k: round(base[k] / max(r[k], 1e-9), 2) for k in ("forward_ms", "forward_backward_ms", "backward_ms")}
                for r in rows if r is not base}
        case["eig_backward_only"] = eig_backward_only(feats, args.device, args.repeats)
        report["cases"].append(case)
        print(json.dumps(case), flush=True)
    out = Path(args.out or f"bench/results/ncut_layer_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
