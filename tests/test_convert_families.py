"""For every supported family: G = H is exact, and G < H equals the pooled-in-place reference."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_EXTRAS, load, logits, make_checkpoint, pooled_in_place

from gqa_convert import convert


@pytest.mark.parametrize("model_type", sorted(FAMILY_EXTRAS))
def test_family_round_trip_and_pooling(tmp_path, model_type):
    src, model = make_checkpoint(tmp_path, model_type)
    expected = logits(model)

    same = convert(src, 4, out=tmp_path / "g4")
    assert torch.equal(logits(load(tmp_path / "g4")), expected), "G = H must reproduce the source exactly"

    for g in (2, 1):
        convert(src, g, out=tmp_path / f"g{g}")
        converted = load(tmp_path / f"g{g}")
        assert converted.config.num_key_value_heads == g
        want = logits(pooled_in_place(model, g))
        torch.testing.assert_close(logits(converted), want, rtol=1e-4, atol=1e-4)
        # and the conversion really changed something (the test could fail)
        assert not torch.allclose(want, expected, atol=1e-3)
    assert same.kv_heads_after == 4
