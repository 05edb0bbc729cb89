"""The pure tensor math, on tensors small enough to check by hand."""

from __future__ import annotations

import pytest
import torch

from gqa_convert.methods.pooling import first_heads, pool_heads, random_heads


def heads(n: int, rows: int = 2, cols: int = 3) -> torch.Tensor:
    # head h is filled with the value h, so group means are easy to read
    return torch.arange(n, dtype=torch.float32).repeat_interleave(rows)[:, None].expand(n * rows, cols).contiguous()


def test_mean_pools_contiguous_groups():
    out = pool_heads(heads(4), 4, 2)  # groups {0,1} and {2,3}
    assert out.shape == (4, 3)
    assert out[:2].eq(0.5).all() and out[2:].eq(2.5).all()


def test_mqa_and_identity():
    assert pool_heads(heads(4), 4, 1).eq(1.5).all()
    w = torch.randn(8, 5)
    assert torch.equal(pool_heads(w, 4, 4), w)


def test_bias_vectors_pool_too():
    b = torch.tensor([0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0])  # 4 heads x 2 rows
    assert pool_heads(b, 4, 2).tolist() == [1.0, 1.0, 5.0, 5.0]


def test_pools_in_float32_and_keeps_dtype():
    # a bf16 running sum loses the small heads (300 + 1 + 1 + 1 stays 300 in bf16);
    # pooling must sum in float32 and round once at the end
    w = torch.tensor([[300.0], [1.0], [1.0], [1.0]], dtype=torch.bfloat16)
    out = pool_heads(w, 4, 1)
    assert out.dtype == torch.bfloat16
    assert out.item() == torch.tensor(75.75).to(torch.bfloat16).item()
    assert pool_heads(torch.ones(4, 2, dtype=torch.float16), 2, 1).dtype == torch.float16


def test_first_heads():
    assert first_heads(heads(4), 4, 2)[:2].eq(0).all()
    assert first_heads(heads(4), 4, 2)[2:].eq(2).all()


def test_random_heads_seeded_by_name():
    w = torch.zeros(8, 16)
    a = random_heads(w, 4, 2, std=0.02, seed=1, name="k")
    assert a.shape == (4, 16)
    assert torch.equal(a, random_heads(w, 4, 2, std=0.02, seed=1, name="k"))
    assert not torch.equal(a, random_heads(w, 4, 2, std=0.02, seed=2, name="k"))
    assert not torch.equal(a, random_heads(w, 4, 2, std=0.02, seed=1, name="v"))
    assert random_heads(w, 4, 2, std=0.02, seed=1, name="b", fill=0.0).eq(0).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        pool_heads(torch.zeros(6, 2), 4, 2)
    with pytest.raises(ValueError):
        pool_heads(torch.zeros(8, 2), 4, 3)


def test_meta_device_shapes_70b():
    # Llama-2-70B's K projection: 64 heads x 128 rows, hidden 8192 — no memory on 'meta'
    k = torch.empty(64 * 128, 8192, device="meta", dtype=torch.bfloat16)
    assert pool_heads(k, 64, 8).shape == (8 * 128, 8192)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_agrees_with_isfinite(dtype, bad):
    from gqa_convert.conversion.layer import all_finite

    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        w[17, 3] = bad
    w = w.to(dtype)
    assert all_finite(w) == bool(torch.isfinite(w).all()) == (bad is None)
