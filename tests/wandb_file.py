"""Read back what an offline W&B run holds, from its own file: wandb ships no Python reader of `run-*.wandb`, which
is a 7-byte W&B header, then LevelDB-log records in 32 KiB blocks, each payload a
`wandb.proto.wandb_internal_pb2.Record` (history rows, summary updates, the run's ids, files, artifacts...)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7  # b":W&B", a 2-byte magic and a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> Iterator[bytes]:
    """The records of a LevelDB log (each: crc32c 4 bytes, length 2, type 1, then the chunk), reassembled."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What one offline run recorded: its ids, its history rows, its summary as W&B keeps it (the last update of
    each key wins), its config and the names of the files and artifacts it logged."""

    run_id: str = ""
    sweep_id: str = ""
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # its exit record is written: wandb's writer (a separate process) is done with it

    @classmethod
    def read(cls, path: Path) -> WandbRun:
        from wandb.proto import wandb_internal_pb2

        run = cls()
        for raw in payloads(Path(path).read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.run_id, run.sweep_id, run.project, run.group = r.run_id, r.sweep_id, r.project, r.run_group
                run.tags = list(r.tags)
                run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif kind == "config":
                run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "files":
                run.files += [f.path for f in record.files.files]
            elif kind == "exit":
                run.finished = True
            elif kind == "artifact":
                run.artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                                      "files": [m.path for m in record.artifact.manifest.contents]})
        return run


def offline_runs(folder: Path, timeout: float = 120.0) -> list[WandbRun]:
    """Every offline run below `folder` (a run folder's wandb/ holds one per run), once each holds its exit record:
    `run.finish()` returns before wandb's writer process has written the file out (seen under load: a run file
    read at once held no run record yet), so this waits for that event, up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [WandbRun.read(p) for p in sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))]
        if all(r.finished for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)
