"""`gqa-convert demo --quick` end to end, in a private cache."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gqa_convert.cli import app


def test_demo_quick_end_to_end(tmp_path):
    args = ["demo", "--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["trained"] is True
    rows = {(row["method"], row["groups"]): row for row in data["rows"]}
    assert set(rows) == {(m, g) for m in ("mean", "first", "random", "fold") for g in (4, 1)}
    # heads carry structure: pooling loses something, and random heads lose more than mean pooling
    assert rows[("mean", 1)]["ppl_ratio"] > 1.05
    assert rows[("random", 1)]["ppl_ratio"] > rows[("mean", 1)]["ppl_ratio"]
    assert rows[("mean", 1)]["kv_saving"] == 0.875
    assert rows[("fold", 1)]["ppl_ratio"] < rows[("mean", 1)]["ppl_ratio"]
    assert data["uptrained"]["ppl_ratio_after"] < data["uptrained"]["ppl_ratio_before"]
    assert (tmp_path / "out" / "demo.png").stat().st_size > 1000
    # a second run uses the cached model
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["trained"] is False
