"""The writer process of ``CheckpointManager(writer="process")``: ``python -m ckptkit.manager.writer_process FD
NICE``. It maps the snapshot arenas the parent hands it over the socket ``FD``, commits each save it is sent
(the same :func:`~ckptkit.engine.commit.commit_captured` as a synchronous save: pending record, objects, fsync,
manifest last) and answers with the manifest, or with the error it raised. Exits when the socket closes."""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from typing import Any

from ckptkit.manager.writer import lower_process_priority, recv_message, send_message

__all__: list[str] = []


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _child_main(fd: int, nice: int) -> None:
    """The writer process: commit what the parent sends, one save at a time, until the socket closes."""
    import mmap

    import torch

    from ckptkit.engine.commit import commit_captured
    from ckptkit.manager.snapshot import arena_view
    from ckptkit.schema import DataSegment, Lineage, Progress, dump_manifest
    from ckptkit.state import Captured
    from ckptkit.storage import Repository
    from ckptkit.storage.backend import in_background

    lower_process_priority(nice)
    torch.set_num_threads(1)
    sock = socket.socket(fileno=fd)
    base: torch.Tensor | None = None
    repos: dict[tuple[str, bool | None], Repository] = {}
    while (msg := recv_message(sock)) is not None:
        if msg["op"] == "arena":
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            try:
                mm = mmap.mmap(fds[0], max(msg["size"], 1))
            finally:
                os.close(fds[0])
            base = torch.frombuffer(mm, dtype=torch.uint8)
            continue
        try:
            assert base is not None, "a commit before its arena"
            where = (msg["url"], msg["direct_io"])  # the parent's repository's options, as it has them now
            if where not in repos:
                repos[where] = Repository(msg["url"], direct_io=msg["direct_io"])
            repo = repos[where]
            captured = [
                Captured(name=c["name"], kind=c["kind"], type=c["type"], json=c["json"], classes=c["classes"],
                         aliases=c["aliases"], adapter=c["adapter"], meta=c["meta"],
                         tensors={k: arena_view(base, off, getattr(torch, dt), shape)
                                  for k, (off, dt, shape) in c["tensors"].items()})
                for c in msg["components"]
            ]  # fmt: skip
            with in_background():  # an async save: no one waits on its wall time
                manifest = commit_captured(
                    repo, captured, msg["name"], object_size=msg["object_size"], metrics=msg["metrics"],
                    hparams=msg["hparams"],
                    progress=None if msg.get("progress") is None else Progress.model_validate(msg["progress"]),
                    data=None if msg.get("data") is None else [DataSegment.model_validate(d) for d in msg["data"]],
                    lineage=None if msg.get("lineage") is None else Lineage.model_validate(msg["lineage"]),
                )  # fmt: skip
            reply: dict[str, Any] = {"ok": True, "manifest": dump_manifest(manifest).decode()}
        except Exception as err:
            cls = type(err)
            reply = {"ok": False, "type": f"{cls.__module__}.{cls.__qualname__}", "message": str(err),
                     "args": [_json_safe(a) for a in err.args],
                     "attrs": {k: _json_safe(v) for k, v in vars(err).items()},
                     "traceback": "".join(traceback.format_exception(err))}  # fmt: skip
        send_message(sock, reply)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
