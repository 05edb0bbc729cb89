"""Converter behaviour beyond the per-family equivalence: formats, sharding, dtypes,
regrouping, what is written beside the weights, determinism."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_model, load, logits, make_checkpoint, pooled_in_place, save_model
from safetensors import safe_open

from gqa_convert import ConversionError, build_plan, convert, open_source
from gqa_convert.manifest import MANIFEST


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out |= {k: s.get_tensor(k) for k in s.keys()}
    return out


def test_regroups_an_already_gqa_model(tmp_path):
    src, model = make_checkpoint(tmp_path, "llama", num_attention_heads=8, hidden_size=64, n_kv=4)
    convert(src, 2, out=tmp_path / "g2")
    out = load(tmp_path / "g2")
    assert out.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(out), logits(pooled_in_place(model, 2)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConversionError, match="more KV heads than the checkpoint has"):
        convert(src, 8, out=tmp_path / "g8")


def test_sharded_output_has_index_and_hf_names(tmp_path):
    src, model = make_checkpoint(tmp_path, "qwen2", max_shard_size="10KB")
    assert len(list(src.glob("*.safetensors"))) > 1, "fixture must be sharded"
    report = convert(src, 2, out=tmp_path / "o", max_shard_size=8000)
    files = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert report.shards == files
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    w = weights(tmp_path / "o")
    assert set(index["weight_map"]) == set(w)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in w.values())
    for f in files:
        with safe_open(tmp_path / "o" / f, "pt") as s:
            assert s.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == f for k in s.keys())
            # a shard exceeds the cap only when it holds a single tensor that is larger
            size = sum(s.get_tensor(k).numel() * s.get_tensor(k).element_size() for k in s.keys())
            assert size <= 8000 or len(list(s.keys())) == 1
    torch.testing.assert_close(logits(load(tmp_path / "o")), logits(pooled_in_place(model, 2)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["bin", "bin-sharded"])
def test_pytorch_bin_input(tmp_path, fmt):
    src, model = make_checkpoint(tmp_path, "llama", fmt=fmt)
    convert(src, 2, out=tmp_path / "o")
    assert not list((tmp_path / "o").glob("*.bin")), "output is safetensors only"
    torch.testing.assert_close(logits(load(tmp_path / "o")), logits(pooled_in_place(model, 2)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype(tmp_path, dtype):
    src, model = make_checkpoint(tmp_path, "llama", dtype=dtype)
    convert(src, 2, out=tmp_path / "o")
    assert {t.dtype for t in weights(tmp_path / "o").values()} == {dtype}
    # pooled in float32, rounded once: equal to the float32 mean cast back
    k_src = weights(src)["model.layers.0.self_attn.k_proj.weight"]
    k_out = weights(tmp_path / "o")["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k_out, k_src.float().reshape(2, 2, 8, 32).mean(1).reshape(16, 32).to(dtype))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tmp_path, tied):
    src, model = make_checkpoint(tmp_path, "llama", tie_word_embeddings=tied)
    convert(src, 2, out=tmp_path / "o")
    assert ("lm_head.weight" in weights(tmp_path / "o")) is (not tied)
    out = load(tmp_path / "o")
    assert (out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()) is tied
    torch.testing.assert_close(logits(out), logits(pooled_in_place(model, 2)), rtol=1e-4, atol=1e-4)


def test_first_and_random_methods(tmp_path):
    src, model = make_checkpoint(tmp_path, "qwen2")
    convert(src, 2, out=tmp_path / "first", method="first")
    torch.testing.assert_close(
        logits(load(tmp_path / "first")), logits(pooled_in_place(model, 2, how="first")), rtol=1e-4, atol=1e-4
    )
    convert(src, 2, out=tmp_path / "r1", method="random", seed=1)
    convert(src, 2, out=tmp_path / "r1b", method="random", seed=1)
    convert(src, 2, out=tmp_path / "r2", method="random", seed=2)
    k = "model.layers.1.self_attn.k_proj.weight"
    w1, w1b, w2 = (weights(tmp_path / d)[k] for d in ("r1", "r1b", "r2"))
    assert torch.equal(w1, w1b) and not torch.equal(w1, w2)
    assert abs(w1.std().item() - 0.3) < 0.05  # the config's initializer_range
    assert weights(tmp_path / "r1")["model.layers.1.self_attn.k_proj.bias"].eq(0).all()


def test_config_files_card_and_manifest(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    (src / "tokenizer.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "custom_code.py").write_text("# custom model code\n")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"stale MHA weights")
    before = json.loads((src / "config.json").read_text())
    convert(src, 2, out=tmp_path / "o", command="gqa-convert src --groups 2")
    out = tmp_path / "o"
    after = json.loads((out / "config.json").read_text())
    assert after.pop("num_key_value_heads") == 2
    before.pop("num_key_value_heads")
    assert after == before, "nothing else in config.json changes"
    for f in ("tokenizer.json", "chat_template.jinja", "custom_code.py", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert not (out / "original").exists(), "stale weight files are not copied"
    m = json.loads((out / MANIFEST).read_text())
    assert m["conversion"]["kv_heads_after"] == 2 and m["conversion"]["method"] == "mean"
    assert m["conversion"]["grouping"] == {"0": [[0, 1], [2, 3]], "1": [[0, 1], [2, 3]]}
    assert m["command"] == "gqa-convert src --groups 2"
    assert set(m["source"]["files"]) == {p.name for p in src.glob("*.safetensors")}
    assert all(len(h) == 64 for h in m["output"]["files"].values())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "GQA-2" in card and "50.0%" in card


def test_output_is_byte_identical_across_runs(tmp_path):
    src, _ = make_checkpoint(tmp_path, "qwen2")
    convert(src, 2, out=tmp_path / "a")
    convert(src, 2, out=tmp_path / "b")
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    ma, mb = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("a", "b"))
    assert ma["output"]["files"] == mb["output"]["files"]


def test_source_untouched_and_dry_run_writes_nothing(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    snapshot = {p: p.read_bytes() for p in src.iterdir()}
    report = convert(src, 1, out=tmp_path / "o", dry_run=True)
    assert report.dry_run and not (tmp_path / "o").exists()
    assert [c["after"] for c in report.attention_changes][:2] == [[8, 32], [8, 32]]
    convert(src, 1, out=tmp_path / "o")
    assert {p: p.read_bytes() for p in src.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src"], "no temporary or lock files left"


def test_default_output_name(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama", name="tiny")
    assert convert(src, 2).output == str(tmp_path / "tiny-gqa2")
    assert convert(src, 1).output == str(tmp_path / "tiny-mqa")


def test_plan_for_70b_shapes_without_weights(tmp_path):
    # A Llama-2-70B layout planned from headers alone: shapes, shard count and KV saving.
    from gqa_convert.io.safetensors_format import TensorInfo
    from gqa_convert.io.source import Source

    cfg = {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "num_hidden_layers": 80,
        "intermediate_size": 28672,
        "vocab_size": 32000,
    }
    f = tmp_path / "model.safetensors"
    tensors, pos = {}, 0

    def add(name, shape):
        nonlocal pos
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        tensors[name] = TensorInfo(name, "BF16", shape, f, pos, pos + n)
        pos += n

    add("model.embed_tokens.weight", (32000, 8192))
    for i in range(80):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            add(p + f"self_attn.{proj}_proj.weight", (8192, 8192))
        add(p + "mlp.gate_proj.weight", (28672, 8192))
        add(p + "mlp.up_proj.weight", (28672, 8192))
        add(p + "mlp.down_proj.weight", (8192, 28672))
        add(p + "input_layernorm.weight", (8192,))
        add(p + "post_attention_layernorm.weight", (8192,))
    add("model.norm.weight", (8192,))
    add("lm_head.weight", (32000, 8192))
    source = Source("llama-70b", tmp_path, cfg, [f], "safetensors", tensors)
    plan = build_plan(source, 8)
    assert plan.kv_bytes_per_token() == 2 * 80 * 64 * 128 * 2
    assert plan.kv_bytes_per_token(8) * 8 == plan.kv_bytes_per_token()
    saved = 80 * 2 * (8192 - 1024) * 8192 * 2
    assert plan.bytes_in - plan.bytes_out == saved
    assert (
        len(plan.shards) == -(-plan.bytes_out // 5_000_000_000)
        or len(plan.shards) == -(-plan.bytes_out // 5_000_000_000) + 1
    )


def test_open_source_reads_headers_only(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    s = open_source(src)
    assert s.format == "safetensors" and len(s.weight_files) > 1
    assert s.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 32)


def test_rejects_fused_or_renamed_layout(tmp_path):
    src, model = make_checkpoint(tmp_path, "llama", fmt="bin")
    sd = torch.load(src / "pytorch_model.bin")
    sd = {k.replace("k_proj", "key"): v for k, v in sd.items()}
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="does not match the Llama family"):
        convert(src, 2, out=tmp_path / "o")


def test_bad_shape_against_config(tmp_path):
    model = build_model("llama")
    src = save_model(model, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_key_value_heads"] = 2  # the weights have 4 KV heads
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="disagrees with config.json"):
        convert(src, 1, out=tmp_path / "o")


def test_hub_cache_blob_is_not_hashed_again_and_its_name_is_recorded(tmp_path):
    """A snapshot file that links to blobs/<sha256> is recorded under that hash without being
    hashed again; a plain file next to it is hashed. The weights are the same either way."""
    src = make_checkpoint(tmp_path, "llama")[0]
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.write_bytes(f.read_bytes())
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            (snapshot / f.name).write_bytes(f.read_bytes())
    convert(snapshot, 2, out=tmp_path / "from-cache")
    convert(src, 2, out=tmp_path / "plain")
    a = json.loads((tmp_path / "from-cache" / "gqa_convert.json").read_text())
    b = json.loads((tmp_path / "plain" / "gqa_convert.json").read_text())
    assert a["source"]["files"] == b["source"]["files"]  # the blob's name is the true hash
    assert a["output"]["files"] == b["output"]["files"]
    # a blob whose name is not its content's hash is recorded by that name: the name is trusted
    f = next(snapshot.glob("*.safetensors"))
    fake = blobs / ("0" * 64)
    fake.write_bytes(f.resolve().read_bytes())
    f.unlink()
    f.symlink_to(os.path.relpath(fake, snapshot))
    convert(snapshot, 2, out=tmp_path / "fake")
    c = json.loads((tmp_path / "fake" / "gqa_convert.json").read_text())
    assert c["source"]["files"][f.name] == "0" * 64


@pytest.mark.parametrize("chunk", [4096, 4096 * 7 + 8])
def test_reused_read_buffers_keep_every_hash_and_byte_right(tmp_path, monkeypatch, chunk):
    """With chunks far smaller than the tensors, the reader's ring of reused buffers is
    overwritten hundreds of times while hash updates are queued on it: the recorded SHA-256
    of every source and output file must still be the file's, and the weights those of a
    run with one chunk per tensor."""
    import gqa_convert.io.reader as reader

    src = make_checkpoint(tmp_path, "llama")[0]
    convert(src, 2, out=tmp_path / "big-chunks")
    monkeypatch.setattr(reader, "CHUNK", chunk)
    convert(src, 2, out=tmp_path / "small-chunks")
    m = json.loads((tmp_path / "small-chunks" / "gqa_convert.json").read_text())
    for name, digest in m["source"]["files"].items():
        assert digest == hashlib.sha256((src / name).read_bytes()).hexdigest()
    for name, digest in m["output"]["files"].items():
        data = (tmp_path / "small-chunks" / name).read_bytes()
        assert digest == hashlib.sha256(data).hexdigest()
        assert data == (tmp_path / "big-chunks" / name).read_bytes()


def _direct_works_here(path: Path) -> bool:
    from gqa_convert.io.writer import DirectFile

    try:
        fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        return DirectFile.probe(fd)
    finally:
        os.close(fd)
        os.unlink(path / "probe")


def _sha_files_agree(out: Path) -> dict[str, bytes]:
    m = json.loads((out / "gqa_convert.json").read_text())
    data = {name: (out / name).read_bytes() for name in m["output"]["files"]}
    for name, digest in m["output"]["files"].items():
        assert digest == hashlib.sha256(data[name]).hexdigest()
    return data


@pytest.mark.parametrize("stage", [4096, 4096 * 3])
def test_direct_writes_equal_buffered_writes_byte_for_byte(tmp_path, monkeypatch, stage):
    """Shards written through O_DIRECT staging buffers (tiny here, so every tensor spans many
    buffer switches, and each shard ends in a padded, truncated tail) are byte-identical to
    buffered writes, and the manifest's SHA-256 is each written file's."""
    import gqa_convert.io.writer as writer

    src = make_checkpoint(tmp_path, "llama")[0]
    made = []
    real_init = writer.DirectFile.__init__

    def spy(self, fd, *args):
        made.append(fd)
        real_init(self, fd, *args)

    monkeypatch.setattr(writer, "STAGE", stage)
    monkeypatch.setattr(writer.DirectFile, "__init__", spy)
    convert(src, 2, out=tmp_path / "direct", max_shard_size="40KB")
    if _direct_works_here(tmp_path):
        assert len(made) == len(list((tmp_path / "direct").glob("*.safetensors"))) > 1
    monkeypatch.setattr(writer.DirectFile, "probe", staticmethod(lambda fd: False))
    convert(src, 2, out=tmp_path / "buffered", max_shard_size="40KB")
    assert _sha_files_agree(tmp_path / "direct") == _sha_files_agree(tmp_path / "buffered")


def test_a_staging_buffer_is_refilled_only_after_its_bytes_are_hashed(tmp_path, monkeypatch):
    """Untouched bytes are read straight into the writer's staging buffers and hashed from
    there (source and output digests). With hashing slowed down and 4 KB buffers, a buffer
    refilled before its hash updates ran would give digests of other bytes: the manifest's
    SHA-256 must still be each written file's, and the source's its own."""
    import time

    import gqa_convert.io.hashing as hashing
    import gqa_convert.io.writer as writer

    src = make_checkpoint(tmp_path, "llama")[0]
    real_sha256 = hashlib.sha256

    class Slow:
        def __init__(self) -> None:
            self.h = real_sha256()

        def update(self, data) -> None:
            time.sleep(0.002)
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(writer, "STAGE", 4096)
    monkeypatch.setattr(hashing.hashlib, "sha256", Slow)
    convert(src, 2, out=tmp_path / "out", max_shard_size="40KB")
    monkeypatch.undo()
    _sha_files_agree(tmp_path / "out")
    m = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    for name, digest in m["source"]["files"].items():
        assert digest == hashlib.sha256((src / name).read_bytes()).hexdigest()


def test_o_direct_refused_at_open_falls_back_to_buffered(tmp_path, monkeypatch):
    import gqa_convert.io.writer as writer

    src = make_checkpoint(tmp_path, "llama")[0]
    convert(src, 2, out=tmp_path / "a")
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(writer.os, "open", no_direct)
    convert(src, 2, out=tmp_path / "b")
    assert _sha_files_agree(tmp_path / "a") == _sha_files_agree(tmp_path / "b")


def test_o_direct_refused_mid_file_falls_back_to_buffered(tmp_path, monkeypatch):
    """Direct writes refused (EINVAL) from the fourth on, as a file-size limit or a filesystem
    can do mid-file: the refused write and everything after it are written buffered, and the
    shards equal a buffered conversion's."""
    import fcntl
    import threading

    import gqa_convert.io.writer as writer

    src = make_checkpoint(tmp_path, "llama")[0]
    if not _direct_works_here(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open: no direct writes to refuse later")
    convert(src, 2, out=tmp_path / "buffered", max_shard_size="40KB")
    monkeypatch.setattr(writer, "STAGE", 4096)
    real_pwrite = os.pwrite
    calls, lock, refused = [], threading.Lock(), []

    def refusing(fd, data, offset):
        with lock:
            calls.append(offset)
            late = len(calls) > 4  # the probe, then three direct writes
        if late and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", refusing)
    convert(src, 2, out=tmp_path / "direct", max_shard_size="40KB")
    assert refused
    assert _sha_files_agree(tmp_path / "direct") == _sha_files_agree(tmp_path / "buffered")


def test_a_failed_background_write_fails_the_conversion_cleanly(tmp_path, monkeypatch):
    """A write error on the writer thread (here ENOSPC on the third direct write) reaches
    the user as the one-line error, with no target and no temporary directory left."""
    import gqa_convert.io.writer as writer

    src = make_checkpoint(tmp_path, "llama")[0]
    if not _direct_works_here(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: nothing is written on a thread")
    monkeypatch.setattr(writer, "STAGE", 4096)
    real_pwrite = os.pwrite
    calls = []

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 4:  # the probe, then two writes, then the disk is full
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", failing)
    with pytest.raises(ConversionError, match="space"):
        convert(src, 2, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _force_residency(monkeypatch, cached: bool) -> list[int]:
    """Make every piece of the source look cached (buffered reads) or not (direct reads);
    returns a list that collects each finished reader's count of bytes read directly."""
    import gqa_convert.io.reader as reader

    direct: list[int] = []
    real_close = reader.SequentialReader.close

    def close(self):
        if self._fd >= 0:
            direct.append(self.direct_bytes)
        real_close(self)

    monkeypatch.setattr(reader._Residency, "cached", lambda self, begin, end: cached)
    monkeypatch.setattr(reader.SequentialReader, "close", close)
    return direct


@pytest.mark.parametrize("chunk", [4096 * 3 + 100, 1 << 20])
def test_direct_reads_equal_buffered_reads_byte_for_byte(tmp_path, monkeypatch, chunk):
    """Source pieces read with O_DIRECT (whole aligned blocks around each piece, into the ring
    and into each attention tensor's own buffer; a small chunk makes every tensor span many
    reads) give the same output bytes and the same source and output SHA-256 as buffered
    reads, and every byte of the source was read directly where the filesystem allows it."""
    import gqa_convert.io.reader as reader

    monkeypatch.setattr(reader, "CHUNK", chunk)
    src = make_checkpoint(tmp_path, "llama")[0]
    _force_residency(monkeypatch, True)
    convert(src, 2, out=tmp_path / "buffered", max_shard_size="40KB")
    direct = _force_residency(monkeypatch, False)
    convert(src, 2, out=tmp_path / "direct", max_shard_size="40KB")
    assert _sha_files_agree(tmp_path / "direct") == _sha_files_agree(tmp_path / "buffered")
    m = json.loads((tmp_path / "direct" / "gqa_convert.json").read_text())
    weights = sorted(src.glob("*.safetensors"))
    for p in weights:
        assert m["source"]["files"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    if _direct_works_here(src):
        assert sum(direct) == sum(p.stat().st_size for p in weights) > 0


@pytest.mark.parametrize("pattern", ["alternate", "all-direct"])
def test_read_ahead_gives_the_same_bytes_with_reused_slots(tmp_path, monkeypatch, pattern):
    """The read-ahead thread with tiny blocks and two slots (every slot read into many times,
    pieces that straddle blocks), where blocks alternate between cached and direct or are all
    direct: output bytes and both SHA-256 equal those of buffered reads, and no read-ahead
    thread outlives the conversion."""
    import threading

    import gqa_convert.io.reader as reader

    monkeypatch.setattr(reader, "CHUNK", 4096 * 3 + 100)
    src = make_checkpoint(tmp_path, "llama")[0]
    _force_residency(monkeypatch, True)
    convert(src, 2, out=tmp_path / "buffered", max_shard_size="40KB")
    direct = _force_residency(monkeypatch, False)
    monkeypatch.setattr(reader, "AHEAD_BLOCK", 2 * 4096)
    monkeypatch.setattr(reader, "AHEAD_SLOTS", 2)
    if pattern == "alternate":  # the first piece is uncached (so the read-ahead starts), then block by block
        monkeypatch.setattr(
            reader._Residency, "cached", lambda self, begin, end: begin > 0 and (begin // (2 * 4096)) % 2 == 1
        )
    convert(src, 2, out=tmp_path / "ahead", max_shard_size="40KB")
    assert _sha_files_agree(tmp_path / "ahead") == _sha_files_agree(tmp_path / "buffered")
    m = json.loads((tmp_path / "ahead" / "gqa_convert.json").read_text())
    weights = sorted(src.glob("*.safetensors"))
    for p in weights:
        assert m["source"]["files"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    if _direct_works_here(src):
        total = sum(p.stat().st_size for p in weights)
        assert (0 < sum(direct) < total) if pattern == "alternate" else (sum(direct) == total)
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_read_ahead_refused_mid_file_falls_back_to_buffered(tmp_path, monkeypatch):
    """O_DIRECT refused (EINVAL) for a block after the first: the rest is read buffered, with
    the same bytes and digests; an I/O error on the read-ahead thread, or on a buffered read,
    reaches the user as an error that names the source file."""
    import errno

    import gqa_convert.io.reader as reader
    from gqa_convert.io.hashing import Hashes

    src = make_checkpoint(tmp_path, "llama")[0]
    if not _direct_works_here(src):
        pytest.skip("O_DIRECT is refused on this filesystem")
    _force_residency(monkeypatch, True)
    convert(src, 2, out=tmp_path / "buffered", max_shard_size="40KB")
    _force_residency(monkeypatch, False)
    monkeypatch.setattr(reader, "AHEAD_BLOCK", 2 * 4096)
    real = reader._ReadAhead._pread_direct
    fail = {"errno": errno.EINVAL}

    def pread(self, view, offset):
        if offset >= 2 * 4096:  # a read-ahead block past the first
            raise OSError(fail["errno"], os.strerror(fail["errno"]))
        return real(self, view, offset)

    monkeypatch.setattr(reader._ReadAhead, "_pread_direct", pread)
    convert(src, 2, out=tmp_path / "refused", max_shard_size="40KB")
    assert _sha_files_agree(tmp_path / "refused") == _sha_files_agree(tmp_path / "buffered")

    fail["errno"] = errno.EIO
    weights = sorted(src.glob("*.safetensors"))
    with Hashes() as h:
        r = reader.SequentialReader(weights[0], h)
        with pytest.raises(ConversionError, match=f"{weights[0].name}: reading failed"):
            r.read_into_new(0, weights[0].stat().st_size)
        r.close()
    with pytest.raises(ConversionError, match="reading failed"):
        convert(src, 2, out=tmp_path / "eio", max_shard_size="40KB")
    assert not (tmp_path / "eio").exists()

    _force_residency(monkeypatch, True)  # buffered reads only: an error there names the file too
    monkeypatch.setattr(
        reader.SequentialReader,
        "_pread_all",
        staticmethod(lambda fd, v, o: (_ for _ in ()).throw(OSError(errno.EIO, "EIO"))),
    )
    with Hashes() as h:
        r = reader.SequentialReader(weights[0], h)
        with pytest.raises(ConversionError, match="reading failed"):
            r.read_into_new(0, 4096)
        r.close()


@pytest.mark.parametrize("grow", [4096, 8192 + 5, 3 * 4096 * 16])
def test_a_source_that_grows_while_read_ahead_is_hashed_whole(tmp_path, monkeypatch, grow):
    """A source file appended to after the read-ahead read its last block (sized when the file
    was opened) still converts: the bytes past that size come from a buffered read, and the
    digest is that of the whole grown file."""
    import gqa_convert.io.reader as reader
    from gqa_convert.io.hashing import Hashes

    _force_residency(monkeypatch, False)
    monkeypatch.setattr(reader, "AHEAD_BLOCK", 4 * 4096)
    p = tmp_path / "w.bin"
    p.write_bytes(os.urandom(7 * 4 * 4096 + 7))
    with Hashes() as h:
        r = reader.SequentialReader(p, h)
        r.read_into_new(0, 4096)  # starts the read-ahead
        with open(p, "ab") as f:
            f.write(os.urandom(grow))
        digest = r.finish()
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_piece_spanning_more_blocks_than_slots_reads_whole_and_the_thread_ends(tmp_path, monkeypatch):
    """One read that spans more read-ahead blocks than there are slots (CI once hung here: the
    consumer waited for a block the thread would read only after a release) reads every byte;
    asking for a block the slots cannot hold yet fails at once instead of waiting; closing a
    reader abandoned mid-file ends its thread."""
    import gqa_convert.io.reader as reader
    from gqa_convert.io.hashing import Hashes

    direct = _force_residency(monkeypatch, False)
    monkeypatch.setattr(reader, "AHEAD_BLOCK", 4096)
    monkeypatch.setattr(reader, "AHEAD_SLOTS", 2)
    p = tmp_path / "w.bin"
    data = os.urandom(9 * 4096 + 11)
    p.write_bytes(data)
    with Hashes() as h:
        r = reader.SequentialReader(p, h)
        assert bytes(r.read_into_new(0, len(data))) == data
        assert r.finish() == hashlib.sha256(data).hexdigest()
    if not direct or not direct[-1]:
        pytest.skip("no O_DIRECT reads on this filesystem")
    with Hashes() as h:
        r = reader.SequentialReader(p, h)
        r.read_into_new(0, 100)
        ahead = r._ahead
        with pytest.raises(RuntimeError, match="before block 0 was released"):
            ahead.block(5)
        thread = ahead._thread
        r.close()  # abandoned mid-file
        assert not thread.is_alive()


def test_a_source_replaced_by_a_fifo_or_a_device_is_refused(tmp_path):
    """The reader opens without blocking and refuses anything but a regular file (a FIFO put
    in a shard's place after the checks would hang the open; /dev/zero would never end)."""
    from gqa_convert.io.hashing import Hashes
    from gqa_convert.io.reader import SequentialReader

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    dev = tmp_path / "zero.safetensors"
    dev.symlink_to("/dev/zero")
    with Hashes() as h:
        for p in (fifo, dev):
            with pytest.raises(ConversionError, match="no longer a regular file"):
                SequentialReader(p, h)


@pytest.mark.parametrize("cached", [True, False])
def test_a_source_that_shrinks_while_read_is_a_clear_error(tmp_path, monkeypatch, cached):
    from gqa_convert.errors import ConversionError
    from gqa_convert.io.hashing import Hashes
    from gqa_convert.io.reader import SequentialReader

    _force_residency(monkeypatch, cached)
    p = tmp_path / "w.safetensors"
    p.write_bytes(os.urandom(5 * 4096 + 7))
    with Hashes() as h:
        r = SequentialReader(p, h)
        os.truncate(p, 4096 + 3)
        with pytest.raises(ConversionError, match="ended early"):
            r.read_into_new(100, 5 * 4096)
        r.close()


def test_residency_sees_what_the_page_cache_holds(tmp_path):
    """mincore on an untouched mapping: a file evicted from the cache reads as not cached
    (where eviction works here), and as cached once it has been read."""
    from gqa_convert.io.reader import _Residency

    p = tmp_path / "w.bin"
    p.write_bytes(os.urandom(64 * 4096))
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        res = _Residency(fd, 64 * 4096)
        if _direct_works_here(tmp_path):  # a disk filesystem (tmpfs keeps its pages: nothing to evict)
            assert res.cached(0, 64 * 4096) is False
        os.pread(fd, 64 * 4096, 0)
        assert res.cached(4096 + 5, 9 * 4096) is True
        res.close()
    finally:
        os.close(fd)
