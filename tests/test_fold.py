"""The fold method and the grouping search: exact where they must be, better than mean
pooling where they approximate."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_EXTRAS, build_model, load, logits, make_checkpoint, save_model, shared_path

from gqa_convert import convert
from gqa_convert.architectures import family_for
from gqa_convert.methods import grouping


@pytest.mark.parametrize("model_type", sorted(FAMILY_EXTRAS))
def test_fold_at_g_equals_h_reproduces_logits_and_beats_mean(tmp_path, model_type):
    # exact at G = H: this fails if the rotary pairs (half / interleaved / partial) or the bias
    # handling are wrong, since a complex rescaling only commutes with RoPE on its true planes
    src, model = make_checkpoint(tmp_path, model_type)
    want = logits(model)
    convert(src, 4, out=tmp_path / "f4", method="fold")
    torch.testing.assert_close(logits(load(tmp_path / "f4")), want, rtol=1e-3, atol=1e-3)
    convert(src, 2, out=tmp_path / "f2", method="fold")
    convert(src, 2, out=tmp_path / "m2")
    err_fold = (logits(load(tmp_path / "f2")) - want).square().mean()
    err_mean = (logits(load(tmp_path / "m2")) - want).square().mean()
    assert err_fold < err_mean


def test_fold_on_gqa_source(tmp_path):
    src, model = make_checkpoint(tmp_path, "llama", num_attention_heads=8, hidden_size=64, n_kv=4)
    convert(src, 4, out=tmp_path / "same", method="fold")
    torch.testing.assert_close(logits(load(tmp_path / "same")), logits(model), rtol=1e-3, atol=1e-3)
    convert(src, 1, out=tmp_path / "mqa", method="fold", grouping="search")
    assert load(tmp_path / "mqa").config.num_key_value_heads == 1


def test_head_permutation_changes_nothing(tmp_path):
    model = build_model("qwen2", num_attention_heads=8, hidden_size=64, n_kv=4)
    family = family_for(model.config.to_dict())
    sd = model.state_dict()
    order = [2, 0, 3, 1]
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        by_role = {role: sd[prefix + rel] for role, rel in family.roles.items() if prefix + rel in sd}
        for role, t in grouping.permute(by_role, order, 8, 4).items():
            sd[prefix + family.roles[role]] = t
    permuted = build_model("qwen2", num_attention_heads=8, hidden_size=64, n_kv=4)
    permuted.load_state_dict(sd)
    assert not torch.equal(
        sd["model.layers.0.self_attn.k_proj.weight"], model.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    )
    torch.testing.assert_close(logits(permuted), logits(model), rtol=1e-5, atol=1e-5)


def test_search_finds_shuffled_identical_pairs(tmp_path):
    """KV heads in identical pairs, in shuffled places: contiguous groups are lossy, the
    search finds the pairs and the conversion to H/2 groups is lossless."""
    model = build_model("llama", num_attention_heads=8, hidden_size=64)
    pairs = [(0, 5), (1, 3), (2, 7), (4, 6)]
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(8, 8, 64)
                for a, b in pairs:
                    w[b] = w[a]
    src = save_model(model, tmp_path / "src")
    want = logits(model)
    convert(src, 4, out=tmp_path / "s", method="fold", grouping="search")
    torch.testing.assert_close(logits(load(tmp_path / "s")), want, rtol=1e-3, atol=1e-3)
    found = json.loads((tmp_path / "s" / "gqa_convert.json").read_text())["conversion"]["grouping"]
    assert found["0"] == [list(p) for p in pairs]
    convert(src, 4, out=tmp_path / "m", grouping="search")  # mean pooling on the found pairs is lossless too
    torch.testing.assert_close(logits(load(tmp_path / "m")), want, rtol=1e-4, atol=1e-4)
    convert(src, 4, out=tmp_path / "c")
    assert (logits(load(tmp_path / "c")) - want).abs().max() > 1e-2, "contiguous groups are lossy here"


def test_calibrated_fold_records_calibration(tmp_path):
    mha = shared_path("models", "stories260K-mha")
    train = shared_path("data", "tinystories-valid-train.txt")
    convert(
        mha,
        2,
        out=tmp_path / "c",
        method="fold",
        calib=[str(train)],
        calib_separator="<|endoftext|>",
        calib_tokens=2048,
    )
    m = json.loads((tmp_path / "c" / "gqa_convert.json").read_text())["conversion"]
    assert m["method"] == "fold" and m["calibration"]["tokens"] == 2048
    assert len(m["calibration"]["files"][str(train)]) == 64
    with pytest.raises(Exception, match="--calib is used by --method fold and refine only"):
        convert(mha, 2, out=tmp_path / "x", calib=[str(train)])


def test_calibration_of_a_model_larger_than_the_memory_budget(tmp_path):
    """A model over the budget is run from disk layer by layer (Accelerate offloading), with
    the same statistics as in memory."""
    from gqa_convert.conversion.calibrate import collect
    from gqa_convert.conversion.plan import build_plan
    from gqa_convert.io.source import open_source

    src = open_source(shared_path("models", "stories260K-mha"))
    plan = build_plan(src, 2, "fold")
    data = [str(shared_path("data", "tinystories-valid-train.txt"))]
    args = (src.root, src.config, plan.family, [lp.prefix for lp in plan.layers], data)
    kw = dict(tokens=512, separator="<|endoftext|>")
    in_memory = collect(*args, **kw)
    offloaded = collect(*args, **kw, bytes_fp32=10**9, memory_budget=300_000)
    assert offloaded.offloaded and not in_memory.offloaded
    for layer, m in in_memory.moments.items():
        torch.testing.assert_close(offloaded.moments[layer], m)


@pytest.mark.parametrize("zero_head", [False, True])
@pytest.mark.parametrize("rows,d", [(8, 32), (8, 12)])  # r*rows <= d (Gram of rows) and > d (Gram of columns)
@pytest.mark.parametrize("reach", ["identity", "general"])
def test_shared_subspace_is_the_best_rank_k_fit(zero_head, rows, d, reach):
    """The eigen route gives the SVD's answer: the same best rank-k fit of X = [R_h A_h L]
    and residual, and finite weights when the stack is rank deficient (a head that is all
    zeros). A general (non-symmetric) R_h catches an R/R' mix-up in the route that builds
    X X' from blocks without forming X."""
    from gqa_convert.methods.fold import Whitener, shared_subspace

    gen = torch.Generator().manual_seed(0)
    r = 3
    ALs = [torch.randn(rows, d, generator=gen, dtype=torch.float64) for _ in range(r)]
    if zero_head:
        ALs[1] = torch.zeros(rows, d, dtype=torch.float64)
    Rs = [
        torch.eye(rows, dtype=torch.float64) if reach == "identity" else torch.randn(rows, rows, generator=gen).double()
        for _ in ALs
    ]
    k = rows
    S, Ms, res, tot = shared_subspace(ALs, Rs, k, Whitener.identity())
    X = torch.cat([R @ AL for R, AL in zip(Rs, ALs, strict=True)])
    U, s, Vt = torch.linalg.svd(X, full_matrices=False)
    best = (U[:, :k] * s[:k]) @ Vt[:k]
    assert torch.isfinite(S).all() and all(torch.isfinite(M).all() for M in Ms)
    torch.testing.assert_close(torch.cat([R @ M @ S for R, M in zip(Rs, Ms, strict=True)]), best, rtol=1e-8, atol=1e-8)
    assert res == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-8, abs=1e-8)
    assert tot == pytest.approx(float((s**2).sum()), rel=1e-10)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32-steps", "bf16-steps"])
@pytest.mark.parametrize("spectrum", ["flat", "decaying", "low_rank"])
def test_randomized_subspace_is_near_the_best_fit(monkeypatch, spectrum, bf16):
    """Large groups (G = 1 at 7B: a 4096 x 4096 Gram matrix, k = 128) take the top-k subspace
    from randomized subspace iteration. Its residual is an upper bound on the exact one and
    close to it: within 0.5% on a flat (random) spectrum, the worst case, to 1e-6 on a decaying
    one, and exact when the stack's rank fits in the k + k/4 directions kept (duplicated heads) — with
    its power steps in float32, and in bfloat16 (as on a CPU with native bf16 products)."""
    from gqa_convert.methods import fold

    monkeypatch.setattr(fold, "native_bf16", lambda: bf16)
    monkeypatch.setattr(fold, "RANDOMIZED_FROM", 256)  # the path, at a size the suite can afford
    gen = torch.Generator().manual_seed(5)
    rows, r, d, k = 16, 32, 640, 16  # n = r * rows = 512 <= d; k = rows
    X = torch.randn(r * rows, d, generator=gen, dtype=torch.float64)
    if spectrum == "decaying":
        U, _ = torch.linalg.qr(torch.randn(r * rows, r * rows, generator=gen, dtype=torch.float64))
        X = (U * torch.arange(1, r * rows + 1, dtype=torch.float64) ** -0.7) @ X[:, :] / d**0.5
    elif spectrum == "low_rank":
        X = torch.randn(r * rows, 20, generator=gen, dtype=torch.float64) @ torch.randn(20, d, generator=gen).double()
    ALs = list(X.split(rows))
    Rs = [torch.eye(rows, dtype=torch.float64)] * r
    assert fold.randomized(r * rows, k)
    S, Ms, res, tot = fold.shared_subspace(ALs, Rs, k, fold.Whitener.identity())
    s = torch.linalg.svdvals(X)
    best, total = float((s[k:] ** 2).sum()), float((s**2).sum())
    assert tot == pytest.approx(total, rel=1e-10)
    assert res >= best * (1 - 1e-9) - 1e-9 * total  # Ritz values never exceed the true ones
    assert res - best <= {"flat": 5e-3, "decaying": 1e-6, "low_rank": 1e-9}[spectrum] * max(best, 1e-9 * total)
    fit = torch.cat([M @ S for M in Ms])  # the returned maps do at least as well as reported, never beyond the best
    actual = float((X - fit).square().sum())
    assert best * (1 - 1e-9) - 1e-9 * total <= actual <= res * (1 + 1e-9) + 1e-9 * total
    torch.testing.assert_close(S @ S.T, torch.eye(k, dtype=torch.float64) * (S.norm(dim=1) > 0), atol=1e-9, rtol=0)
    again = fold.shared_subspace(ALs, Rs, k, fold.Whitener.identity())  # seeded: the same answer
    assert torch.equal(again[0], S)


def test_randomized_subspace_on_real_weights(monkeypatch):
    """ts-mha-8h's values at G = 1 (a true MHA model): the randomized fit's residual is within
    1e-4 of the exact one (both forced through their paths on the same stack)."""
    from safetensors.torch import load_file

    from gqa_convert.methods import fold

    w = load_file(str(shared_path("models/ts-mha-8h") / "model.safetensors"))
    hd = 16
    Wv, Wo = w["model.layers.0.self_attn.v_proj.weight"].double(), w["model.layers.0.self_attn.o_proj.weight"].double()
    ALs = list(Wv.split(hd))
    Rs = [fold.value_reach(Wo, k, 1, hd) for k in range(len(ALs))]
    exact = fold.shared_subspace(ALs, Rs, hd, fold.Whitener.identity())
    monkeypatch.setattr(fold, "RANDOMIZED_FROM", 64)
    monkeypatch.setattr(fold, "RANDOMIZED_RATIO", 4)
    approx = fold.shared_subspace(ALs, Rs, hd, fold.Whitener.identity())
    assert approx[3] == pytest.approx(exact[3], rel=1e-10)
    assert exact[2] * (1 - 1e-9) <= approx[2] <= exact[2] * (1 + 1e-4)


def test_span_is_an_orthonormal_basis_even_where_cholesky_fails():
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(3)
    Y = torch.randn(200, 12, generator=gen)
    Q = fold._span(Y)  # well conditioned: Cholesky QR
    torch.testing.assert_close(Q.T @ Q, torch.eye(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ (Q.T @ Y), Y, atol=1e-4, rtol=1e-4)  # the same span
    Y[:, 5] = Y[:, 2]  # rank-deficient: Y'Y is singular, Householder QR takes over
    Q = fold._span(Y)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.T @ Q, torch.eye(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ (Q.T @ Y), Y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank", ["full", "deficient"])
def test_gram_root_is_a_factor_of_the_gram_matrix(dtype, rank):
    """gram_root(P) is some R with R'R = P: the Cholesky factor of a full-rank P, the symmetric
    square root where Cholesky fails (a head of o_proj with repeated columns: P singular)."""
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(6)
    W = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    if rank == "deficient":
        W[:, 9:] = W[:, :7]
    P = (W.T @ W).to(dtype)
    R = fold.gram_root(P)
    assert R.dtype == dtype and torch.isfinite(R).all()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(R.T @ R, P, rtol=tol, atol=tol * float(P.abs().max()))
    assert torch.equal(R, torch.triu(R)) == (rank == "full")  # Cholesky where it can


def test_value_fit_is_the_same_with_either_root():
    """A value fit depends on R'R only: with value_reach's root (Cholesky) and with the
    symmetric square root of the same Gram matrix, S spans the same subspace, the fitted
    products M_h S and the residual agree to float64 rounding (a group of 3 heads, 2 query heads
    each, whose stack is taller than wide: the d x d route)."""
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(7)
    hd, m, d, heads = 8, 2, 20, 3
    Wv = torch.randn(heads * hd, d, generator=gen, dtype=torch.float64)
    Wo = torch.randn(24, heads * m * hd, generator=gen, dtype=torch.float64)
    ALs = list(Wv.split(hd))
    cholesky = [fold.value_reach(Wo, k, m, hd) for k in range(heads)]
    assert all(torch.equal(R, torch.triu(R)) for R in cholesky)  # value_reach takes the Cholesky factor
    gram = [
        sum(Wo[:, h * hd : (h + 1) * hd].T @ Wo[:, h * hd : (h + 1) * hd] for h in fold._q_heads(k, m))
        for k in range(heads)
    ]
    symmetric = [fold.psd_sqrt(P) for P in gram]
    fits = [fold.shared_subspace(ALs, Rs, hd, fold.Whitener.identity()) for Rs in (cholesky, symmetric)]
    (S1, M1, res1, tot1), (S2, M2, res2, tot2) = fits
    for a, b in zip(M1, M2, strict=True):
        torch.testing.assert_close(a @ S1, b @ S2, rtol=1e-9, atol=1e-9)
    assert res1 == pytest.approx(res2, rel=1e-9) and tot1 == pytest.approx(tot2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_normal_product_is_x_transpose_x_q(dtype):
    """The power steps' X'(XQ), computed as ((XQ)'X)' for speed, is X'(XQ)."""
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(4)
    X = torch.randn(96, 80, generator=gen).to(dtype)
    Q = torch.randn(80, 12, generator=gen).to(dtype)
    got, want = fold._normal_product(X, Q), X.T @ (X @ Q)
    assert got.shape == want.shape and got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("work", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cast_copies_strided_columns_exactly(dtype, work):
    """_cast of a head's columns (a strided view) is a contiguous copy in the work dtype with the same values."""
    from gqa_convert.methods.fold import _cast

    W = (torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    cols = W[:, 16:32]
    got = _cast(cols, work)
    assert got.dtype == work and got.is_contiguous()
    assert torch.equal(got, cols.to(work))
    if dtype == work:
        assert got.data_ptr() != cols.data_ptr()  # strided: a copy, never a view of W


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_keys_that_are_complex_multiples_share_one_head_exactly(layout):
    """KV heads whose every rotary pair is a complex multiple of another head's (a rotation and a
    scale per pair, which commute with RoPE) share one key exactly: the residual is zero and
    each query head's complex form q_p conj(k_p), which is what attention sees of pair p at
    every relative position, is unchanged. Fails if the pair Gram matrix is conjugated or the
    shared row's real/imaginary parts are mixed (identical heads and G = H cannot see either)."""
    from gqa_convert.architectures.rope import rope_layout
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(11)
    hd, d, n_kv, m = 8, 12, 4, 2
    rope = rope_layout(hd, hd, layout)
    A, B = [a for a, _ in rope.planes], [b for _, b in rope.planes]

    def pairs(W: torch.Tensor, h: int) -> torch.Tensor:  # (P, d) complex rows of head h
        return torch.complex(W[[h * hd + a for a in A]], W[[h * hd + b for b in B]])

    Wk = torch.randn(n_kv * hd, d, generator=gen, dtype=torch.float64)
    for src, dst in ((0, 1), (2, 3)):
        c = torch.complex(*torch.randn(2, len(A), 1, generator=gen, dtype=torch.float64))
        z = pairs(Wk, src) * c
        Wk[[dst * hd + a for a in A]], Wk[[dst * hd + b for b in B]] = z.real, z.imag
    Wq = torch.randn(n_kv * m * hd, d, generator=gen, dtype=torch.float64)
    groups = [[0, 1], [2, 3]]
    new_k, new_q, res, tot = fold.keys(Wk, Wq, groups, m, hd, rope, fold.Whitener.identity())
    assert res <= 1e-12 * tot
    for h in range(n_kv * m):
        k = h // m
        g = next(i for i, grp in enumerate(groups) if k in grp)
        before = pairs(Wq, h)[:, :, None] * pairs(Wk, k).conj()[:, None, :]  # (P, d, d)
        after = pairs(new_q, h)[:, :, None] * pairs(new_k, g).conj()[:, None, :]
        torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_keys_in_runs_of_pairs_give_the_same_result(monkeypatch):
    """keys() gathers the rotary rows a run of pairs at a time (bounded memory for wide groups):
    one pair at a time gives the same tensors as all at once."""
    from gqa_convert.architectures.rope import rope_layout
    from gqa_convert.methods import fold

    gen = torch.Generator().manual_seed(4)
    hd, d, n_kv, m = 8, 12, 4, 2
    Wk = torch.randn(n_kv * hd, d, generator=gen, dtype=torch.float64)
    Wq = torch.randn(n_kv * m * hd, d, generator=gen, dtype=torch.float64)
    args = (Wk, Wq, [[0, 1, 2, 3]], m, hd, rope_layout(hd, 6, "half"), fold.Whitener.identity())
    whole = fold.keys(*args)
    monkeypatch.setattr(fold, "PAIR_ROWS_BYTES", 1)
    runs = fold.keys(*args)
    assert torch.equal(whole[0], runs[0]) and torch.equal(whole[1], runs[1])
    assert runs[2] == pytest.approx(whole[2], rel=1e-12) and runs[3] == pytest.approx(whole[3], rel=1e-12)


@pytest.mark.parametrize(
    ("d", "biased", "calibrated", "n_heads"), [(64, False, False, 8), (64, True, True, 16), (12, False, True, 8)]
)
def test_search_cost_from_the_cached_gram_equals_the_direct_residual(d, biased, calibrated, n_heads):
    """cost() reads each group's value and key Gram matrices from cached all-heads products;
    both residuals must equal what values() and keys() compute for the group directly (here
    also with r*hd > d, where the direct value path takes the d x d Gram matrix instead)."""
    from gqa_convert.architectures.rope import rope_layout
    from gqa_convert.methods.fold import FoldProblem, keys, values

    gen = torch.Generator().manual_seed(3)
    n_kv, hd = 8, 4
    t = {r: torch.randn(n_kv * hd if r in "kv" else n_heads * hd, d, generator=gen) for r in "qkv"}
    t = {f"{r}.weight": w for r, w in t.items()} | {"o.weight": torch.randn(d, n_heads * hd, generator=gen)}
    if biased:
        t |= {f"{r}.bias": torch.randn(n_kv * hd if r in "kv" else n_heads * hd, generator=gen) for r in "qkv"}
    x = torch.randn(256, d + (1 if biased else 0), generator=gen, dtype=torch.float64)
    moment = x.T @ x / 256 if calibrated else None
    p = FoldProblem(t, n_heads, n_kv, hd, moment, rope_layout(hd, hd, "half"), key_norm=False)
    for group in ([0, 1], [2, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7], [6]):
        _, _, direct, _ = values(p.Wv, p.Wo, [group], p.m, hd, p.w, False, p.WvL, p.Rv)
        assert p.value_residual(group) == pytest.approx(direct, rel=1e-9, abs=1e-9 * p.v_total)
        _, _, direct, _ = keys(p.Wk, p.Wq, [group], p.m, hd, p.rope, p.w, False, p.kq)
        assert p.key_residual(group) == pytest.approx(direct, rel=1e-9, abs=1e-9 * p.k_total)


@pytest.mark.parametrize("method", ["fold", "mean"])
def test_conversions_keep_freed_memory_and_give_it_back(tmp_path, monkeypatch, method):
    """Every method keeps glibc from unmapping freed blocks while it streams (each 7B layer's
    tensor buffers, and fold's float64 temporaries, were faulted in afresh), then restores the
    defaults and trims, also when the conversion fails."""
    from gqa_convert.conversion import converter, stream

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(converter, "_glibc", lambda: FakeLibc())
    seen = []
    real = stream.convert_layer

    def spy(*a, **kw):
        seen.append(list(calls))
        return real(*a, **kw)

    monkeypatch.setattr(stream, "convert_layer", spy)
    src, _ = make_checkpoint(tmp_path, "llama")
    convert(src, 2, out=tmp_path / "out", method=method)
    on = [("mallopt", converter._M_MMAP_MAX, 0), ("mallopt", converter._M_TRIM_THRESHOLD, 2**31 - 1)]
    off = [
        ("mallopt", converter._M_MMAP_MAX, converter._DEFAULT_MMAP_MAX),
        ("mallopt", converter._M_TRIM_THRESHOLD, converter._DEFAULT_TRIM_THRESHOLD),
        ("trim", 0),
    ]
    assert seen and all(s == on for s in seen), "set while the blocks convert"
    assert calls == on + off
    calls.clear()

    def fail(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(stream, "convert_layer", fail)
    with pytest.raises(RuntimeError, match="boom"):
        convert(src, 2, out=tmp_path / "out2", method=method)
    assert calls == on + off


def test_fold_works_in_float32_only_on_16_bit_data_free_layers():
    from gqa_convert.methods import fold

    half = {"q.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "o.weight": torch.zeros(4, 4, dtype=torch.float16)}
    assert fold.work_dtype(half, calibrated=False) == torch.float32
    assert fold.work_dtype(half, calibrated=True) == torch.float64  # whitening magnifies rounding
    assert fold.work_dtype({**half, "k.bias": torch.zeros(4)}, calibrated=False) == torch.float64


def _bilinear_errors(t: dict, out: dict, H: int, G: int, hd: int) -> tuple[float, float]:
    """Relative errors of every head's O.V and Q'K products (biases as a last input column):
    what attention computes from the weights, whatever basis a fit chose for the shared head."""

    def aug(d, p, rows):
        w = d[f"{p}.weight"][rows].double()
        return torch.cat([w, d[f"{p}.bias"][rows].double()[:, None]], 1) if f"{p}.bias" in d else w

    ev = nv = ek = nk = 0.0
    for h in range(H):
        rows, shared = slice(h * hd, (h + 1) * hd), slice((h // (H // G)) * hd, (h // (H // G) + 1) * hd)
        ov = t["o.weight"][:, rows].double() @ aug(t, "v", rows)
        ov2 = out["o.weight"][:, rows].double() @ aug(out, "v", shared)
        qk, qk2 = aug(t, "q", rows).T @ aug(t, "k", rows), aug(out, "q", rows).T @ aug(out, "k", shared)
        ev, nv = ev + float((ov - ov2).square().sum()), nv + float(ov.square().sum())
        ek, nk = ek + float((qk - qk2).square().sum()), nk + float(qk.square().sum())
    return ev / nv, ek / nk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, rotary, biased", [(96, 16, False), (96, 8, True), (24, 16, False)])
@pytest.mark.parametrize("G", [1, 2])
def test_float32_work_fits_a_16_bit_layer_as_well_as_float64(monkeypatch, dtype, d, rotary, biased, G):
    """The float32 path (16-bit weights) gives the same fit as float64 math to ~1e-4, well under
    what storing the result in 16 bits moves: whole and partial rotary heads, biases, stacks
    wider (d = 96) and taller (d = 24) than a group's rows. Fails if any step of keys() or
    values() lost precision or mixed dtypes in the float32 path."""
    from gqa_convert.architectures.rope import rope_layout
    from gqa_convert.methods import fold

    H, hd = 8, 16
    g = torch.Generator().manual_seed(3)
    common = torch.randn(hd, d, generator=g)
    t = {p: torch.cat([common + torch.randn(hd, d, generator=g) for _ in range(H)]).to(dtype) for p in "qkv"}
    t = {f"{p}.weight": w for p, w in t.items()}
    t["o.weight"] = torch.randn(d, H * hd, generator=g).to(dtype)
    if biased:
        t.update({f"{p}.bias": torch.randn(H * hd, generator=g).to(dtype) for p in "qkv"})
    rope, groups = rope_layout(hd, rotary, "half"), [list(range(i * H // G, (i + 1) * H // G)) for i in range(G)]
    problem = fold.FoldProblem(dict(t), H, H, hd, None, rope, False)
    assert problem.dtype == torch.float32
    got = _bilinear_errors(t, problem.convert(groups), H, G, hd)
    monkeypatch.setattr(fold, "work_dtype", lambda tensors, calibrated: torch.float64)
    problem = fold.FoldProblem(dict(t), H, H, hd, None, rope, False)
    assert problem.dtype == torch.float64
    want = _bilinear_errors(t, problem.convert(groups), H, G, hd)
    for a, b in zip(got, want, strict=True):
        assert 0.05 < b < 1.0  # a real approximation, not a trivial one
        assert abs(a - b) <= 1e-4 * b, (got, want)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi"])
def test_fold_of_a_bfloat16_checkpoint(tmp_path, model_type):
    """Whole, biased and partial-rotary heads in bfloat16 (the float32 path): exact at G = H to
    bfloat16's rounding, and better than mean pooling at G = 2."""
    src, model = make_checkpoint(tmp_path, model_type, dtype=torch.bfloat16, **FAMILY_EXTRAS[model_type])
    want = logits(load(src, torch.float32))
    convert(src, 4, out=tmp_path / "f4", method="fold")
    # every q/k/v/o row is rewritten and rounded to bfloat16 again: ~0.7% of the logits' spread
    # here, with float32 and float64 math alike (measured), against O(1) for a wrong fold
    rms = (logits(load(tmp_path / "f4", torch.float32)) - want).square().mean().sqrt()
    assert rms < 0.02 * want.std()
    convert(src, 2, out=tmp_path / "f2", method="fold")
    convert(src, 2, out=tmp_path / "m2")
    err_fold = (logits(load(tmp_path / "f2", torch.float32)) - want).square().mean()
    err_mean = (logits(load(tmp_path / "m2", torch.float32)) - want).square().mean()
    assert err_fold < err_mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_with_pruned_and_rank_deficient_output_heads(tmp_path, dtype):
    """A head whose o_proj columns are all zero (pruned) and one with two equal columns make
    W_o'W_o singular (gram_root's fallback for that is tested on its own above): the fold stays
    exact at G = H (to the dtype's rounding), finite at G = 1, and no worse than mean pooling at
    G = 2, in float32 and in bfloat16."""
    model = build_model("llama")
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.o_proj.weight
            w[:, hd : 2 * hd] = 0
            w[:, 2 * hd + 1] = w[:, 2 * hd]
    src = save_model(model.to(dtype), tmp_path / "src")
    want = logits(load(src, torch.float32))
    n_heads = model.config.num_attention_heads
    convert(src, n_heads, out=tmp_path / "fH", method="fold")
    rms = (logits(load(tmp_path / "fH", torch.float32)) - want).square().mean().sqrt()
    assert rms < (0.02 if dtype == torch.bfloat16 else 1e-4) * want.std()
    convert(src, 1, out=tmp_path / "f1", method="fold")
    assert torch.isfinite(logits(load(tmp_path / "f1", torch.float32))).all()
    convert(src, 2, out=tmp_path / "f2", method="fold")
    convert(src, 2, out=tmp_path / "m2")
    err_fold = (logits(load(tmp_path / "f2", torch.float32)) - want).square().mean()
    err_mean = (logits(load(tmp_path / "m2", torch.float32)) - want).square().mean()
    assert err_fold <= err_mean
