"""Save and restore on S3: ckptkit against boto3's ``upload_file`` / ``download_fileobj``, on a real S3 server
(Ceph's RADOS Gateway).

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

* ckptkit restore: ``ckptkit.restore(Repository("s3://bucket/restore-src", read_part_size=64 MiB,
  read_concurrency=8), state, name, rng=False)`` of one checkpoint of the state saved before the timed rounds,
  into the live model and optimizer: the manifest GET, concurrent ranged GETs of every object into fresh memory,
  blake3 of every byte while it arrives, unpacking and ``load_state_dict``.
* boto3 download: ``client.download_fileobj`` of the same bytes (one object, uploaded before the timed rounds)
  into a preallocated anonymous memory map with ``TransferConfig(multipart_chunksize=64 MiB,
  max_concurrency=8)``: the same part size and concurrency; nothing hashed or loaded.

``s3_save_vs_boto3`` is ckptkit's throughput over boto3's (bytes / second each), ``s3_restore_vs_boto3`` ckptkit's
restore time over boto3's download time; each method's peak resident memory above what it started with is
recorded too (``peak_rss_bytes``; the kernel's high-water mark, reset before every call). Rounds are interleaved (each
round runs both methods, the starting one alternating) and the median of the timed rounds is reported, after one
untimed warm-up round. The OSD keeps every object in memory (memstore, 4 GiB), and the gateway only frees the
data of deleted objects when its garbage collector runs (hours later by default), so after every upload the
benchmark deletes what it uploaded and runs ``radosgw-admin gc process --include-all`` (untimed); the restore
rounds run after the save rounds, with only their two sources stored. Without
``--size-mib`` the size is 1024 MiB, halved until two copies fit in the OSD's store and four in available memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
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
from ckptkit.hashing import hash_bytes
from ckptkit.storage import Repository

TARGETS: Targets = {"s3_save_vs_boto3": (">=", 0.95), "s3_restore_vs_boto3": ("<=", 1.1)}
PART_SIZE = 8 * MiB
MAX_CONCURRENCY = 10
READ_PART_SIZE = 64 * MiB
READ_CONCURRENCY = 8
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

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server's daemons have used so far (0 for one that cannot be read)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.server.pids.values():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        import fsspec.config

        fsspec.config.conf.pop("s3", None)
        self.server.stop()


def _reset_peak_rss() -> int:
    """Reset this process's resident-memory high-water mark (Linux: /proc/self/clear_refs) and return its resident
    memory now (0 when unknown)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024
    return 0


def _peak_rss_above(start: int) -> int:
    """The high-water mark of resident memory since the last reset, above ``start`` bytes."""
    return max(_status_kib("VmHWM") - start, 0)


def measure(
    tmp: str, srv: Server, size_mib: int, runs: int, warmup: int, read_part: int, read_conc: int
) -> tuple[dict[str, Method], dict[str, Any]]:
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
    meter = CpuMeter(srv)

    def ckptkit_save(i: int) -> tuple[float, int]:
        nonlocal osd_peak
        repo = Repository(f"s3://{BUCKET}/ck-{i}", part_size=PART_SIZE, max_concurrency=MAX_CONCURRENCY)
        with meter.track("ckptkit"):
            t0 = time.perf_counter()
            m = ckptkit.save(repo, state, f"r{i}", rng=False)
            dt = time.perf_counter() - t0
        osd_peak = max(osd_peak, srv.osd_rss())
        srv.delete_prefix(f"ck-{i}/")
        return dt, repo_bytes(m)

    def boto3_upload(i: int) -> tuple[float, int]:
        nonlocal osd_peak
        key = f"boto3-{i}/blob.bin"
        with meter.track("boto3"):
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

    # Restore: one checkpoint and one object of the same bytes, stored once; read back every round.
    src = Repository(f"s3://{BUCKET}/restore-src", part_size=PART_SIZE, max_concurrency=MAX_CONCURRENCY,
                     read_part_size=read_part, read_concurrency=read_conc)  # fmt: skip
    restored = ckptkit.save(src, state, "src", rng=False)
    srv.client.upload_file(blob, BUCKET, "restore-blob/blob.bin", Config=config)
    osd_peak = max(osd_peak, srv.osd_rss())
    blob_bytes = os.path.getsize(blob)
    with open(blob, "rb") as f:
        blob_hash = hash_bytes(f.read())
    checked: list[bool] = []
    read_config = TransferConfig(multipart_chunksize=read_part, max_concurrency=read_conc)
    peaks: dict[str, int] = {"ckptkit_restore": 0, "boto3_download": 0}

    def ckptkit_restore(i: int) -> tuple[float, int]:
        repo = Repository(f"s3://{BUCKET}/restore-src", read_part_size=read_part, read_concurrency=read_conc)
        start = _reset_peak_rss()
        with meter.track("ckptkit_restore"):
            t0 = time.perf_counter()
            ckptkit.restore(repo, state, "src", rng=False)
            dt = time.perf_counter() - t0
        peaks["ckptkit_restore"] = max(peaks["ckptkit_restore"], _peak_rss_above(start))
        return dt, repo_bytes(restored)

    def boto3_download(i: int) -> tuple[float, int]:
        start = _reset_peak_rss()
        with meter.track("boto3_download"):
            t0 = time.perf_counter()
            dest = _memory(blob_bytes)
            srv.client.download_fileobj(BUCKET, "restore-blob/blob.bin", dest, Config=read_config)
            dt = time.perf_counter() - t0
        peaks["boto3_download"] = max(peaks["boto3_download"], _peak_rss_above(start))
        if not checked:  # its first call (untimed with the default warm-up round)
            checked.append(True)
            if hash_bytes(dest) != blob_hash:
                raise SystemExit("bench/s3.py: boto3's download differs from the file it uploaded")
        dest.close()
        return dt, nbytes

    restores = [
        Method("ckptkit_restore", "ckptkit.restore from s3://", run=ckptkit_restore),
        Method("boto3_download", "boto3 download_fileobj (same bytes)", run=boto3_download),
    ]
    interleaved_rounds(method_calls(restores), runs, warmup)
    srv.delete_prefix("restore-src/")
    srv.delete_prefix("restore-blob/")
    info = {"state_bytes": nbytes, "objects": len(manifest.objects), "width": width, "layers": 8,
            "osd_rss_peak_bytes": osd_peak, "peak_rss_bytes": peaks, "cpu": meter.medians(runs)}  # fmt: skip
    return {m.key: m for m in methods + restores}, info


class CpuMeter:
    """CPU seconds (this process's, all threads; the server daemons') spent inside ``track(key)`` blocks."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.samples: dict[str, list[tuple[float, float]]] = {}

    @contextlib.contextmanager
    def track(self, key: str) -> Iterator[None]:
        c0, s0 = _process_cpu_s(), self.srv.cpu_s()
        yield
        self.samples.setdefault(key, []).append((_process_cpu_s() - c0, self.srv.cpu_s() - s0))

    def medians(self, runs: int) -> dict[str, dict[str, float]]:
        """Per method, the medians over the timed (last ``runs``) calls."""
        out = {}
        for key, got in self.samples.items():
            timed = got[-runs:]
            out[key] = {"client_cpu_s": statistics.median(c for c, _ in timed),
                        "server_cpu_s": statistics.median(v for _, v in timed)}  # fmt: skip
        return out


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _memory(n: int) -> mmap.mmap:
    """``n`` bytes of untouched private anonymous memory (what ckptkit reads objects into), as a file object."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, n, flags=flags) if flags else mmap.mmap(-1, n)


# --- report ----------------------------------------------------------------------------------------------------


def table(methods: dict[str, Method], ratios: dict[str, float], note: str) -> str:
    def ratio(key: str, kind: str) -> Row:
        return (f"  {key} ({kind})", "-", "-", f"{ratios[key]:.3f}", *verdict(TARGETS, key, ratios[key]))

    rows: list[Row] = [method_row(methods["ckptkit"]), method_row(methods["boto3"]),
                       ratio("s3_save_vs_boto3", "throughput"),
                       method_row(methods["ckptkit_restore"]), method_row(methods["boto3_download"]),
                       ratio("s3_restore_vs_boto3", "time")]  # fmt: skip
    return format_table(note, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=None, help=f"model + AdamW state size in MiB (default "
                   f"{DEFAULT_SIZE_MIB}, less when the server's memory store or this machine's memory is "
                   "short)")  # fmt: skip
    p.add_argument("--read-part-mib", type=int, default=READ_PART_SIZE // MiB,
                   help="restore: ranged GET size of both methods, MiB (default %(default)s)")  # fmt: skip
    p.add_argument("--read-concurrency", type=int, default=READ_CONCURRENCY,
                   help="restore: GETs in flight for both methods (default %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    if args.read_part_mib < 1 or args.read_concurrency < 1:
        p.error("--read-part-mib and --read-concurrency must be positive")
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
            read_part, read_conc = args.read_part_mib * MiB, args.read_concurrency
            methods, info = measure(tmp, srv, size_mib, args.runs, args.warmup, read_part, read_conc)
        finally:
            srv.stop()

    ck, b3 = methods["ckptkit"], methods["boto3"]
    cr, bd = methods["ckptkit_restore"], methods["boto3_download"]
    ratios = {"s3_save_vs_boto3": ck.gbps / b3.gbps, "s3_restore_vs_boto3": cr.median / bd.median}
    by_min = {"s3_save_vs_boto3": (ck.nbytes / ck.best) / (b3.nbytes / b3.best),
              "s3_restore_vs_boto3": cr.best / bd.best}  # fmt: skip
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
        "read_part_size": read_part,
        "read_concurrency": read_conc,
        "peak_rss_bytes": info["peak_rss_bytes"],
        "cpu_s": info["cpu"],
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
        f"save: part size {PART_SIZE // MiB} MiB, {MAX_CONCURRENCY} parts in flight; restore: {read_part // MiB} MiB "
        f"ranged GETs, {read_conc} in flight; median of {args.runs} interleaved rounds, Ceph RGW (memstore) on "
        f"127.0.0.1, {load_note(load_before)}"
    )
    peaks = info["peak_rss_bytes"]
    note_after = (f"peak resident memory above the start of the call: ckptkit.restore "
                  f"{peaks['ckptkit_restore'] / MiB:.0f} MiB, boto3 download {peaks['boto3_download'] / MiB:.0f} MiB "
                  f"(state {info['state_bytes'] / MiB:.0f} MiB); CPU seconds (median) client / server: "
                  + ", ".join(f"{k} {v['client_cpu_s']:.2f} / {v['server_cpu_s']:.2f}"
                              for k, v in info["cpu"].items()))  # fmt: skip
    emit(result, args.json, lambda: table(methods, ratios, note) + "\n" + note_after)
    return result


if __name__ == "__main__":
    main()
