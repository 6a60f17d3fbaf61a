"""Read an offline W&B run file back (summary and history), without the network.

wandb 0.31 dropped its Python reader; the ``.wandb`` file is a 7-byte header followed by a
LevelDB-style log (32 KiB blocks of checksummed, possibly fragmented records), each record a
``wandb_internal_pb2.Record``. Useful for tests and for inspecting runs that were never synced.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> Iterator[bytes]:
    pos, parts = HEADER, []
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join(parts + [chunk])
            parts = []
        else:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """{"summary": {...}, "history": [{...}, ...]} of one ``offline-run-*`` folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("*.wandb"))
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for raw in _records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            for item in rec.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
    return {"summary": summary, "history": history}
