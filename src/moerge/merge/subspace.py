"""SVD building blocks of the subspace merges (TSV-M, Iso-C, Iso-CTS, KnOTS).

Every task update is handled as low-rank factors (A, B) with Δ = B·A (adapter.py's order): a LoRA's
own factors, or (Vᵀ, U·Σ) from the thin SVD of a dense Δ. The SVD of factors comes from QR factors of
B and Aᵀ and the SVD of their small r×r core, so a rank-r update never needs its dense out×in matrix.
All maths runs in float64. Singular values at the float32 noise floor of the inputs
(σ ≤ σ₁·max(m, n)·ε₃₂) are dropped: their singular vectors are an arbitrary basis of a null space and
would otherwise steer the orthogonalisations and spectrum means below (LoRA updates are low-rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × n, B: m × r), the update is B @ A
Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U: m × r, S: r descending > 0, Vh: r × n)

_EPS = torch.finfo(torch.float32).eps


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """LAPACK's threaded solvers are slower on these small matrices and stall on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _empty(m: int, n: int) -> Svd:
    return torch.zeros(m, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, n).double()


def _kept(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Which singular values (descending) are above the float32 noise floor."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > s[0] * max(m, n) * _EPS


def svd(matrix: torch.Tensor) -> Svd:
    """Thin SVD in float64 without the noise-floor components, from the eigendecomposition of the smaller
    Gram matrix (as adapter.truncated_svd: several times faster than LAPACK's SVD here; the float64 Gram
    resolves singular values far below the float32 noise floor at which components are dropped)."""
    m, n = matrix.shape
    if matrix.numel() == 0:
        return _empty(m, n)
    d = matrix.double()
    wide = m <= n
    with single_thread():
        eigenvalues, vectors = torch.linalg.eigh(d @ d.T if wide else d.T @ d)
    s = eigenvalues.flip(0).clamp(min=0).sqrt()
    keep = _kept(s, m, n)
    s, vectors = s[keep], vectors.flip(1)[:, keep]
    if wide:
        return vectors, s, (vectors.T @ d) / s[:, None]
    return (d @ vectors) / s, s, vectors.T


def svd_of_factors(a: torch.Tensor, b: torch.Tensor) -> Svd:
    """SVD of B·A from B = Q_B·R_B and Aᵀ = Q_A·R_A: B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so only the small core
    R_B·R_Aᵀ is decomposed (cost O((m + n)·r²) instead of O(m·n·min(m, n)))."""
    m, n = b.shape[0], a.shape[1]
    if b.shape[1] == 0:
        return _empty(m, n)
    with single_thread():
        q_b, r_b = torch.linalg.qr(b.double())
        q_a, r_a = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = _kept(s, m, n)
    return q_b @ u[:, keep], s[keep], vh[keep] @ q_a.T


def factors_of_dense(delta: torch.Tensor) -> Factors:
    """A dense update as its compact factors (Vᵀ, U·Σ)."""
    u, s, vh = svd(delta)
    return vh, u * s


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor P·Qᵀ of M = P·S·Qᵀ: the matrix with orthonormal columns (rows when wide)
    nearest to M in Frobenius norm (orthogonal Procrustes), used to decorrelate stacked singular vectors."""
    if matrix.numel() == 0:
        return matrix
    with single_thread():
        p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def total_of(experts: Sequence[Factors]) -> Svd:
    """SVD of Σ_k B_k·A_k = [B_1 … B_K]·[A_1; …; A_K]."""
    return svd_of_factors(torch.cat([a for a, _ in experts]), torch.cat([b for _, b in experts], dim=1))


def _joined(parts: Sequence[Svd]) -> Svd:
    return (
        torch.cat([u for u, _, _ in parts], dim=1),
        torch.cat([s for _, s, _ in parts]),
        torch.cat([vh for _, _, vh in parts], dim=0),
    )


# --- the methods on factors (A_k, B_k), one per expert ------------------------------------------------


def tsv(experts: Sequence[Factors], keep: int) -> Factors:
    """TSV-M: each task's top `keep` singular components, the stacked U and V decorrelated (polar
    factors), then Σ_k U⊥ Σ V⊥ᵀ over the stacked components."""
    parts = [svd_of_factors(a, b) for a, b in experts]
    u, s, vh = _joined([(u[:, :keep], s[:keep], vh[:keep]) for u, s, vh in parts])
    return polar(vh), polar(u) * s


def iso_c(experts: Sequence[Factors]) -> Factors:
    """Iso-C: the sum's singular vectors with every singular value replaced by their mean."""
    u, s, vh = total_of(experts)
    return vh, u * s.mean() if s.numel() else u


def common_budget(rank: int, fraction: float, tasks: int) -> tuple[int, int]:
    """Iso-CTS's split of `rank` directions: (common k, per-task s) with k + tasks·s = rank, k ≈ fraction·rank
    (the reference implementation's rounding, so the task-specific part divides evenly)."""
    common = int(rank * fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts(experts: Sequence[Factors], common_fraction: float) -> Factors:
    """Iso-CTS: the sum's top-k singular directions (the common subspace) plus, per task, the top
    directions of the task's update with the common left subspace projected out; the stacked vectors
    are orthogonalised (polar factors) and every direction gets the mean singular value."""
    u, s, vh = total_of(experts)
    common, per_task = common_budget(len(s), common_fraction, len(experts))
    u_c = u[:, :common]
    parts = [(u_c, s[:common], vh[:common])]
    for a, b in experts:
        u_t, s_t, vh_t = svd_of_factors(a, b.double() - u_c @ (u_c.T @ b.double()))
        parts.append((u_t[:, :per_task], s_t[:per_task], vh_t[:per_task]))
    u, s, vh = _joined(parts)
    if s.numel() == 0:
        return vh, u
    return polar(vh), polar(u) * s.mean()


def knots_basis(experts: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS's shared basis: [Δ_1 … Δ_K] = U·Σ·[V_1ᵀ … V_Kᵀ] (one SVD of the column-wise concatenation).
    Returns U (m × R) and the tasks' coordinates Σ·V_kᵀ stacked (K × R × n), so Δ_k = U·(Σ·V_kᵀ).

    The concatenation is [B_1 … B_K]·blockdiag(A_1, …, A_K), so its SVD is taken from the factors. The
    coordinates are computed as Σ·V_kᵀ = Uᵀ·Δ_k = (Uᵀ·B_k)·A_k rather than read off the SVD's V: an
    expert without the module then has exactly zero coordinates, not rounding noise that TIES would count
    as votes."""
    a_blocks = torch.block_diag(*[a.double() for a, _ in experts])
    u, _, _ = svd_of_factors(a_blocks, torch.cat([b for _, b in experts], dim=1))
    return u, torch.stack([(u.T @ b.double()) @ a.double() for a, b in experts])
