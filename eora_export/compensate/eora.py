"""EoRA and its plain-SVD baseline: closed-form low-rank compensation factors.

EoRA (Liu et al., arXiv 2410.21271) minimises ‖(ΔW − BA) Xᵀ‖_F over rank-r B A, where
G = XᵀX / N is the calibration Gram matrix of the layer's inputs. With any square root
G = R Rᵀ, the optimum is the rank-r truncated SVD of ΔW R mapped back by R⁻¹ (the same
closed form as QERA-exact and SVD-LLM whitening). Two roots are offered:

* eigen (exact): R = Q_k Λ_k^(1/2) over the eigen-directions that carry data. Eigenvalues
  at or below λ_max · in · eps(float64) are rounding noise, so they are dropped, never
  inverted (a pseudo-inverse): directions without data get no compensation.
* Cholesky (fast): R = L, top-r SVD by randomized iteration, A by a triangular solve.
  Used only when G is well conditioned; otherwise it falls back to the eigen root.

Everything runs in float64 and returns float64, except the fast path's whitening product
ΔW R and its SVD (:func:`whiten`, :func:`eora_factors_from_whitened`): those run in float32,
the root itself and the unwhitening solve stay float64 (docs/design.md §2).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

_EPS64 = torch.finfo(torch.float64).eps
# Cholesky is trusted only while the smallest pivot stays this far above rounding noise;
# below it the damped directions would be inverted, which is what the eigen root avoids.
_CHOLESKY_MIN_RELATIVE_PIVOT = 1e-10


# Below this size LAPACK gains nothing from a second thread, and on a loaded machine
# OpenMP's spinning made eigh of a 768² matrix 13x slower with two threads than with one.
_SINGLE_THREAD_BELOW = 2048


@contextlib.contextmanager
def _linalg_threads(n: int) -> Iterator[None]:
    """One thread for work on matrices smaller than _SINGLE_THREAD_BELOW (n = the largest dimension)."""
    before = torch.get_num_threads()
    if n < _SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Block Krylov defaults (Musco & Musco 2015): a block of r/2 + 16 vectors and 8 iterations
# span r·4.5 + 144 directions. On the hard case of issue 18 (4096², rank 128, RTN INT4 error
# under a log-spaced 1 → 1e-3 activation spectrum with outliers, σ_r/σ_{r+1} = 1.003) this
# lands ~4e-6 above the optimum; plain subspace iteration (160 vectors, 4 iterations) was
# 7e-3 above it and needed 16 iterations (3x the time) for 6e-5. tools/bench_eora_fast.py.
_KRYLOV_ITERATIONS = 8


def _krylov_block(rank: int) -> int:
    return rank // 2 + 16


def randomized_svd(m: Tensor, rank: int, block: int | None = None, niter: int = _KRYLOV_ITERATIONS) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``m: [out, k]`` by randomized block Krylov iteration.

    Returns U [out, rank], S [rank], Vᴴ [rank, k]; U and Vᴴ in m's dtype, S in float64.
    The Krylov space [M Ω, (M Mᵀ) M Ω, …, (M Mᵀ)^niter M Ω] (Ω: k × block, from torch's
    global RNG; callers seed it) is orthonormalised, and the top ``rank`` Ritz pairs of M on it
    are exact for M's restriction to that space. The Rayleigh-Ritz step uses the eigenvalues
    of P Pᵀ in float64 (P = Kᵀ M, a few hundred rows) instead of an SVD of P: that SVD was
    most of the time on 2 cores, and squaring costs nothing that matters here (σ_r² stays
    ≥ 1e-12 σ_1² relative on any spectrum we keep; the truncation tail is far above it).
    Thin QRs and the small eigenproblem run on one thread (two spin-waiting OpenMP threads
    were 3–20x slower on our busy 2-core machines); the big products keep both threads.
    """
    block = block or _krylov_block(rank)
    block = min(block, *m.shape)

    def orth(x: Tensor) -> Tensor:
        with _linalg_threads(0):
            return torch.linalg.qr(x).Q

    q = orth(m @ torch.randn(m.shape[1], block, dtype=m.dtype))
    blocks = [q]
    for _ in range(niter):
        q = orth(m @ (m.T @ q))
        blocks.append(q)
    k = orth(torch.cat(blocks, dim=1)) if len(blocks) > 1 else q
    p = (k.T @ m).double()  # [dim K, k]
    with _linalg_threads(0):
        lam, vec = torch.linalg.eigh(p @ p.T)
    r = min(rank, lam.numel())
    lam, vec = lam.flip(0)[:r], vec.flip(1)[:, :r]
    s = lam.clamp(min=0).sqrt()
    # Vᴴ = Uₚᵀ P / s; a zero singular value (rank-deficient M) gets a zero row, not a NaN.
    safe = torch.where(s > 0, s, torch.ones_like(s))
    vh = (vec.T @ p) / safe[:, None] * (s > 0)[:, None]
    return (k.double() @ vec).to(m.dtype), s, vh.to(m.dtype)


# Column blocks of the triangular product: 8 blocks do 9/16 of a dense product's work.
_TRIANGULAR_BLOCKS = 8
_TRIANGULAR_MIN = 1024


def times_lower_triangular(a: Tensor, lower: Tensor) -> Tensor:
    """``a: [m, n]`` @ ``lower: [n, n]`` (lower-triangular) without the zero half's work.

    Column block j of the product only needs rows i ≥ j of ``lower``, so each block is a
    smaller dense product (torch has no triangular matrix-matrix multiply on the CPU).
    """
    n = lower.shape[0]
    if n < _TRIANGULAR_MIN:
        return a @ lower
    out = torch.empty(a.shape[0], n, dtype=torch.result_type(a, lower))
    edges = [round(n * i / _TRIANGULAR_BLOCKS) for i in range(_TRIANGULAR_BLOCKS + 1)]
    for j0, j1 in itertools.pairwise(edges):
        torch.matmul(a[:, j0:], lower[j0:, j0:j1], out=out[:, j0:j1])
    return out


@dataclass(frozen=True)
class GramRoot:
    """A square root G ≈ R Rᵀ restricted to the directions that carry data.

    Eigen root: ``basis`` = Q_k [in, k], ``sqrt_eig`` = √λ_k [k]; R = Q_k diag(√λ_k).
    Cholesky root: ``chol`` = L [in, in] lower-triangular; R = L.
    """

    basis: Tensor | None = None
    sqrt_eig: Tensor | None = None
    chol: Tensor | None = None

    @property
    def kind(self) -> str:
        return "cholesky" if self.chol is not None else "eigen"

    @property
    def in_features(self) -> int:
        """Width of the Gram matrix (the layer's inputs)."""
        return (self.chol if self.chol is not None else self.basis).shape[0]

    @property
    def data_rank(self) -> int:
        """Number of input directions with data (k)."""
        return self.chol.shape[0] if self.chol is not None else self.sqrt_eig.numel()

    def whiten(self, delta_w: Tensor) -> Tensor:
        """``delta_w: [out, in]`` -> ΔW R ``[out, k]``."""
        if self.chol is not None:
            return times_lower_triangular(delta_w, self.chol)
        return (delta_w @ self.basis) * self.sqrt_eig

    def to(self, dtype: torch.dtype) -> GramRoot:
        """The same root in ``dtype`` (float32 for the big whitening products of the fast path)."""
        def cast(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(dtype)

        return GramRoot(cast(self.basis), cast(self.sqrt_eig), cast(self.chol))

    def unwhiten_rows(self, v: Tensor) -> Tensor:
        """``v: [r, k]`` (rows in the whitened space) -> v R⁻¹ ``[r, in]``."""
        if self.chol is not None:
            # v L⁻¹ = (L⁻ᵀ vᵀ)ᵀ, a triangular solve: no explicit inverse.
            return torch.linalg.solve_triangular(self.chol.T, v.T, upper=True).T
        return (v / self.sqrt_eig) @ self.basis.T


def check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what} holds {bad} NaN/Inf values; check the model weights and calibration data")


def gram_root(gram: Tensor, fast: bool = False) -> GramRoot:
    """Factor ``gram: [in, in]`` (symmetric PSD) in float64.

    fast=True tries Cholesky first and keeps it only when G is well conditioned.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    check_finite(gram, "Gram matrix")
    g = gram.to(torch.float64, copy=True)
    # Symmetrise in place: for in = 11008 every extra copy of G is ~1 GB.
    g.add_(g.T.clone()).mul_(0.5)
    n = g.shape[0]
    if fast:
        scale = g.diagonal().abs().max()
        if scale > 0:
            damped = g.clone()
            damped.diagonal().add_(scale * n * _EPS64)
            chol, info = torch.linalg.cholesky_ex(damped)
            del damped
            if info == 0:
                pivots = chol.diagonal().square()
                if pivots.min() > pivots.max() * _CHOLESKY_MIN_RELATIVE_PIVOT:
                    return GramRoot(chol=chol)
    with _linalg_threads(n):
        eigvals, eigvecs = torch.linalg.eigh(g)
    lam_max = eigvals.max().clamp(min=0)
    keep = eigvals > lam_max * n * _EPS64
    return GramRoot(basis=eigvecs[:, keep], sqrt_eig=eigvals[keep].sqrt())


def _krylov_pays(rank: int, shape: tuple[int, ...] | torch.Size) -> bool:
    """Block Krylov only while its space stays well below the matrix (else a full SVD is as cheap)."""
    return _krylov_block(rank) * (_KRYLOV_ITERATIONS + 1) <= min(shape) // 2


def _check_rank(delta_w: Tensor, rank: int) -> None:
    if delta_w.ndim != 2:
        raise ValueError(f"delta_w must be [out, in], got shape {tuple(delta_w.shape)}")
    out_f, in_f = delta_w.shape
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(
            f"rank {rank} does not fit a [{out_f}, {in_f}] layer; use 1..{min(out_f, in_f)}"
        )


def _split_sqrt(u: Tensor, s: Tensor, vh: Tensor, rank: int, out_f: int) -> tuple[Tensor, Tensor]:
    """B = U_r √S_r, A-rows = √S_r V_rᵀ, zero-padded to ``rank`` when fewer exist."""
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(out_f, rank, dtype=torch.float64)
    a_rows = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a_rows[:r] = root[:, None] * vh[:r]
    return b, a_rows


def eora_factors_from_root(
    delta_w: Tensor, root: GramRoot, rank: int, fast: bool = False
) -> tuple[Tensor, Tensor]:
    """EoRA factors for a precomputed :class:`GramRoot` (share it between Linears that
    read the same input).

    delta_w: [out, in]. Returns B [out, rank], A [rank, in], float64. Where G holds fewer
    than ``rank`` data directions the extra factor columns are zero.
    fast=True uses a randomized block Krylov top-r SVD (:func:`randomized_svd`) instead of the full SVD.
    """
    _check_rank(delta_w, rank)
    check_finite(delta_w, "weight error ΔW")
    if fast:
        # The pipeline's fast path: float32 whitening product (see :func:`whiten`), so that
        # eora_factors(fast=True) measures and returns exactly what `--fast` ships.
        m = whiten(delta_w, root.to(torch.float32))
        if not torch.isfinite(m).all():
            # A Gram beyond float32's range (≳ 1e38; fp16 activations bound the pipeline's
            # Grams near 4e9, so only direct callers get here): the float64 product instead.
            m = root.whiten(delta_w.to(torch.float64))
        return eora_factors_from_whitened(m, root, rank, fast)
    return eora_factors_from_whitened(root.whiten(delta_w.to(torch.float64)), root, rank, fast)


def whiten(delta_w: Tensor, root32: GramRoot) -> Tensor:
    """``delta_w: [out, in]`` -> M = ΔW R ``[out, k]`` in float32, ``root32`` = ``root.to(float32)``.

    For a 7B block these out × in × in products are most of EoRA's time; float32 halves it
    (and float64's 2 cores are the bottleneck). Its rounding, ~1e-7 of ‖M‖, is far below the
    singular tail the rank-r truncation leaves, and M also gives the error metrics
    (‖M‖² = tr(ΔW G ΔWᵀ)), so no second dense product is needed.
    """
    check_finite(delta_w, "weight error ΔW")
    return root32.whiten(delta_w.to(torch.float32))


def eora_factors_from_whitened(m: Tensor, root: GramRoot, rank: int, fast: bool = True) -> tuple[Tensor, Tensor]:
    """EoRA factors from M = ΔW R (:func:`whiten`): top-``rank`` SVD of M, A mapped back by R⁻¹.

    m: [out, k]; root: the float64 root M was made with. Returns B [out, rank], A [rank, in]
    in float64 (the unwhitening triangular solve runs in float64).
    """
    out_f, in_f = m.shape[0], root.in_features
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} does not fit a layer with {out_f} outputs")
    if root.data_rank == 0:
        return torch.zeros(out_f, rank, dtype=torch.float64), torch.zeros(rank, in_f, dtype=torch.float64)
    with _linalg_threads(max(m.shape)):
        if fast and _krylov_pays(rank, m.shape):
            u, s, vh = randomized_svd(m, rank)
        else:
            u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    b, a_white = _split_sqrt(u.double(), s.double(), vh.double(), rank, out_f)
    return b, root.unwhiten_rows(a_white)


def whitened_error(m: Tensor, root32: GramRoot, b: Tensor | None = None, a: Tensor | None = None) -> float:
    """tr(E G Eᵀ), E = ΔW − B A, from M = ΔW R: ‖M − B (A R)‖² (costs r · in², not out · in²)."""
    e = m if b is None else m - b.to(m.dtype) @ root32.whiten(a.to(m.dtype))
    return float(torch.linalg.vector_norm(e, dtype=torch.float64) ** 2)


def eora_factors(delta_w: Tensor, gram: Tensor, rank: int, fast: bool = False) -> tuple[Tensor, Tensor]:
    """EoRA: the rank-``rank`` B A minimising tr((ΔW − BA) G (ΔW − BA)ᵀ).

    delta_w: [out, in] = W − W_c; gram: [in, in] = XᵀX / N of the layer's inputs.
    Returns B [out, rank], A [rank, in] in float64. The minimum equals Σ_{i>r} s_i² of
    ΔW R (R Rᵀ = G). fast=True: Cholesky root + randomized SVD (within 1e-4 relative of
    the exact optimum on realistic spectra; tests check it).
    """
    _check_rank(delta_w, rank)
    if gram.shape != (delta_w.shape[1],) * 2:
        raise ValueError(
            f"Gram matrix {tuple(gram.shape)} does not match the layer's {delta_w.shape[1]} inputs"
        )
    return eora_factors_from_root(delta_w, gram_root(gram, fast=fast), rank, fast=fast)


def svd_factors(delta_w: Tensor, rank: int, fast: bool = False) -> tuple[Tensor, Tensor]:
    """Plain SVD baseline (ZeroQuant-V2 LoRC): the rank-``rank`` B A closest to ΔW in
    Frobenius norm, ignoring activations. delta_w: [out, in] -> B [out, rank], A [rank, in].
    fast=True: randomized top-r SVD in float32 (big layers)."""
    _check_rank(delta_w, rank)
    check_finite(delta_w, "weight error ΔW")
    with _linalg_threads(max(delta_w.shape)):
        if fast and _krylov_pays(rank, delta_w.shape):
            u, s, vh = (x.double() for x in randomized_svd(delta_w.to(torch.float32), rank))
        else:
            u, s, vh = torch.linalg.svd(delta_w.to(torch.float64), full_matrices=False)
    return _split_sqrt(u, s, vh, rank, delta_w.shape[0])


def weighted_error(delta_w: Tensor, gram: Tensor, b: Tensor | None = None, a: Tensor | None = None) -> float:
    """tr(E G Eᵀ) with E = ΔW − B A: the mean squared output error per calibration token."""
    e = delta_w.to(torch.float64)
    if b is not None:
        e = e - b.to(torch.float64) @ a.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", e, gram.to(torch.float64), e))
