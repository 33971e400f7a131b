"""Save throughput of ckptkit on S3 against boto3's ``upload_file``, on a real S3 server (Ceph's RADOS Gateway).

Usage::

    python bench/s3.py                          # ~1 GiB model + AdamW state (less if it would not fit), 5 rounds
    python bench/s3.py --json                   # the same, as one JSON object on stdout
    python bench/s3.py --size-mib 8 --runs 1    # quick smoke run (seconds, plus ~2-5 s to start the server)

The benchmark starts its own server with tests/s3server.py (monitor + memstore OSD + radosgw on 127.0.0.1; needs
Debian's ``radosgw ceph-mon ceph-osd`` packages), creates a bucket, and stops the server at the end, also on
error. What is measured, for the state of bench/save_load.py (an fp32 MLP + its AdamW moments):

* ckptkit: ``ckptkit.save(Repository("s3://bucket/ck-<i>", part_size=8 MiB, max_concurrency=10), state, name,
  rng=False)`` into a fresh prefix each run (nothing deduplicated), timing the whole call: hashing, the
  existence checks, the multipart uploads of every object, the pending record and the manifest commit.
* boto3: ``client.upload_file`` of one local file holding the same bytes (ckptkit's objects, concatenated;
  written, and read once, before any timing) with ``TransferConfig(multipart_chunksize=8 MiB,
  max_concurrency=10)``; only the upload is timed.

``s3_save_vs_boto3`` is ckptkit's throughput over boto3's (bytes / second each). Rounds are interleaved (each
round runs both methods, the starting one alternating) and the median of the timed rounds is reported, after one
untimed warm-up round. The OSD keeps every object in memory (memstore, 4 GiB), and the gateway only frees the
data of deleted objects when its garbage collector runs (hours later by default), so after every upload the
benchmark deletes what it uploaded and runs ``radosgw-admin gc process --include-all`` (untimed). Without
``--size-mib`` the size is 1024 MiB, halved until two copies fit in the OSD's store and four in available memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
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
from save_load import build_state, repo_bytes

import ckptkit
from ckptkit.storage import Repository

TARGETS: Targets = {"s3_save_vs_boto3": (">=", 0.8)}
PART_SIZE = 8 * MiB
MAX_CONCURRENCY = 10
BUCKET = "ckptkit-bench"
DEFAULT_SIZE_MIB = 1024


def load_s3server() -> ModuleType:
    """tests/s3server.py, imported by path (the tests directory is not a package)."""
    name = "ckptkit_tests_s3server"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "tests" / "s3server.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memstore_bytes(server_dir: str) -> int:
    """The OSD's memstore capacity, from the server's ceph.conf (Ceph's default, 1 GiB, when not set)."""
    text = (Path(server_dir) / "ceph.conf").read_text()
    m = re.search(r"^\s*memstore device bytes\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 1 << 30


def choose_size(requested: int | None, store: int, avail: int) -> tuple[int, str]:
    """The state size in MiB, and why. Peak use: one run's objects in the OSD (about 2x their size in the
    OSD's memory, deleted and garbage-collected after every run), the state, the local file in the page cache."""
    if requested is not None:
        return requested, "as requested"
    size = DEFAULT_SIZE_MIB
    while size > 8 and (2 * size * MiB > store or (avail and 4 * size * MiB + (1 << 30) > avail)):
        size //= 2
    if size == DEFAULT_SIZE_MIB:
        return size, "default"
    return size, (f"reduced from {DEFAULT_SIZE_MIB} MiB to fit: OSD memstore {store / MiB:.0f} MiB, "
                  f"MemAvailable {avail / MiB:.0f} MiB")  # fmt: skip


class Server:
    """The Ceph S3 server, a boto3 client for it, and fsspec's S3 defaults pointing at it."""

    def __init__(self, directory: str) -> None:
        try:
            import boto3
        except ImportError as err:
            raise SystemExit(f"bench/s3.py: its baseline needs boto3 ({err}): pip install -e '.[test]'") from err
        import fsspec.config

        mod = load_s3server()
        t0 = time.monotonic()
        self.server = mod.start(directory, timeout=90)
        self.startup_s = time.monotonic() - t0
        self.conf = os.path.join(self.server.directory, "ceph.conf")
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask an instance-metadata service for credentials
        fsspec.config.conf["s3"] = self.server.storage_options()  # what every s3fs filesystem here starts from
        self.client = boto3.client(
            "s3", endpoint_url=self.server.endpoint, aws_access_key_id=self.server.access_key,
            aws_secret_access_key=self.server.secret_key, region_name="us-east-1",
        )  # fmt: skip
        self.client.create_bucket(Bucket=BUCKET)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``, then have the gateway free their data at once; returns how many."""
        n = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
                n += len(keys)
        self.collect_garbage()
        return n

    def collect_garbage(self) -> None:
        cmd = ["radosgw-admin", "-c", self.conf, "gc", "process", "--include-all"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)

    def osd_rss(self) -> int:
        """The OSD's resident memory in bytes (0 when unknown)."""
        with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
            status = Path(f"/proc/{self.server.pids['osd']}/status").read_text()
            return int(status.split("VmRSS:")[1].split()[0]) * 1024
        return 0

    def stop(self) -> None:
        import fsspec.config

        fsspec.config.conf.pop("s3", None)
        self.server.stop()


def measure(tmp: str, srv: Server, size_mib: int, runs: int, warmup: int) -> tuple[dict[str, Method], dict[str, Any]]:
    model, opt, width = build_state(size_mib * MiB)
    state: dict[str, object] = {"model": model, "optimizer": opt}

    # The baseline's file: ckptkit's objects for this state, concatenated (the same bytes, one file), written and
    # read once before any timing so that boto3 reads it from the page cache.
    local = os.path.join(tmp, "local-repo")
    manifest = ckptkit.save(local, state, "base", rng=False)
    nbytes = repo_bytes(manifest)
    blob = os.path.join(tmp, "blob.bin")
    with open(blob, "wb") as out:
        for h in sorted(manifest.objects):
            with open(os.path.join(local, "objects", h[:2], h), "rb") as f:
                shutil.copyfileobj(f, out, 16 * MiB)
    shutil.rmtree(local)
    with open(blob, "rb") as f:
        while f.read(64 * MiB):
            pass
    log(f"state: MLP 8 x Linear({width}, {width}) + AdamW moments = {nbytes / MiB:.1f} MiB in "
        f"{len(manifest.objects)} objects; baseline file of the same bytes written")  # fmt: skip

    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_chunksize=PART_SIZE, max_concurrency=MAX_CONCURRENCY)
    osd_peak = 0

    def ckptkit_save(i: int) -> tuple[float, int]:
        nonlocal osd_peak
        repo = Repository(f"s3://{BUCKET}/ck-{i}", part_size=PART_SIZE, max_concurrency=MAX_CONCURRENCY)
        t0 = time.perf_counter()
        m = ckptkit.save(repo, state, f"r{i}", rng=False)
        dt = time.perf_counter() - t0
        osd_peak = max(osd_peak, srv.osd_rss())
        srv.delete_prefix(f"ck-{i}/")
        return dt, repo_bytes(m)

    def boto3_upload(i: int) -> tuple[float, int]:
        nonlocal osd_peak
        key = f"boto3-{i}/blob.bin"
        t0 = time.perf_counter()
        srv.client.upload_file(blob, BUCKET, key, Config=config)
        dt = time.perf_counter() - t0
        osd_peak = max(osd_peak, srv.osd_rss())
        srv.delete_prefix(f"boto3-{i}/")
        return dt, nbytes

    methods = [
        Method("ckptkit", "ckptkit.save to s3:// (fresh prefix)", run=ckptkit_save),
        Method("boto3", "boto3 upload_file (same bytes)", run=boto3_upload),
    ]
    interleaved_rounds(method_calls(methods), runs, warmup)
    info = {"state_bytes": nbytes, "objects": len(manifest.objects), "width": width, "layers": 8,
            "osd_rss_peak_bytes": osd_peak}  # fmt: skip
    return {m.key: m for m in methods}, info


# --- report ----------------------------------------------------------------------------------------------------


def table(methods: dict[str, Method], ratios: dict[str, float], note: str) -> str:
    rows: list[Row] = [method_row(m) for m in methods.values()]
    rows += [(f"  {key} (throughput)", "-", "-", f"{v:.3f}", *verdict(TARGETS, key, v)) for key, v in ratios.items()]
    return format_table(note, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=None, help=f"model + AdamW state size in MiB (default "
                   f"{DEFAULT_SIZE_MIB}, less when the server's memory store or this machine's memory is "
                   "short)")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with scratch_dir(args.dir, "ckptkit-bench-s3-") as tmp:
        srv = Server(os.path.join(tmp, "s3server"))
        try:
            store = memstore_bytes(srv.server.directory)
            size_mib, size_why = choose_size(args.size_mib, store, mem_available())
            log(f"S3 server up in {srv.startup_s:.1f} s at {srv.server.endpoint}; state size {size_mib} MiB "
                f"({size_why})")  # fmt: skip
            methods, info = measure(tmp, srv, size_mib, args.runs, args.warmup)
        finally:
            srv.stop()

    ck, b3 = methods["ckptkit"], methods["boto3"]
    ratios = {"s3_save_vs_boto3": ck.gbps / b3.gbps}
    by_min = {"s3_save_vs_boto3": (ck.nbytes / ck.best) / (b3.nbytes / b3.best)}
    result: dict[str, Any] = {
        **ratios,
        "ratios_by_min": by_min,
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "pass": {k: passes(TARGETS, k, ratios[k]) for k in TARGETS},
        "runs": args.runs,
        "size_mib": size_mib,
        "size_note": size_why,
        "state_bytes": info["state_bytes"],
        "objects": info["objects"],
        "model": f"MLP {info['layers']} x Linear({info['width']}, {info['width']}) fp32 + AdamW",
        "part_size": PART_SIZE,
        "max_concurrency": MAX_CONCURRENCY,
        "methods": {
            k: {"median_s": m.median, "min_s": m.best, "gbps": m.gbps, "bytes": m.nbytes, "times_s": m.times}
            for k, m in methods.items()
        },
        "server": {
            "startup_s": srv.startup_s,
            "memstore_bytes": store,
            "osd_rss_peak_bytes": info["osd_rss_peak_bytes"],
        },
        **machine(load_before),
        "dir": args.dir,
    }
    note = (
        f"state {info['state_bytes'] / MiB:.0f} MiB ({size_why}; {result['model']}, {info['objects']} objects), "
        f"part size {PART_SIZE // MiB} MiB, {MAX_CONCURRENCY} parts in flight, median of {args.runs} interleaved "
        f"rounds, Ceph RGW (memstore) on 127.0.0.1, {load_note(load_before)}"
    )
    emit(result, args.json, lambda: table(methods, ratios, note))
    return result


if __name__ == "__main__":
    main()
