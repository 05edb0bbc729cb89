"""batch (good and failing jobs, re-runs, malformed files) and inspect."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILY_EXTRAS, make_checkpoint, shared_path
from typer.testing import CliRunner

from gqa_convert import ConversionError
from gqa_convert.batch import load_config
from gqa_convert.cli import app
from gqa_convert.evaluation import inspect_model

runner = CliRunner()


def test_batch_mixed_jobs_summary_exit_code_and_rerun(tmp_path):
    make_checkpoint(tmp_path, "llama", name="tiny")
    (tmp_path / "jobs.yaml").write_text(
        "defaults:\n  out: out/{name}-g{groups}\n"
        "jobs:\n"
        "  - name: good\n    model: tiny\n    groups: [2, 1]\n"
        "  - name: missing\n    model: no-such-model-dir/x/y\n    groups: 2\n"
        "  - name: bad-groups\n    model: tiny\n    groups: 3\n"
    )
    r = runner.invoke(app, ["batch", str(tmp_path / "jobs.yaml"), "--json"])
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    status = {(x["job"], x["groups"]): x["status"] for x in data["results"]}
    assert status == {("good", 2): "done", ("good", 1): "done", ("missing", 2): "failed", ("bad-groups", 3): "failed"}
    assert data["failed"] == 2
    assert (tmp_path / "out" / "good-g2" / "config.json").is_file()
    assert next(x for x in data["results"] if x["job"] == "good")["kv_saving"] == 0.5
    again = json.loads(runner.invoke(app, ["batch", str(tmp_path / "jobs.yaml"), "--json"]).stdout)
    assert [x["status"] for x in again["results"] if x["job"] == "good"] == ["skipped", "skipped"]


def test_batch_with_verify_threshold(tmp_path):
    src = shared_path("models", "stories260K-mha")
    text = shared_path("data", "tinystories-valid-head64k.txt")
    (tmp_path / "v.yaml").write_text(
        f"jobs:\n  - name: s\n    model: {src}\n    groups: [4, 1]\n    out: o-{{groups}}\n"
        f"    verify:\n      data: {text}\n      separator: '<|endoftext|>'\n      max_tokens: 1024\n"
        f"      seq_len: 256\n      max_ppl_ratio: 2.0\n"
    )
    r = runner.invoke(app, ["batch", str(tmp_path / "v.yaml"), "--json"])
    res = {x["groups"]: x for x in json.loads(r.stdout)["results"]}
    assert res[4]["status"] == "done" and res[4]["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert res[1]["status"] == "failed" and "perplexity ratio" in res[1]["message"]
    assert r.exit_code == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("jobs:\n  - model: m\n    grups: 2\n", "jobs.yaml:3: job 1: unknown field 'grups' (did you mean 'groups'?)"),
        ("jobs:\n  - model: m\n    groups: two\n", "jobs.yaml:3: job 1: field 'groups' must be int|list[int]"),
        ("jobs:\n  - model: m\n    groups: 2\n    method: median\n", "jobs.yaml:4: job 1: unknown method 'median'"),
        ("jobs:\n  - groups: 2\n", "jobs.yaml:2: job 1: missing field 'model'"),
        ("jobs: [\n", "not valid YAML"),
        ("job:\n  - model: m\n", "expected a mapping with a non-empty 'jobs' list"),
        (
            "jobs:\n  - model: m\n    groups: 2\n    verify:\n      dta: x\n",
            "jobs.yaml:5: job 1 verify: unknown field 'dta'",
        ),
    ],
)
def test_malformed_config_rejected_up_front(tmp_path, text, message):
    (tmp_path / "jobs.yaml").write_text(text)
    with pytest.raises(ConversionError) as e:
        load_config(tmp_path / "jobs.yaml")
    assert message in str(e.value)
    r = runner.invoke(app, ["batch", str(tmp_path / "jobs.yaml")])
    assert r.exit_code == 2 and not (tmp_path / "m-mean-g2").exists()


def test_shipped_configs_are_valid():
    from pathlib import Path

    for config in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        assert load_config(config), config


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "phi", "mixtral"])
def test_inspect_tiny_families(tmp_path, model_type):
    src, model = make_checkpoint(tmp_path, model_type, num_attention_heads=4, n_kv=2)
    r = inspect_model(str(src))
    assert r.conversion.startswith("native") and r.n_heads == 4 and r.n_kv_heads == 2
    assert [o.groups for o in r.options] == [1, 2]
    assert r.options[0].kv_saving == 0.5 and r.options[1].kv_saving == 0.0
    assert r.params == sum(
        p.numel()
        for n, p in model.state_dict().items()
        if not (n == "lm_head.weight" and model.config.tie_word_embeddings)
    )
    assert r.options[0].params_removed == model.config.num_hidden_layers * 2 * 8 * 32 + (
        model.config.num_hidden_layers * 2 * 8 if model_type in ("qwen2", "phi") else 0
    )


def test_inspect_shared_and_unsupported(tmp_path):
    r = inspect_model(str(shared_path("models", "stories260K-mha")))
    assert r.n_kv_heads == 8 and [o.groups for o in r.options] == [1, 2, 4, 8]
    assert r.options[0].kv_bytes_per_token == 2 * 5 * 1 * 8 * 4
    res = runner.invoke(app, ["inspect", str(shared_path("models", "ts-mha-8h")), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["head_dim"] == 16
    res = runner.invoke(app, ["inspect", str(shared_path("models", "stories260K"))])
    assert res.exit_code == 0 and "87.5%" not in res.output and "75.0%" in res.output


def test_family_table_covers_fixtures():
    assert set(FAMILY_EXTRAS) <= {
        t for f in __import__("gqa_convert.architectures", fromlist=["FAMILIES"]).FAMILIES for t in f.model_types
    }


def _non_default(name, f):
    """A value of the field's type that differs from its default (and passes its range)."""
    import types
    import typing
    from pathlib import Path

    hint = f.hint
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    kinds = {typing.get_origin(a) or a for a in args}
    if bool in kinds:
        return not f.default
    if int in kinds and not kinds & {str}:
        return (f.default or 1) + 3
    if float in kinds:
        return 0.25 if f.default != 0.25 else 0.5
    if list in kinds or tuple in kinds:
        return [f"{name}-value"]
    if kinds & {str, Path} or any("PathLike" in str(a) for a in args):
        return f"{name}-value"
    raise AssertionError(f"no test value for {name}: {hint}")


@pytest.mark.parametrize("section", ["convert", "verify", "uptrain"])
def test_batch_passes_every_option_through(tmp_path, monkeypatch, section):
    """Every field the library takes is accepted in a batch file and arrives at the library
    with its value: the fields come from the library's signatures, so none can be dropped."""
    import yaml

    import gqa_convert.batch as batch
    from gqa_convert.conversion import ConvertReport

    fields = {"convert": batch.CONVERT_FIELDS, "verify": batch.VERIFY_FIELDS, "uptrain": batch.UPTRAIN_FIELDS}[section]
    special = {"method": "fold", "grouping": "search", "max_shard_size": "7MB", "dtype": "bf16", "reference": "ref"}
    values = {k: special.get(k, _non_default(k, f)) for k, f in fields.items() if k not in ("out",)}
    seen: dict = {}

    def fake_convert(model, g, **kw):
        seen["convert"] = kw
        return ConvertReport(model, str(kw["out"]), "Llama", 1, 4, 4, 2, 8, "mean", 0, {"saving": 0.5}, 0, 0, False)

    def fake_verify(path, **kw):
        seen.setdefault("verify", kw)
        return type("R", (), {"ppl_ratio": 1.0, "passed": True})()

    def fake_uptrain(path, opts):
        seen["uptrain"] = opts

    monkeypatch.setattr(batch, "convert", fake_convert)
    monkeypatch.setattr(batch, "verify", fake_verify)
    monkeypatch.setattr(batch, "uptrain", fake_uptrain)
    job = {"name": "j", "model": "m", "groups": 2}
    if section == "convert":
        job |= values
    else:
        job |= {"verify": {"data": ["eval.txt"]}}
        job[section] = {**job.get(section, {}), **values}
        job.setdefault("uptrain", {"data": ["t.txt"]}) if section == "verify" else None
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump({"jobs": [job]}))
    report = batch.run_batch(tmp_path / "jobs.yaml")
    assert report.failed == 0, report.results[0].message
    got = seen[section]
    for name, value in values.items():
        arrived = getattr(got, name) if section == "uptrain" else got[name]
        if isinstance(arrived, tuple):
            arrived = list(arrived)
        if name == "out":
            continue
        assert str(arrived) == str(value) if name == "out" else arrived == value, (
            f"{section}.{name}: sent {value!r}, the library got {arrived!r}"
        )
    assert len(values) >= {"convert": 12, "verify": 15, "uptrain": 30}[section]
