"""Streaming the weights: the source is read front to back once; untouched tensors go
straight into their output shard and each attention block is converted as soon as its
last tensor has been read. Peak memory is about one block's attention tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.hashing import Hashes, sha256_file
from ..io.reader import SequentialReader
from ..io.safetensors_format import tensor_bytes, tensor_from_buffer
from ..io.writer import ShardWriter
from .layer import convert_layer
from .plan import ConversionPlan, source_order

LayerFn = Callable[[ConversionPlan, int, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[list[int]]]]


@dataclass
class StreamResult:
    """What streaming the weights produced: SHA-256 of every source file and output shard
    ("out/<name>"), and the KV heads of each group, per block."""

    digests: dict[str, str]
    groupings: dict[int, list[list[int]]] = field(default_factory=dict)


def write_weights(
    plan: ConversionPlan,
    tmp: Path,
    hashes: Hashes,
    on_bytes: Callable[[int], None] = lambda n: None,
    moments: dict[int, torch.Tensor] | None = None,
    convert_block: LayerFn | None = None,
) -> StreamResult:
    """Stream every output tensor into its shard. `convert_block(plan, layer, tensors)` replaces
    the plan's method for a block when given (refinement supplies converted blocks this way)."""
    source = plan.source
    member_of = {n: lp for lp in plan.layers for n in lp.input_names}
    writer = ShardWriter(tmp, [list(s) for s in plan.shards], hashes, on_bytes=on_bytes)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    result = StreamResult({})
    reader: SequentialReader | None = None

    def reader_for(name: str) -> SequentialReader:
        nonlocal reader
        path = source.tensors[name].path
        if reader is None or reader.path != path:
            if reader is not None:
                result.digests[reader.path.name] = reader.finish()
            reader = SequentialReader(path, hashes)
        return reader

    def read_bytes(name: str) -> Iterator[bytes | memoryview]:
        if source.format != "safetensors":
            yield tensor_bytes(source.read(name))
            return
        info = source.tensors[name]
        yield from reader_for(name).chunks(info.begin, info.end)

    def read_tensor(name: str) -> torch.Tensor:
        if source.format != "safetensors":
            return source.read(name)
        info = source.tensors[name]
        return tensor_from_buffer(reader_for(name).read_into_new(info.begin, info.end), info.dtype, info.shape)

    try:
        for name in source_order(source):
            lp = member_of.get(name)
            if name in plan.dropped:
                for _ in read_bytes(name):  # still read, so the source file's hash covers it
                    pass
            elif lp is None and name in plan.transpose_copies:  # Conv1D -> Linear for a sibling architecture
                writer.write(name, [tensor_bytes(read_tensor(name).T.contiguous())])
            elif lp is None and source.format == "safetensors":  # untouched: read where they are written from
                info = source.tensors[name]
                writer.write_read(name, info.end - info.begin, reader_for(name).into(info.begin))
            elif lp is None:
                writer.write(name, read_bytes(name))
            else:
                pending.setdefault(lp.layer, {})[name] = read_tensor(name)
                if name in plan.emit_after:
                    tensors = pending.pop(lp.layer)
                    if convert_block is not None:
                        out, groups = convert_block(plan, lp.layer, tensors)
                    else:
                        out, groups = convert_layer(plan, lp, tensors, (moments or {}).get(lp.layer))
                    result.groupings[lp.layer] = groups
                    for out_name, t in out.items():
                        writer.write(out_name, [tensor_bytes(t)])
        if reader is not None:
            result.digests[reader.path.name] = reader.finish()
        for path in source.weight_files:  # .bin sources, and files that held no tensor
            if path.name not in result.digests:
                result.digests[path.name] = sha256_file(path)
        out_digests = writer.close()
    except BaseException:
        writer.abort()
        if reader is not None:
            reader.close()
        raise
    result.digests |= {"out/" + k: v for k, v in out_digests.items()}
    return result
