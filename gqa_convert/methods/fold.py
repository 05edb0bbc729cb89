"""The `fold` method: the best shared K/V projection per group, with each head's correction
folded into the weights that stay per head, so the output is still a stock GQA checkpoint.

Everything is an exact refactoring except one approximation per group:
- values: V_h ~ M_h S x with one shared S per group; M_h is folded into head h's columns
  of o_proj. S and M_h minimise the error seen through W_o^h, weighted by the second
  moment C of the attention input: a truncated SVD of stack_h(R_h W_v^h L) with R_h'R_h = W_o^h' W_o^h,
  where C = L L'.
- keys under RoPE: a per-head map survives the rotations only if it acts on each rotary
  frequency pair as one complex number c_h. Per pair, the group's complex key rows get
  their best rank-1 approximation (weighted by C, and by how much energy each head's queries
  put on that pair); conj(c_h) is folded into the head's query rows.
- keys without rotation (the non-rotary part of partial-rotary heads): a general map N_h,
  folded into queries as N_h', weighted by the queries' second moment.
Biases are handled by appending a constant-1 input. Families that normalise keys per head
(q/k norms) cannot fold through the norm, so their keys fall back to mean pooling.
The math runs in one work dtype per layer (`work_dtype`): float32 for a data-free fold of
16-bit (bfloat16, float16) weights, float64 otherwise; the weights are taken to it a head or a
group at a time, not whole, and results are cast back to each tensor's dtype. The one
exception: the power steps that find a wide group's subspace (`top_right_basis`) run in
float32 or bfloat16, followed by a Rayleigh-Ritz step in the work dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..architectures.rope import Rope

Tensor = torch.Tensor


@dataclass
class Whitener:
    """C = L L' for the (bias-augmented) attention input; L_inv maps back. Without
    calibration C = I: L and L_inv are None and nothing is multiplied (eigh of I is exactly
    I, so this is the same result without the d x d products)."""

    L: Tensor | None
    L_inv: Tensor | None

    @staticmethod
    def identity() -> Whitener:
        return Whitener(None, None)

    @staticmethod
    def from_moment(C: Tensor, eps: float = 1e-6) -> Whitener:
        C = C.double()
        e, U = torch.linalg.eigh((C + C.T) / 2)
        e = e.clamp_min(e.max().clamp_min(1e-30) * eps)
        return Whitener(U * e.sqrt(), (U / e.sqrt()).T)

    def white(self, X: Tensor) -> Tensor:
        return X if self.L is None else _cast(X, self.L.dtype) @ self.L

    def back(self, X: Tensor) -> Tensor:
        return X if self.L_inv is None else X @ self.L_inv


def psd_sqrt(P: Tensor) -> Tensor:
    e, U = torch.linalg.eigh((P + P.T) / 2)
    return (U * e.clamp_min(0).sqrt()) @ U.T


def gram_root(P: Tensor) -> Tensor:
    """Some R with R'R = P, for a Gram matrix P (symmetric, PSD): its upper Cholesky factor, or
    psd_sqrt(P) where Cholesky fails (P singular to working precision, e.g. a zero head). A
    fit weighted by R depends on R'R only, so either gives the same fit; Cholesky is ~10x
    cheaper (a 128 x 128 P: ~0.1 ms against ~1 ms for the eigendecomposition)."""
    R, info = torch.linalg.cholesky_ex(P, upper=True)
    if int(info) == 0 and bool(torch.isfinite(R.sum())):
        return R
    return psd_sqrt(P)


PAIR_ROWS_BYTES = 32 * 1024 * 1024  # keys(): the rotary pairs' rows gathered a run of pairs at a time

# From this size on, the top-k subspace of a wide group (k at most 1/RANDOMIZED_RATIO of the
# stack's smaller side) comes from randomized subspace iteration instead of a full eigh: at 7B
# shapes with G = 1 (a 4096 x 4096 stack, k = 128) that is ~0.3 s instead of ~5.4 s a layer.
# Smaller problems (G >= 4 at 7B, every model in the tests and ../shared) keep the exact path
# and their outputs byte for byte.
RANDOMIZED_FROM = 2048
RANDOMIZED_RATIO = 16
POWER_STEPS = 7  # in low precision, the last NARROW_STEPS of them on k + k/4 directions (see top_right_basis)
NARROW_STEPS = 2


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): there a
    bf16 product is ~7x faster than a float32 one (4096 x 4096 x 256: 3.5 ms against 25 ms
    here); elsewhere torch emulates bf16 and is slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # a torch without these probes: float32 throughout
        return False


def _span(Y: Tensor) -> Tensor:
    """An orthonormal basis of Y's columns, in Y's dtype: Cholesky QR (Y'Y = R'R, Q = Y R^-1), ~3x
    cheaper than Householder QR at (4096, 256); Householder where Y'Y is too ill-conditioned
    for it. Only the span matters between power steps, so Cholesky QR's looser orthogonality
    is harmless there."""
    R, info = torch.linalg.cholesky_ex(Y.T @ Y, upper=True)
    diag = R.diagonal().abs()
    # Y'Y numerically singular (Y's columns nearly dependent) can still factor, into an R whose
    # smallest pivot is rounding noise: then Q = Y R^-1 is finite but far from orthonormal.
    # cond(Y) >= max/min pivot; past ~1/(4 sqrt(eps)) Householder takes over
    if int(info) == 0 and bool(diag.min() > diag.max() * (4 * torch.finfo(Y.dtype).eps ** 0.5)):
        Q = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
        # a sum is finite only if every entry is (Q's entries are at most ~1, so a finite
        # Q's sum cannot overflow): 0.07 ms at (4096, 256) against 1.5 ms for isfinite().all()
        if bool(torch.isfinite(Q.sum())):
            return Q
    return torch.linalg.qr(Y).Q


def _normal_product(X: Tensor, Q: Tensor) -> Tensor:
    """X'(X Q), as ((X Q)' X)': the same numbers (tested), but without a transposed wide
    operand, which is slower on this CPU (4096 x 4096 by 4096 x 256 in float32: 31-37 against
    27-30 ms; in bfloat16 0.9-1.6x, varying from run to run)."""
    return ((X @ Q).T @ X).T


@functools.lru_cache(maxsize=4)
def _start(d: int, cols: int, seed: int) -> Tensor:
    """The seeded random start of the subspace iteration (d, cols): the same for every layer
    of a model, so made once (~4 ms at (4096, 256)). Read only."""
    return torch.randn(d, cols, generator=torch.Generator().manual_seed(seed))


def top_right_basis(
    X32: Tensor,
    k: int,
    steps: int = POWER_STEPS,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    X16: Tensor | None = None,
) -> Tensor:
    """An orthonormal basis Q (d, k + k/4), in `dtype` (the work dtype), of a subspace that holds
    X'X's top k eigenvectors nearly, by subspace iteration from 2k random directions (seeded:
    the same X gives the same answer), given X in float32 (and in bfloat16 as X16, where the
    caller has it). The iterations only find the subspace, so they run in low precision through
    X, never forming X'X: bfloat16 products where the CPU has native ones, else float32. Before
    the last NARROW_STEPS of them only the k + k/4 directions that carry the most energy are
    kept (a Rayleigh-Ritz step on the X Q that step computes anyway: no extra product), and one
    more step in float32 follows on those, so that the subspace ends float32-accurate (a rank
    that fits in k + k/4 directions is captured to 1e-9). The narrow steps cost 0.6 of a wide
    one; 7 steps so narrowed cost less than 6 wide ones with the float32 step on all 2k, and
    leave less residual (at 7B, G = 1: 0.13% above the optimum on a flat spectrum against 0.15%,
    3.0e-5 against 3.2e-5 on a slowly decaying one). The Rayleigh-Ritz step that picks the k
    directions inside the subspace (`ritz`) is in the work dtype."""
    n, d = X32.shape
    keep = min(n, d, k + k // 4)
    Q = _start(d, min(n, d, 2 * k), seed)  # (d, 2k)
    X = X32
    if native_bf16():
        X = X32.bfloat16() if X16 is None else X16
    narrow_at = max(0, steps - 1 - NARROW_STEPS)
    for i in range(steps):
        Z = X @ Q.to(X.dtype)  # (n, columns of Q)
        if i == narrow_at:  # X Q's top right singular vectors span the directions to keep
            Zf = Z.float()
            W = torch.linalg.eigh(Zf.T @ Zf)[1][:, -keep:]  # ascending: the last are the top
            Z = (Zf @ W).to(X.dtype)
        Q = _span((Z.T @ X).T.float())
    del X, X16
    return _span(_span(_normal_product(X32, Q)).to(dtype))  # orthonormal to the work dtype's precision


def ritz(Z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rayleigh-Ritz for Z = X Q: the k largest eigenvalues of Q'X'XQ (descending, clamped at
    0) and their eigenvectors W (columns of Z, k); QW are the directions. Ritz values never exceed the
    true ones, so the energy they leave out is an upper bound on the exact residual, and it is
    what the directions QW leave."""
    e, W = torch.linalg.eigh(Z.T @ Z)  # ascending
    return e.flip(0)[:k].clamp_min(0), W.flip(1)[:, :k]


def randomized(n: int, k: int) -> bool:
    return n >= RANDOMIZED_FROM and n >= RANDOMIZED_RATIO * k


def shared_subspace(
    ALs: list[Tensor], Rs: list[Tensor], k: int, w: Whitener
) -> tuple[Tensor, list[Tensor], float, float]:
    """Best shared S (k x d) and per-head M_h (rows x k) minimising sum_h |R_h (A_h - M_h S) L|^2,
    given the whitened A_h L. Returns (S, [M_h], residual, total energy).

    The top-k right singular vectors of the stacked X come from the eigenvectors of its
    small Gram matrix X X' (r*rows square, r*rows <= d in practice) rather than from a full
    SVD of the wide X: the same subspace for a fraction of the work at 7B shapes. Directions
    that carry no energy (rank-deficient X: duplicate or zero heads) get a zero row in S."""
    n, d = sum(AL.shape[0] for AL in ALs), ALs[0].shape[1]
    if n <= d and not randomized(n, k):
        return _shared_subspace_from_gram(ALs, Rs, k, w)
    if randomized(min(n, d), k):
        # the stack X = [R_h A_h L] is only needed in float32 (for the power steps) and for its
        # energy (every eigenvalue's, no eigh needed): each block is formed in the work dtype,
        # measured, and stored in float32, never the whole stack in the work dtype nor a join of the blocks
        # (and in bfloat16 for the power steps where the CPU has native products, each block
        # converted while it is still in the CPU's cache rather than the whole stack after)
        X32, total, at = torch.empty(n, d), 0.0, 0
        X16 = torch.empty(n, d, dtype=torch.bfloat16) if native_bf16() else None
        for AL, R in zip(ALs, Rs, strict=True):
            rows = X32[at : at + len(R)]
            if AL.dtype == rows.dtype:  # formed in place: no copy
                block = torch.mm(R, AL, out=rows)
            else:  # a float64 block is measured, then stored rounded
                block = R @ AL
                rows.copy_(block)
            total += float(torch.linalg.vector_norm(block)) ** 2
            if X16 is not None:
                X16[at : at + len(R)] = block
            at += len(R)
        del block
        Q = top_right_basis(X32, k, dtype=ALs[0].dtype, X16=X16)  # (d, k + k/4)
        del X32, X16
        T = [AL @ Q for AL in ALs]  # (rows, k + k/4): X Q = [R_h T_h], and M_h = A_h L B' = T_h W
        top, W = ritz(torch.cat([R @ t for R, t in zip(Rs, T, strict=True)]), k)
        keep = top > top[:1].clamp_min(1e-300) * 1e-20  # no energy: a zero row in S
        W = W * keep  # (k + k/4, k)
        B = (Q @ W).T  # (k, d), orthonormal rows
        return w.back(B), [t @ W for t in T], max(0.0, total - float(top.sum())), total
    X = torch.cat([R @ AL for AL, R in zip(ALs, Rs, strict=True)])  # (r * rows, d)
    e, V = torch.linalg.eigh(X.T @ X)  # X taller than wide: the d x d Gram matrix
    e, V = e.flip(0).clamp_min(0), V.flip(1)
    B = V[:, :k].T  # orthonormal rows: the shared subspace, whitened
    return w.back(B), [AL @ B.T for AL in ALs], float(e[k:].sum()), float(e.sum())


def _shared_subspace_from_gram(
    ALs: list[Tensor], Rs: list[Tensor], k: int, w: Whitener
) -> tuple[Tensor, list[Tensor], float, float]:
    """shared_subspace when the stack is wider than tall, without forming X = [R_h A_h L].

    X X' has blocks R_i P_ij R_j' with P_ij = (A_i L)(A_j L)'; P is symmetric, so only the
    blocks i <= j are multiplied. With U_k the top eigenvectors of X X' and s their singular
    values, B = diag(1/s) U_k' X = sum_i V_i' A_i L for V_i = R_i' U_k,i / s (rows x k), and
    M_j = (A_j L) B' = sum_i P_ji V_i: small products instead of the r products R_i A_i L and
    the r products A_j L B' over the width d. At 7B, G = 8, ~45% fewer flops than through X."""
    r = len(ALs)
    upper = {(i, j): ALs[i] @ ALs[j].T for i in range(r) for j in range(i, r)}

    def P(i: int, j: int) -> Tensor:
        return upper[i, j] if i <= j else upper[j, i].T

    gram = torch.cat([torch.cat([Rs[i] @ P(i, j) @ Rs[j].T for j in range(r)], 1) for i in range(r)])
    e, U = torch.linalg.eigh(gram)
    e, U = e.flip(0).clamp_min(0), U.flip(1)  # descending
    s = e[:k].sqrt()
    keep = s > s[:1].clamp_min(1e-300) * 1e-10  # no energy: a zero row in S
    scale = keep / torch.where(keep, s, 1.0)
    Uk = U[:, :k].split([AL.shape[0] for AL in ALs])
    V = [(R.T @ u) * scale for R, u in zip(Rs, Uk, strict=True)]  # (rows, k) each
    B = sum((AL.T @ v).T for v, AL in zip(V, ALs, strict=True))  # (k, d); v.T @ AL, ~1.3x faster so
    Ms = [sum(P(j, i) @ V[i] for i in range(r)) for j in range(r)]
    return w.back(B), Ms, float(e[k:].sum()), float(e.sum())


def work_dtype(tensors: dict[str, Tensor], calibrated: bool) -> torch.dtype:
    """The dtype fold's math runs in: float32 for a data-free fold whose tensors are all stored
    in 16 bits (bfloat16 or float16), float64 otherwise. Float32 keeps 24 bits where the
    results keep 8 or 11, and at 7B shapes it halves the cost (one layer at G = 8: ~0.35 s
    against ~0.7 s); a float32 checkpoint keeps float64, and so does a calibrated fold, whose
    whitening L and its inverse can magnify rounding by the square root of C's condition number."""
    if not calibrated and all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors.values()):
        return torch.float32
    return torch.float64


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the work dtype, contiguous (a head's columns of o_proj are multiplied ~2x faster so).
    A copy into a new contiguous tensor: for a head's bfloat16 columns of o_proj (4096 x 128 at
    7B) 0.15 ms in float64, where .to(float64, memory_format=contiguous) takes 0.5 ms; the same values."""
    if x.dtype == dtype:
        return x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    out.copy_(x)
    return out


def _planes(rope: Rope) -> tuple[list[int], list[int], Tensor, Tensor]:
    """The rotary planes' a and b dims, as lists and as index tensors."""
    planes_a, planes_b = [a for a, _ in rope.planes], [b for _, b in rope.planes]
    return planes_a, planes_b, torch.tensor(planes_a, dtype=torch.long), torch.tensor(planes_b, dtype=torch.long)


def _evenly(idx: list[int]) -> slice | None:
    """idx as a slice when it is an evenly spaced, increasing run (rotate-half and interleaved
    planes both are), else None."""
    if len(idx) < 2:
        return slice(idx[0], idx[0] + 1) if idx else None
    step = idx[1] - idx[0]
    if step <= 0 or idx != list(range(idx[0], idx[-1] + 1, step)):
        return None
    return slice(idx[0], idx[-1] + 1, step)


def _shift(sl: slice, by: int) -> slice:
    return slice(sl.start + by, sl.stop + by, sl.step)


def _partition(groups: list[list[int]], n_kv: int) -> bool:
    """Whether the groups hold every KV head exactly once."""
    return sorted(k for g in groups for k in g) == list(range(n_kv))


def _covers(rope: Rope, hd: int) -> bool:
    """Whether the rotary planes and the linear dims hold every dim of a head exactly once."""
    return sorted([*(d for plane in rope.planes for d in plane), *rope.linear]) == list(range(hd))


def _rows(h: int, dims, hd: int) -> list[int]:
    return [h * hd + d for d in dims]


def _q_heads(k: int, m: int) -> range:
    return range(k * m, (k + 1) * m)


def pair_rows(WkL: Tensor, heads, planes_a: list[int], planes_b: list[int], hd: int, dtype: torch.dtype) -> Tensor:
    """(P, 2r, d), contiguous: for each rotary pair p, the a rows of `heads` then their b rows
    (one gather of whole rows)."""
    P, r = len(planes_a), len(heads)
    idx = torch.tensor(
        [[k * hd + a for k in heads] + [k * hd + b for k in heads] for a, b in zip(planes_a, planes_b, strict=True)]
    )
    return _cast(WkL.index_select(0, idx.view(-1)), dtype).view(P, 2 * r, WkL.shape[1])


def pair_gram(Kp: Tensor) -> Tensor:
    """(P, r, r) complex: the Gram matrix z_i conj(z_j) of each pair's complex rows z = a + i b,
    from the real products of Kp's rows (see pair_rows): (a_i a_j + b_i b_j) + i (b_i a_j - a_i b_j)."""
    r = Kp.shape[1] // 2
    G = Kp @ Kp.mT  # (P, 2r, 2r)
    aa, ab, ba, bb = G[:, :r, :r], G[:, :r, r:], G[:, r:, :r], G[:, r:, r:]
    return torch.complex(aa + bb, ba - ab)


def pair_energy(q_energy: Tensor, A: Tensor, B: Tensor, kv_heads, m: int) -> Tensor:
    """(P, len(kv_heads)): how much each KV head's query heads use each rotary pair (A[p], B[p])."""
    return torch.stack([sum(q_energy[h, A] + q_energy[h, B] for h in _q_heads(k, m)) for k in kv_heads], 1)


def pair_weight(energy: Tensor) -> Tensor:
    """The weight of each head's key in a pair's fit: sqrt of its energy, kept above zero."""
    return energy.sqrt() + 1e-12 * energy.sqrt().amax(1, keepdim=True).clamp_min(1e-30)


def value_reach(Wo: Tensor, k: int, m: int, hd: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """What of KV head k's values reaches the output: R with R'R = the sum over its query heads of
    W_o^h' W_o^h (`gram_root`)."""
    cols = [_cast(Wo[:, h * hd : (h + 1) * hd], dtype) for h in _q_heads(k, m)]
    return gram_root(sum(c.T @ c for c in cols))


def values(
    Wv: Tensor,
    Wo: Tensor,
    groups: list[list[int]],
    m: int,
    hd: int,
    w: Whitener,
    apply: bool = True,
    WvL: Tensor | None = None,
    Rv: list[Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
):
    """Wv: (n_kv*hd, d) augmented and Wo: (hidden, H*hd), any float dtype (a group's rows and a
    head's columns are taken to the work dtype `dtype` when used). Returns (new Wv (G*hd, d), new
    Wo in Wo's dtype, residual, total). WvL, Rv: w.white(Wv) and value_reach(Wo, ...), when the
    caller has them (the grouping search asks many times)."""
    WvL = w.white(Wv) if WvL is None else WvL  # (n_kv*hd, d)
    # every column of o_proj is rewritten when the groups cover every KV head: no copy to start from
    new_o = (torch.empty_like(Wo) if _partition(groups, Wv.shape[0] // hd) else Wo.clone()) if apply else Wo
    new_v = []
    res = tot = 0.0
    for g in groups:
        ALs = [_cast(WvL[k * hd : (k + 1) * hd], dtype) for k in g]
        Rs = [value_reach(Wo, k, m, hd, dtype) for k in g] if Rv is None else [Rv[k] for k in g]
        S, Ms, r, t = shared_subspace(ALs, Rs, hd, w)
        res, tot = res + r, tot + t
        new_v.append(S)
        if apply:
            for k, M in zip(g, Ms, strict=True):
                for h in _q_heads(k, m):
                    new_o[:, h * hd : (h + 1) * hd] = _cast(Wo[:, h * hd : (h + 1) * hd], dtype) @ M
    return torch.cat(new_v), new_o, res, tot


def keys(
    Wk: Tensor,
    Wq: Tensor,
    groups: list[list[int]],
    m: int,
    hd: int,
    rope: Rope,
    w: Whitener,
    apply: bool = True,
    whitened: tuple[Tensor, Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
):
    """Wk: (n_kv*hd, d) and Wq: (H*hd, d), any float dtype (rows are taken to the work dtype
    `dtype` when used), both augmented. Returns (new Wk (G*hd, d), new Wq in Wq's dtype, residual, total);
    with apply=False only the residual and total are computed. whitened: (w.white(Wk), w.white(Wq))."""
    WkL, WqL = (w.white(Wk), w.white(Wq)) if whitened is None else whitened  # whitened rows
    L_inv = None if not apply else w.L_inv
    new_k = torch.zeros(len(groups) * hd, Wk.shape[1], dtype=dtype)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    # every row of q_proj is rewritten when the groups cover every KV head and the rotary
    # planes and linear dims cover the head: no copy to start from
    covers = _partition(groups, Wk.shape[0] // hd) and _covers(rope, hd)
    new_q = (torch.empty_like(Wq) if covers else Wq.clone()) if apply else Wq
    res = tot = 0.0
    planes_a, planes_b, A, B = _planes(rope)
    Qw = WqL.view(-1, hd, WqL.shape[1])  # (heads, hd, d)
    # (H, hd): how much each query row carries; a head at a time (no (H*hd, d) temporary)
    q_energy = torch.stack([_cast(q, dtype).square().sum(-1) for q in Qw])
    for gi, g in enumerate(groups):
        if len(A):  # the rotary pairs, all at once
            # how much each head's queries use each pair (the weight of its key in the fit)
            weight = pair_weight(pair_energy(q_energy, A, B, g, m))  # (P, r)
            c = torch.zeros(len(A), len(g), dtype=cdtype)  # head j's key ~ c[p, j] * shared
            # pair p of head j is the complex row z_j = a_j + i b_j (its two rotary rows); Kp[p]
            # holds the group's a rows, then its b rows: real, so no complex copies. A run of
            # pairs at a time, at most PAIR_ROWS_BYTES of them (at 7B, G = 1: 2 MB a pair)
            run = max(1, PAIR_ROWS_BYTES // (2 * len(g) * WkL.shape[1] * dtype.itemsize))
            for lo in range(0, len(A), run):
                at = slice(lo, lo + run)
                Kp = pair_rows(WkL, g, planes_a[at], planes_b[at], hd, dtype)  # (p, 2r, d)
                wt = weight[at]
                # the best rank-1 fit of each pair's weighted rows w_j z_j, from the top eigenpair
                # of their small r x r Gram matrix
                e, U = torch.linalg.eigh(pair_gram(Kp) * (wt[:, :, None] * wt[:, None, :]).to(cdtype))
                top, u = e[:, -1].clamp_min(0), U[:, :, -1]  # (p,), (p, r); e ascending
                res, tot = res + float((e[:, :-1].clamp_min(0)).sum()), tot + float(e.clamp_min(0).sum())
                if apply:
                    sigma = top.sqrt()
                    safe = torch.where(sigma > 0, sigma, 1.0)
                    # the shared row sum_j v_j z_j with v_j = conj(u_j) w_j / sigma: its real and
                    # imaginary parts as one real product over the a and b rows
                    v = u.conj() * wt * ((sigma > 0) / safe)[:, None]  # (p, r)
                    coef = torch.stack([torch.cat([v.real, -v.imag], 1), torch.cat([v.imag, v.real], 1)], 1)
                    shared = coef @ Kp  # (p, 2, d): real and imaginary rows
                    if L_inv is not None:
                        shared = shared @ L_inv  # original coordinates
                    new_k[gi * hd + A[at]], new_k[gi * hd + B[at]] = shared[:, 0], shared[:, 1]
                    c[at] = u * sigma[:, None] / wt  # conj(c) goes into the queries
                del Kp
            if apply:
                # a head's a and b rows: strided views where the planes are evenly spaced (both
                # layouts), so no gathers and no index_put; the same values either way
                ra, rb = _evenly(planes_a), _evenly(planes_b)
                for j, k in enumerate(g):
                    cr, ci = c[:, j].real[:, None], c[:, j].imag[:, None]
                    for h in _q_heads(k, m):
                        ia = h * hd + A if ra is None else _shift(ra, h * hd)
                        ib = h * hd + B if rb is None else _shift(rb, h * hd)
                        qa, qb = _cast(Wq[ia], dtype), _cast(Wq[ib], dtype)
                        new_q[ia] = (cr * qa + ci * qb).to(new_q.dtype)
                        new_q[ib] = (cr * qb - ci * qa).to(new_q.dtype)
        if rope.linear:
            lin = list(rope.linear)
            ALs = [_cast(WkL[_rows(k, lin, hd)], dtype) for k in g]
            q_lin = [[_cast(WqL[_rows(h, lin, hd)], dtype) for h in _q_heads(k, m)] for k in g]
            Rs = [psd_sqrt(sum(q @ q.T for q in qs)) for qs in q_lin]
            S, Ns, r, t = shared_subspace(ALs, Rs, len(lin), w)
            res, tot = res + r, tot + t
            new_k[_rows(gi, lin, hd)] = S
            if apply:
                for k, N in zip(g, Ns, strict=True):
                    for h in _q_heads(k, m):
                        new_q[_rows(h, lin, hd)] = (N.T @ _cast(Wq[_rows(h, lin, hd)], dtype)).to(new_q.dtype)
    return new_k, new_q, res, tot


def augment(weight: Tensor, bias: Tensor | None, dtype: torch.dtype = torch.float64) -> Tensor:
    """[W | b] in the work dtype, so biases ride along as the weight of a constant-1 input."""
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return torch.cat([weight.to(dtype), b.to(dtype)[:, None]], dim=1)


class FoldProblem:
    """One layer's attention, ready to be grouped: `cost(group)` for the grouping search,
    `convert(groups)` for the converted tensors (by role, each in its original dtype)."""

    def __init__(
        self,
        tensors: dict[str, Tensor],
        n_heads: int,
        n_kv: int,
        hd: int,
        moment: Tensor | None,
        rope: Rope,
        key_norm: bool,
    ) -> None:
        self.t, self.hd, self.m, self.rope, self.key_norm = tensors, hd, n_heads // n_kv, rope, key_norm
        # Biases ride on a constant-1 input only when the checkpoint has them (else S could grow one).
        self.biased = "k.bias" in tensors and "v.bias" in tensors
        d = tensors["q.weight"].shape[1] + (1 if self.biased else 0)
        self.dtype = dt = work_dtype(tensors, moment is not None)
        if moment is None:  # data-free: C = I, and the whitening is the identity (no d x d matrix made)
            self.w = Whitener.identity()
        else:
            C = moment.double()
            self.w = Whitener.from_moment(C if self.biased else C[:d, :d])
        aug = (
            (lambda r: augment(tensors[f"{r}.weight"], tensors.get(f"{r}.bias"), dt))
            if self.biased
            else (lambda r: tensors[f"{r}.weight"])
        )
        # The projections stay in the checkpoint's dtype unless augmented (or whitened, below):
        # keys() and values() take the rows and columns they use to the work dtype a head or a group
        # at a time. (Whole float64 copies of the four, a copy of q and o to rewrite and the casts
        # back were ~0.3 CPU-s of a 7B layer's ~1.2, all memory traffic, and 0.5 GB.)
        self.Wq, self.Wk, self.Wv, self.Wo = aug("q"), aug("k"), aug("v"), tensors["o.weight"]
        # Computed once: every cost() of the grouping search reuses them.
        self.WvL, self.kq = self.w.white(self.Wv), (self.w.white(self.Wk), self.w.white(self.Wq))
        self.Rv = [value_reach(self.Wo, k, self.m, hd, dt) for k in range(n_kv)]
        self.n_kv = n_kv
        self._totals: tuple[float, float] | None = None
        self._value_gram: Tensor | None = None
        self._key_terms: tuple[Tensor, Tensor] | None = None

    @property
    def totals(self) -> tuple[float, float]:
        """The value and key energies of the unconverted heads, which normalise cost(); only
        the grouping search needs them, so they are computed on first use."""
        if self._totals is None:
            singles = [[k] for k in range(self.n_kv)]
            m, hd, w = self.m, self.hd, self.w
            _, _, _, v_total = values(self.Wv, self.Wo, singles, m, hd, w, False, self.WvL, self.Rv, self.dtype)
            _, _, _, k_total = keys(self.Wk, self.Wq, singles, m, hd, self.rope, w, False, self.kq, self.dtype)
            self._totals = (v_total, k_total)
        return self._totals

    @property
    def v_total(self) -> float:
        return self.totals[0]

    @property
    def k_total(self) -> float:
        return self.totals[1]

    @property
    def value_gram(self) -> Tensor:
        """Y Y' for Y = [R_k (W_v^k L)] stacked over every KV head: (n_kv*hd, n_kv*hd). The
        Gram matrix of any group's stacked X (see shared_subspace) is a block of it, so each
        of the search's thousands of cost() calls is one small eigvalsh, not a (r*hd) x d x
        (r*hd) product. Computed on first use: only the grouping search needs it."""
        if self._value_gram is None:
            hd = self.hd
            Y = torch.cat([self.Rv[k] @ _cast(self.WvL[k * hd : (k + 1) * hd], self.dtype) for k in range(self.n_kv)])
            self._value_gram = Y @ Y.T
        return self._value_gram

    def value_residual(self, group: list[int]) -> float:
        """What shared_subspace leaves of the group's value energy: the eigenvalues of its
        Gram matrix beyond the top hd."""
        rows = torch.tensor([k * self.hd + i for k in group for i in range(self.hd)])
        e = torch.linalg.eigvalsh(self.value_gram[rows][:, rows]).clamp_min(0)  # ascending
        return float(e[: max(0, len(e) - self.hd)].sum())

    @property
    def key_terms(self) -> tuple[Tensor, Tensor]:
        """For every rotary pair p: the complex Gram matrix of all KV heads' key rows,
        (P, n_kv, n_kv), and how much each KV head's queries use the pair, (P, n_kv) — the
        two things keys() forms per group, computed once for the search."""
        if self._key_terms is None:
            hd, m = self.hd, self.m
            planes_a, planes_b, A, B = _planes(self.rope)
            WkL, WqL = self.kq
            q_energy = _cast(WqL.view(-1, hd, WqL.shape[1]), self.dtype).square().sum(-1)  # (H, hd)
            gram = pair_gram(pair_rows(WkL, range(self.n_kv), planes_a, planes_b, hd, self.dtype))  # (P, n_kv, n_kv)
            energy = pair_energy(q_energy, A, B, range(self.n_kv), m)  # (P, n_kv)
            self._key_terms = (gram, energy)
        return self._key_terms

    def key_residual(self, group: list[int]) -> float:
        """keys()'s residual for one group, from key_terms: each pair's weighted r x r Gram
        matrix is a scaled block of the cached one (eigvalsh, no vectors)."""
        if self.rope.linear or not self.rope.planes:  # partial rotary: the general path
            return keys(self.Wk, self.Wq, [group], self.m, self.hd, self.rope, self.w, False, self.kq, self.dtype)[2]
        gram, energy = self.key_terms
        idx = torch.tensor(group)
        weight = pair_weight(energy[:, idx])  # (P, r)
        G = gram[:, idx][:, :, idx] * (weight[:, :, None] * weight[:, None, :]).to(gram.dtype)
        ev = torch.linalg.eigvalsh(G)  # (P, r) ascending
        return float(ev[:, :-1].clamp_min(0).sum())

    def cost(self, group: list[int]) -> float:
        """Relative error of sharing one K/V head in `group` (0 when the heads are equivalent)."""
        cost = self.value_residual(group) / max(self.v_total, 1e-30)
        if not self.key_norm:
            cost += self.key_residual(group) / max(self.k_total, 1e-30)
        return cost

    def convert(self, groups: list[list[int]]) -> dict[str, Tensor]:
        t, out = self.t, dict(self.t)
        new_v, new_o, _, _ = values(
            self.Wv, self.Wo, groups, self.m, self.hd, self.w, True, self.WvL, self.Rv, self.dtype
        )
        out["v.weight"], out["o.weight"] = _split(new_v, t, "v", self.biased, out), new_o.to(t["o.weight"].dtype)
        # keys(), where the peak is, needs none of the value side: its work-dtype copies go now (a
        # problem is converted once; the grouping search's cost() runs before, on a problem of its own)
        del new_v, new_o
        self.Wv = self.WvL = self.Wo = self.Rv = self._value_gram = None
        if self.key_norm:  # a per-head norm sits between k_proj and RoPE: no exact fold, mean-pool the keys
            from .pooling import pool_heads

            n_kv, G = len(sum(groups, [])), len(groups)
            for role in ("k.weight", "k.bias", "k.norm"):
                if role in t:
                    out[role] = pool_heads(t[role], n_kv, G)
            return out
        new_k, new_q, _, _ = keys(
            self.Wk, self.Wq, groups, self.m, self.hd, self.rope, self.w, True, self.kq, self.dtype
        )
        out["k.weight"] = _split(new_k, t, "k", self.biased, out)
        out["q.weight"] = _split(new_q, t, "q", self.biased and "q.bias" in t, out)
        return out


def _split(W: Tensor, t: dict[str, Tensor], proj: str, biased: bool, out: dict[str, Tensor]) -> Tensor:
    """Undo `augment`: store the bias column (if any) in out[proj.bias]; return the weight."""
    if biased:
        out[f"{proj}.bias"] = W[:, -1].to(t[f"{proj}.bias"].dtype)
        W = W[:, :-1]
    return W.to(t[f"{proj}.weight"].dtype)
