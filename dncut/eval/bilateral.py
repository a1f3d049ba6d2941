"""Fast bilateral solver (Barron & Poole, ECCV 2016) for refining saliency masks.

``image: (H, W, 3) uint8 RGB, target: (H, W) float in [0, 1] -> soft: (H, W) float in [0, 1]``

The solver finds the vertex values y of a bilateral grid minimising

    λ/2 · Σ_ij Ŵ_ij (y_i − y_j)² + Σ_i c_i (y_i − t_i)²      (in pixel space, ŷ = Sᵀ y)

which in bilateral space is the sparse SPD system

    (λ (D_m − D_n B̄ D_n) + diag(S c)) y = S (c ⊙ t),

with S the splat matrix (pixels -> vertices), B̄ the grid blur ([1 2 1] in each of the five
dimensions) and D_n, D_m the bistochastisation diagonals (so that D_n B̄ D_n has row sums
m = S·1). It is solved by conjugate gradient with a Jacobi preconditioner (≤ 25 iterations,
relative tolerance 1e-5) from the flat initialisation y0 = S(c t) / S(c), then sliced back to
pixels. The grid is the TokenCut setting: YUV coordinates, σ_spatial 16, σ_luma 16,
σ_chroma 8, λ 256. Every row of the system sums to S(c), so the exact solution is a convex
combination of the targets; the returned map is clipped to [0, 1] only to remove CG round-off.

``refine_mask(image, mask: (H, W) bool) -> (soft (H, W) float, binary (H, W) bool)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

# JPEG / BT.601 full-range RGB -> YUV (YCbCr), chroma offset by 128 so all values are >= 0
_RGB_TO_YUV = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])
_N_BISTOCHASTIC_ITERS = 10  # fixed-point iterations of the bistochastisation
_A_DIAG_MIN = 1e-5  # floor of the Jacobi preconditioner's diagonal


def rgb_to_yuv(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB 0..255 -> (H, W, 3) float64 YUV with Y, U, V in [0, 255]."""
    return image.astype(np.float64) @ _RGB_TO_YUV.T + _YUV_OFFSET  # (H, W, 3)


@dataclass(frozen=True)
class BilateralGrid:
    """A bilateral grid of one image.

    Attributes:
        vertex_of_pixel: (H*W,) index of the grid vertex each pixel is splatted to.
        n_vertices: number of occupied vertices V.
        blur: (V, V) sparse symmetric blur B̄ = 2·5·I + Σ_d (neighbours at ±1 along d).
    """

    vertex_of_pixel: np.ndarray
    n_vertices: int
    blur: sp.csr_matrix

    def splat(self, values: np.ndarray) -> np.ndarray:
        """(H*W,) pixel values -> (V,) vertex sums."""
        return np.bincount(self.vertex_of_pixel, weights=values, minlength=self.n_vertices)

    def slice(self, vertex_values: np.ndarray) -> np.ndarray:
        """(V,) vertex values -> (H*W,) pixel values."""
        return vertex_values[self.vertex_of_pixel]


def _grid_coords(
    image: np.ndarray, sigma_spatial: float, sigma_luma: float, sigma_chroma: float
) -> np.ndarray:
    """(H, W, 3) RGB -> (H*W, 5) integer grid coordinates (x, y, luma, u, v)."""
    h, w, _ = image.shape
    yuv = rgb_to_yuv(image).reshape(-1, 3)  # (H*W, 3)
    rows, cols = np.mgrid[:h, :w]  # (H, W) each
    scaled = np.stack(
        [
            cols.ravel() / sigma_spatial,
            rows.ravel() / sigma_spatial,
            yuv[:, 0] / sigma_luma,
            yuv[:, 1] / sigma_chroma,
            yuv[:, 2] / sigma_chroma,
        ],
        axis=1,
    )  # (H*W, 5)
    return np.floor(scaled).astype(np.int64)


def build_grid(
    image: np.ndarray,
    *,
    sigma_spatial: float = 16.0,
    sigma_luma: float = 16.0,
    sigma_chroma: float = 8.0,
) -> BilateralGrid:
    """Build the bilateral grid of an RGB image.

    Args:
        image: (H, W, 3) uint8 RGB.
        sigma_spatial: grid cell size in pixels.
        sigma_luma: grid cell size in luma (0..255).
        sigma_chroma: grid cell size in chroma (0..255).

    Returns:
        The BilateralGrid (splat indices and the blur matrix).
    """
    coords = _grid_coords(image, sigma_spatial, sigma_luma, sigma_chroma)  # (H*W, 5)
    coords = coords - coords.min(axis=0) + 1  # >= 1, so a -1 neighbour stays >= 0
    radix = coords.max(axis=0) + 2  # room for the +1 neighbour without carrying
    if float(np.prod(radix.astype(np.float64))) >= 2.0**62:
        raise ValueError("bilateral grid too fine for 64-bit keys; increase the sigmas")
    strides = np.cumprod(np.concatenate([[1], radix[:-1]]))  # (5,)
    keys = coords @ strides  # (H*W,) unique key per grid cell
    unique_keys, vertex_of_pixel = np.unique(keys, return_inverse=True)  # (V,), (H*W,)
    n_vertices = unique_keys.size

    rows, cols = [], []
    vertex_ids = np.arange(n_vertices)
    for stride in strides:
        for offset in (-stride, stride):
            neighbour = unique_keys + offset  # (V,)
            pos = np.clip(np.searchsorted(unique_keys, neighbour), 0, n_vertices - 1)
            found = unique_keys[pos] == neighbour  # (V,)
            rows.append(vertex_ids[found])
            cols.append(pos[found])
    row_idx, col_idx = np.concatenate(rows), np.concatenate(cols)
    neighbours = sp.csr_matrix(
        (np.ones(row_idx.size), (row_idx, col_idx)), shape=(n_vertices, n_vertices)
    )
    blur = (neighbours + 2.0 * coords.shape[1] * sp.identity(n_vertices, format="csr")).tocsr()
    return BilateralGrid(vertex_of_pixel=vertex_of_pixel.ravel(), n_vertices=n_vertices, blur=blur)


def bistochastize(
    grid: BilateralGrid, n_iters: int = _N_BISTOCHASTIC_ITERS
) -> tuple[np.ndarray, np.ndarray]:
    """Diagonals (n, m), each (V,), with n ⊙ (B̄ n) = m: D_n B̄ D_n has row sums m.

    m starts as the pixel count per vertex; n follows the fixed point n <- sqrt(n m / B̄ n),
    and m is then reset to n ⊙ B̄ n so the identity holds exactly after any number of steps.
    """
    m = grid.splat(np.ones(grid.vertex_of_pixel.size))  # (V,)
    n = np.ones(grid.n_vertices)
    for _ in range(n_iters):
        n = np.sqrt(n * m / (grid.blur @ n))
    m = n * (grid.blur @ n)
    return n, m


def _validate(image: np.ndarray, target: np.ndarray, confidence: np.ndarray | None) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if target.shape != image.shape[:2]:
        raise ValueError(f"target shape {target.shape} != image size {image.shape[:2]}")
    if not np.all(np.isfinite(target)) or target.min() < 0.0 or target.max() > 1.0:
        raise ValueError("target must be finite and lie in [0, 1]")
    if confidence is None:
        return np.ones(target.size)
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.shape != target.shape:
        raise ValueError(f"confidence shape {confidence.shape} != target shape {target.shape}")
    if not np.all(np.isfinite(confidence)) or confidence.min() < 0.0:
        raise ValueError("confidence must be finite and >= 0")
    if confidence.sum() <= 0.0:
        raise ValueError("confidence is zero everywhere")
    return confidence.ravel()


def bilateral_solve(
    image: np.ndarray,
    target: np.ndarray,
    confidence: np.ndarray | None = None,
    *,
    sigma_spatial: float = 16.0,
    sigma_luma: float = 16.0,
    sigma_chroma: float = 8.0,
    lam: float = 256.0,
    max_iter: int = 25,
    tol: float = 1e-5,
) -> np.ndarray:
    """Edge-aware smoothing of a target map guided by an image (fast bilateral solver).

    Args:
        image: (H, W, 3) uint8 RGB reference image.
        target: (H, W) float in [0, 1], e.g. a coarse mask.
        confidence: (H, W) float >= 0 per-pixel confidence of the target (None: all ones).
        sigma_spatial: grid cell size in pixels.
        sigma_luma: grid cell size in luma.
        sigma_chroma: grid cell size in chroma.
        lam: smoothness strength λ.
        max_iter: maximum conjugate-gradient iterations.
        tol: CG tolerance, relative to the norm of the right-hand side.

    Returns:
        (H, W) float64 soft output in [0, 1].
    """
    image, target = np.asarray(image), np.asarray(target, dtype=np.float64)
    conf = _validate(image, target, confidence)  # (H*W,)
    grid = build_grid(
        image, sigma_spatial=sigma_spatial, sigma_luma=sigma_luma, sigma_chroma=sigma_chroma
    )
    n, m = bistochastize(grid)
    conf_splat = grid.splat(conf)  # (V,)
    rhs = grid.splat(conf * target.ravel())  # (V,)

    smooth = sp.diags(m) - sp.diags(n) @ grid.blur @ sp.diags(n)  # (V, V) D_m - D_n B̄ D_n
    system = (lam * smooth + sp.diags(conf_splat)).tocsr()  # (V, V)
    precond = sp.diags(1.0 / np.maximum(system.diagonal(), _A_DIAG_MIN))
    fallback = np.full_like(rhs, rhs.sum() / conf_splat.sum())  # vertices with zero confidence
    y0 = np.divide(rhs, conf_splat, out=fallback, where=conf_splat > 0)  # flat initialisation
    y, _ = cg(system, rhs, x0=y0, rtol=tol, atol=0.0, maxiter=max_iter, M=precond)
    soft = grid.slice(y).reshape(target.shape)  # (H, W)
    return np.clip(soft, 0.0, 1.0)


def refine_mask(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    sigma_spatial: float = 16.0,
    sigma_luma: float = 16.0,
    sigma_chroma: float = 8.0,
    lam: float = 256.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Refine a binary mask with the bilateral solver (TokenCut's "+ BS" step).

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool coarse mask.
        sigma_spatial: grid cell size in pixels.
        sigma_luma: grid cell size in luma.
        sigma_chroma: grid cell size in chroma.
        lam: smoothness strength λ.

    Returns:
        (soft (H, W) float in [0, 1], binary (H, W) bool = soft > 0.5). TokenCut additionally
        fills holes and keeps the largest component of ``binary``; that is not done here.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    soft = bilateral_solve(
        image,
        mask.astype(np.float64),
        sigma_spatial=sigma_spatial,
        sigma_luma=sigma_luma,
        sigma_chroma=sigma_chroma,
        lam=lam,
    )
    return soft, soft > 0.5
