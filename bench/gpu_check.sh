#!/usr/bin/env bash
# GPU check of the fast NCut solver, one prepared script: ~2-3 min on one H200, < 6 min.
#   bash bench/gpu_check.sh          (device tool: timeout_s 420, then give the machine back)
#   1. correctness of solver="lobpcg" against "eigh" on CUDA, float32 and float64 features, both
#      Laplacians (|cos|, lambda2 error, gradient of a sign-invariant loss, fallbacks; prints
#      CORRECTNESS PASS/FAIL), the host syncs of one forward+backward, CUDA graphs vs eager, a
#      small sweep of the solver's options and tol, the graph's own cost, a profile (in the JSON);
#   2. bench/ncut_layer.py --device cuda at (512, 196) and (128, 784): baseline eigh + autograd,
#      dncut eigh, dncut lobpcg side by side;
#   3. bench/train_step.py --device cuda --solver lobpcg: the NCut share of a ViT-S/16 step, batch 256
#      (its data stage: CPU pairs/s per core, and the CPU cores per GPU they imply);
#   4. bench/ingest.py --parts gpu_aug --device cuda: the device augmentation of 256 pairs.
# Run it with timeout_s 420 (the device tool), then give the machine back.
# Steps run in the order 4, 3, 2, 1 (the data-path figures first: they are the shortest).
# Usage: [IMAGES=folder-of-jpegs] bash bench/gpu_check.sh    JSON goes to $OUT (if set) else bench/results/.
#   IMAGES: real photos for steps 3 and 4 (generated scenes otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "=== 4. bench/ingest.py --parts gpu_aug --device cuda: DINO photometric augmentation of 256 pairs (target <= 10 ms) ==="
timeout 120 "$PY" bench/ingest.py --parts gpu_aug --device cuda ${IMAGES:+--images "$IMAGES"} --out "$OUT_DIR/ingest_gpu_aug.json" \
    | grep -E '"(ms_median|device)"' | head -3
echo "ingest exit code: $?"

echo "=== 3. bench/train_step.py --device cuda --solver lobpcg (ViT-S/16, batch 256): NCut share ==="
timeout 150 "$PY" bench/train_step.py --device cuda --solver lobpcg ${IMAGES:+--images "$IMAGES"} --out "$OUT_DIR/train_step_cuda_lobpcg.json" \
    | grep -E '"(ncut_share|ncut_ms|step)"' | head -5
echo "train_step exit code: $?"

echo "=== 2. bench/ncut_layer.py --device cuda ==="
timeout 200 "$PY" bench/ncut_layer.py --device cuda --sizes 512x196 128x784 --repeats 10 --max-seconds 3 \
    --out "$OUT_DIR/ncut_layer_cuda.json" | grep '^{"B"'
echo "bench exit code: $?"

echo "=== 1. lobpcg vs eigh on CUDA ==="
timeout 200 "$PY" - "$OUT_DIR/lobpcg_check_cuda.json" <<'PYEOF'
import dataclasses, json, statistics, sys, time, warnings

import torch

sys.path.insert(0, "bench")
from ncut_layer import make_features  # noqa: E402

from dncut.ncut import affinity_matrix, laplacian_matrix, normalized_cut  # noqa: E402
from dncut.ncut import lobpcg  # noqa: E402

dev = "cuda"
report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "checks": [], "ops_us": {}, "sweep": []}


def clustered(b, n, c, k, seed, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, c, generator=g)
    labels = torch.randint(0, k, (b, n), generator=g)
    f = centres.gather(1, labels.unsqueeze(-1).expand(b, n, c)) + noise * torch.randn(b, n, c, generator=g)
    return f.to(dev)


def loss_fn(z, lam):
    return (z ** 4).sum() + 3.0 * (z[:, :7] ** 2).sum() + 0.7 * lam.sum()


def run(f, solver, laplacian, tol=None, solver_dtype=torch.float64):
    x = f.clone().requires_grad_(True)
    out = normalized_cut(x, solver=solver, laplacian=laplacian, tol=tol, solver_dtype=solver_dtype)
    loss_fn(out.eigvec, out.eigval).backward()
    return out, x.grad


ok_all = True
for name, feats in (("blob_64x196", make_features(64, 196, 384, dev)), ("clustered4_16x784", clustered(16, 784, 384, 4, 1)),
                    ("clustered3_64x196", clustered(64, 196, 384, 3, 2))):
    for laplacian in ("normalized", "unnormalized"):
        for dtype, solve, (cos_tol, lam_tol, grad_tol) in (
                (torch.float32, torch.float64, (1e-4, 1e-5, 1e-3)), (torch.float64, torch.float64, (1e-12, 1e-10, 1e-7)),
                (torch.float32, torch.float32, (1e-4, 1e-5, 1e-3))):  # last: solver_dtype=float32, a candidate
            f = feats.to(dtype)
            lobpcg.reset_stats()
            fast, g_fast = run(f, "lobpcg", laplacian, solver_dtype=solve)
            st = lobpcg.reset_stats()
            exact, g_exact = run(f, "eigh", laplacian)
            fast, exact = (dataclasses.replace(o, eigvec=o.eigvec.detach(), eigval=o.eigval.detach()) for o in (fast, exact))
            one_minus_cos = float((1 - (fast.eigvec.double() * exact.eigvec.double()).sum(-1).abs()).max())
            dlam = float((fast.eigval.double() - exact.eigval.double()).abs().max())
            gerr = float(((g_fast.double() - g_exact.double()).flatten(1).norm(dim=-1)
                          / g_exact.double().flatten(1).norm(dim=-1)).max())
            passed = one_minus_cos <= cos_tol and dlam <= lam_tol and gerr <= grad_tol and bool(torch.isfinite(g_fast).all())
            ok_all &= passed or solve == torch.float32  # the float32 solve is reported, not required
            row = {"case": name, "laplacian": laplacian, "dtype": str(dtype)[6:], "solver_dtype": str(solve)[6:],
                   "one_minus_cos": one_minus_cos,
                   "dlambda2": dlam, "grad_rel_err": gerr, "fallbacks": fast.n_fallback, "iterations": st.iterations,
                   "cg_iterations": st.cg_iterations, "backward_fallbacks": st.backward_fallbacks, "pass": passed}
            report["checks"].append(row)
            print(json.dumps(row))
print("CORRECTNESS", "PASS" if ok_all else "FAIL")


def cuda_ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


# host syncs of one forward+backward at (512, 196)
f512 = make_features(512, 196, 384, dev)
run(f512, "lobpcg", "normalized")
torch.cuda.synchronize()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        run(f512, "lobpcg", "normalized")
    finally:
        torch.cuda.set_sync_debug_mode("default")
report["host_syncs_fwd_bwd_512x196"] = len(caught)
sites = {}
for w in caught:
    key = f"{w.filename.split('/')[-1]}:{w.lineno}"
    sites[key] = sites.get(key, 0) + 1
report["host_sync_sites"] = sites
print("host syncs in one fwd+bwd (512x196):", len(caught), sites)

# CUDA graphs on vs off (LobpcgOptions.cuda_graphs): bit-identical results expected
# (persistent replays: a first same-shape call captures, the second must reload the buffers)
f64a, f64b = make_features(64, 196, 384, dev, seed=1), make_features(64, 196, 384, dev)
base = lobpcg.OPTIONS
outs = {}
for graphs in (True, False):
    lobpcg.OPTIONS = dataclasses.replace(base, cuda_graphs=graphs)
    for _ in range(2):
        run(f64a.double(), "lobpcg", "normalized")
    o, gr = run(f64b.double(), "lobpcg", "normalized")
    outs[graphs] = (o.eigvec.detach(), o.eigval.detach(), gr)
    if graphs:
        report["graphs_captured"] = {str(k[:3]): rep.graph is not None for k, rep in lobpcg.REPLAYS.items()}
lobpcg.OPTIONS = base
lobpcg.clear_replays()
report["graphs_vs_eager_max_diff"] = [float((a - b).abs().max()) for a, b in zip(outs[True], outs[False])]
print("graphs captured:", report["graphs_captured"])
print("graph vs eager max |diff| (z, lambda, grad):", report["graphs_vs_eager_max_diff"])

# option sweep: fwd and fwd+bwd ms (median of 10) and iterations, float32 features, normalized Laplacian
f784 = make_features(128, 784, 384, dev)
# (LobpcgOptions overrides, tol for normalized_cut (None = DTYPE_TOL, 1e-7 for float32), solver_dtype)
f32 = torch.float32
variants = {"default": ({}, None, None), "graphs": ({"cuda_graphs": True}, None, None),
            "check4": ({"check_every": 4}, None, None), "tol1e-10": ({}, 1e-10, None), "tol1e-6": ({}, 1e-6, None),
            "block6": ({"block": 6}, None, None), "f32solve": ({}, None, f32),
            "f32solve_graphs": ({"cuda_graphs": True}, None, f32)}
for feats, size in ((f512, "512x196"), (f784, "128x784")):
    for vname, (kw, tol, solve) in variants.items():
        if size == "128x784" and vname not in ("default", "graphs", "tol1e-10", "f32solve", "f32solve_graphs"):
            continue
        solve = solve or torch.float64
        lobpcg.OPTIONS = dataclasses.replace(base, **kw)
        fwd = cuda_ms(lambda: normalized_cut(feats, solver="lobpcg", tol=tol, solver_dtype=solve), 10)
        lobpcg.reset_stats()
        fb = cuda_ms(lambda: run(feats, "lobpcg", "normalized", tol, solve), 10)
        st = lobpcg.reset_stats()
        row = {"size": size, "variant": vname, "forward_ms": round(fwd, 2), "forward_backward_ms": round(fb, 2),
               "iters_per_call": round(st.iterations / max(st.calls, 1), 1),
               "cg_iters_per_call": round(st.cg_iterations / max(st.backward_calls, 1), 1),
               "fallbacks": st.forward_fallbacks, "backward_fallbacks": st.backward_fallbacks}
        report["sweep"].append(row)
        print(json.dumps(row))
    lobpcg.OPTIONS = base
# what the graph itself costs (as normalized_cut builds it: float32 f f^T, float64 W and L)
fx = f512.detach()
def graph_only():
    x = fx.clone().requires_grad_(True)
    f = torch.nn.functional.normalize(x, dim=-1)
    lap, deg = laplacian_matrix(affinity_matrix(f, dtype=torch.float64))
    (lap.diagonal(dim1=-2, dim2=-1).sum() + lap[:, 0].sum()).backward()
report["graph_fwd_bwd_ms_512x196"] = round(cuda_ms(graph_only, 10), 2)
print("graph build fwd+bwd alone (512x196):", report["graph_fwd_bwd_ms_512x196"], "ms")

# profile of one forward+backward at (512, 196)
from torch.profiler import ProfilerActivity, profile  # noqa: E402
run(f512, "lobpcg", "normalized")
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run(f512, "lobpcg", "normalized")
    torch.cuda.synchronize()
try:
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
except Exception:  # older names
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
report["profile_top_cuda"] = table
report["profile_top_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
print("\n".join(table.splitlines()[-2:]))  # self CPU / CUDA totals; the tables are in the JSON
json.dump(report, open(sys.argv[1], "w"), indent=2)
PYEOF
echo "check exit code: $?"
