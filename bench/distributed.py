"""Sharded save/restore throughput of ckptkit.distributed against DCP's own FileSystemWriter, and dedup of a
mostly frozen sharded model.

Usage::

    python bench/distributed.py                      # ~1 GiB FSDP2-sharded state on 2 gloo ranks, median of 5
    python bench/distributed.py --json               # the same, as one JSON object on stdout
    python bench/distributed.py --size-mib 8 --runs 1   # quick smoke run

What is measured (2 ranks forked by this process after importing torch, gloo on 127.0.0.1, CPU, local disk under
``--dir``; each rank holds half of every weight, as ``fully_shard`` splits it):

* save: ``ckptkit.distributed.save`` into a fresh repository (every shard packed, hashed with blake3 and written
  as a content-addressed object, fsync'd; the manifest committed by rank 0) against
  ``torch.distributed.checkpoint.save`` with a ``FileSystemWriter`` (one file per rank, fsync'd, pickled
  metadata), both from the same ``get_model_state_dict``. Ratio: throughput, ckptkit / DCP.
* restore: ``ckptkit.distributed.load`` (every object hash-verified) against ``dcp.load`` with a
  ``FileSystemReader`` + ``set_model_state_dict``, both from the page cache. Ratio: time, ckptkit / DCP.
* dedup: a model of 10 equal layers, 9 frozen, saved; the 10th changed; saved again: the bytes the second save
  wrote (objects + manifest) against the changed layer's bytes.

Rounds are interleaved (every method once per round, the first rotating); medians of the timed rounds, after one
untimed warm-up round. Rank 0 times each operation between two barriers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Method,
    MiB,
    Row,
    Targets,
    check_common,
    emit,
    format_table,
    interleaved_rounds,
    load_note,
    log,
    machine,
    method_calls,
    method_row,
    parser,
    passes,
    scratch_dir,
    verdict,
)

TARGETS: Targets = {
    "dist_save_vs_dcp": (">=", 0.9),
    "dist_restore_vs_dcp": ("<=", 1.1),
    "dist_dedup_vs_min": ("<=", 1.05),
}
WORLD = 2
LAYERS = 8


def mlp(width: int, layers: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def width_for(size_bytes: int, layers: int) -> int:
    return max(8, round(math.sqrt(size_bytes / 4 / layers) / 8) * 8)


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # the clean-up's writeback is not billed to the next method


def rank_main(rank: int, port: int, tmp: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import ckptkit.distributed as cd

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    torch.manual_seed(0)
    width = width_for(args.size_mib * MiB, LAYERS)
    model = shard(mlp(width, LAYERS))
    total = sum(p.numel() * p.element_size() for p in mlp(width, LAYERS).parameters())  # both ranks' halves
    if rank == 0:
        log(f"state: FSDP2 MLP {LAYERS} x Linear({width}, {width}) fp32 = {total / MiB:.1f} MiB on {WORLD} ranks")

    def timed(fn: Any) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    ck_load_repo, dcp_load_dir = os.path.join(tmp, "ck-load"), os.path.join(tmp, "dcp-load")
    cd.save(ck_load_repo, {"model": model}, "base", rng=False)
    dcp.save({"model": get_model_state_dict(model)}, storage_writer=dcp.FileSystemWriter(dcp_load_dir))

    def ck_save(i: int) -> tuple[float, int]:
        repo = os.path.join(tmp, f"ck-{i}")
        dt = timed(lambda: cd.save(repo, {"model": model}, "s", rng=False))
        if rank == 0:
            remove(repo)
        return dt, total

    def dcp_save(i: int) -> tuple[float, int]:
        path = os.path.join(tmp, f"dcp-{i}")
        dt = timed(lambda: dcp.save({"model": get_model_state_dict(model)},
                                    storage_writer=dcp.FileSystemWriter(path)))  # fmt: skip
        if rank == 0:
            remove(path)
        return dt, total

    def ck_load(i: int) -> tuple[float, int]:
        return timed(lambda: cd.load(ck_load_repo, {"model": model}, "base", rng=False)), total

    def dcp_load(i: int) -> tuple[float, int]:
        def run() -> None:
            sd = {"model": get_model_state_dict(model)}
            dcp.load(sd, storage_reader=dcp.FileSystemReader(dcp_load_dir))
            set_model_state_dict(model, sd["model"])

        return timed(run), total

    methods = [
        Method("ckptkit_save", "ckptkit.distributed.save (fresh repo)", run=ck_save),
        Method("dcp_save", "dcp.save + FileSystemWriter", run=dcp_save),
        Method("ckptkit_load", "ckptkit.distributed.load", run=ck_load),
        Method("dcp_load", "dcp.load + FileSystemReader", run=dcp_load),
    ]
    if rank == 0:
        interleaved_rounds(method_calls(methods), args.runs, args.warmup)
    else:
        _quiet_rounds(methods, args)

    # dedup: 10 equal layers, the first 9 frozen; the 10th changes between two saves
    dwidth = width_for(args.dedup_mib * MiB, 10)
    dmodel = shard(mlp(dwidth, 10))
    repo = os.path.join(tmp, "dedup")
    cd.save(repo, {"model": dmodel}, "d1", rng=False)
    before = tree_bytes(repo) if rank == 0 else 0
    with torch.no_grad():
        for p in dmodel[9].parameters():
            p.add_(1.0)
    t_second = timed(lambda: cd.save(repo, {"model": dmodel}, "d2", rng=False))
    if rank == 0:
        written = tree_bytes(repo) - before
        changed = sum(p.numel() for p in mlp(dwidth, 1).parameters()) * 4  # the 10th layer, both halves
        result = {
            "state_bytes": total, "width": width,
            "methods": {m.key: {"label": m.label, "median_s": m.median, "min_s": m.best, "gbps": m.gbps,
                                "bytes": m.nbytes, "times_s": m.times} for m in methods},
            "dedup": {"state_bytes": changed * 10,
                      "frozen_fraction": 0.9, "second_save_bytes": written, "min_bytes": changed,
                      "second_save_s": t_second},
        }  # fmt: skip
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _quiet_rounds(methods: list[Method], args: argparse.Namespace) -> None:
    """The other ranks' side of :func:`interleaved_rounds`: the same calls in the same order, untimed."""
    calls = method_calls(methods)
    for r in range(-args.warmup, args.runs):
        shift = r % len(calls)
        for call in calls[shift:] + calls[:shift]:
            call(False)


def run_ranks(tmp: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed.checkpoint
    import torch.distributed.fsdp

    import ckptkit.distributed

    assert torch.distributed.checkpoint and torch.distributed.fsdp and ckptkit.distributed  # imported before the fork

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    pids = []
    for r in range(WORLD):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                rank_main(r, port, tmp, args)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    if codes != [0] * WORLD:
        raise SystemExit(f"a rank failed: exit statuses {codes}")
    with open(os.path.join(tmp, "result.json")) as f:
        out: dict[str, Any] = json.load(f)
    return out


def table(result: dict[str, Any], note: str) -> str:
    ms = result["methods"]
    rows: list[Row] = []

    def mrow(key: str) -> None:
        m = Method(key, ms[key]["label"], times=ms[key]["times_s"], nbytes=ms[key]["bytes"])
        rows.append(method_row(m))

    def rrow(key: str, label: str, seconds: str = "-") -> None:
        v = result[key]
        rows.append((f"  {key} {label}", seconds, "-", f"{v:.3f}", *verdict(TARGETS, key, v)))

    mrow("ckptkit_save")
    mrow("dcp_save")
    rrow("dist_save_vs_dcp", "(throughput)")
    mrow("ckptkit_load")
    mrow("dcp_load")
    rrow("dist_restore_vs_dcp", "(time)")
    d = result["dedup"]
    rrow("dist_dedup_vs_min", "(written / min bytes)", f"{d['second_save_s']:.3f}")
    return "\n".join([format_table(note, rows), (
        f"dedup: a {d['state_bytes'] / MiB:.0f} MiB sharded model, 90% frozen, saved twice: the second save wrote "
        f"{d['second_save_bytes'] / MiB:.2f} MiB, the changed layer is {d['min_bytes'] / MiB:.2f} MiB; its median_s "
        "is that save")])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=1024, help="sharded state size in MiB (default 1024)")
    p.add_argument("--dedup-mib", type=int, default=None, help="size of the dedup model (default "
                   "min(256, --size-mib))")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    if args.dedup_mib is None:
        args.dedup_mib = min(256, args.size_mib)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load = os.getloadavg()
    with scratch_dir(args.dir, "ckptkit-bench-dist-") as tmp:
        raw = run_ranks(tmp, args)
    ms = raw["methods"]
    ratios = {
        "dist_save_vs_dcp": ms["ckptkit_save"]["gbps"] / ms["dcp_save"]["gbps"],
        "dist_restore_vs_dcp": ms["ckptkit_load"]["median_s"] / ms["dcp_load"]["median_s"],
        "dist_dedup_vs_min": raw["dedup"]["second_save_bytes"] / raw["dedup"]["min_bytes"],
    }
    by_min = {
        "dist_save_vs_dcp": ms["dcp_save"]["min_s"] / ms["ckptkit_save"]["min_s"],
        "dist_restore_vs_dcp": ms["ckptkit_load"]["min_s"] / ms["dcp_load"]["min_s"],
    }
    result: dict[str, Any] = {
        **ratios,
        "ratios_by_min": by_min,
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "pass": {k: passes(TARGETS, k, ratios[k]) for k in TARGETS},
        "runs": args.runs,
        "world_size": WORLD,
        "model": f"FSDP2 MLP {LAYERS} x Linear({raw['width']}, {raw['width']}) fp32, {WORLD} gloo ranks",
        **raw,
        "machine": machine(load),
        "dir": args.dir,
    }
    note = (f"state {raw['state_bytes'] / MiB:.0f} MiB ({result['model']}), median of {args.runs} interleaved "
            f"rounds, local disk under {args.dir}, restores from the page cache; {load_note(load)}")  # fmt: skip
    emit(result, args.json, lambda: table(result, note))
    return result


if __name__ == "__main__":
    main()
