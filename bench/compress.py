"""Lossless compression of stored objects (codec "byteplane-zstd"): ratio, compress and decompress throughput,
and what it does to a save on S3.

Usage::

    python bench/compress.py                  # BERT-base-shaped bf16 state (~110M parameters) + fp32/AdamW state
    python bench/compress.py --json           # the same, as one JSON object on stdout
    python bench/compress.py --size-mib 8 --runs 1 --no-s3   # quick smoke run (a few seconds)

What is measured, in one run:

* ``bf16_ratio``: raw bytes / stored bytes of a BERT-base-shaped bf16 state (the shapes of bert-base-uncased,
  ~110M parameters; values drawn as trained weights look: normals with a standard deviation per layer, LayerNorm
  weights near 1, small biases), packed into objects exactly as ``ckptkit.save`` packs them.
* ``fp32_ratio``: the same for an fp32 model (``--fp32-mib`` of parameters, the first BERT-base shapes) and its
  AdamW state after a few real ``AdamW.step()`` calls (exp_avg, exp_avg_sq).
* ``compress_gbps_per_core``: raw bytes encoded per second of CPU time (all threads' CPU time counted, so it is
  per core whatever the threading), over both states.
* ``decompress_gbps``: raw bytes decoded per second of wall time (the frames of an object decode in parallel),
  over both states; ``decompress_gbps_per_core`` is per second of CPU time.
* ``framing``: the bf16 state with each byte plane of each 16 MiB chunk in a zstd frame of its own (what the codec
  does) against all planes of an object concatenated into one frame.
* ``s3_save_compressed_vs_raw``: wall time of ``ckptkit.save`` of the bf16 state into a compressed repository over
  that into a raw one (lower is better), on the Ceph S3 server tests/s3server.py starts on loopback (needs
  ``radosgw``; "n/a" without it or with ``--no-s3``). The server shares the machine's cores with the client, so
  this weighs the codec's CPU against the server's work on the bytes it no longer receives; over a network slower
  than the codec, compression wins by the ratio.
* ``s3_save_compressed_vs_raw_link``: the same with the uploads to the server limited to ``--link-mbit`` Mbit/s
  (default 1000, as over a 1 Gbit/s link: Linux tc's htb on loopback, for the server's port only; needs root;
  "n/a" where tc cannot shape).

Medians of ``--runs`` timed rounds after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

import ckptkit
from ckptkit import codecs
from ckptkit.format import DEFAULT_OBJECT_SIZE, PackedObject, group, pack
from ckptkit.storage import Repository

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, Targets, check_common, emit, load_note, log, machine, parser, passes, scratch_dir

CODEC = "byteplane-zstd"
TARGETS: Targets = {
    "bf16_ratio": (">=", 1.45),
    "fp32_ratio": (">=", 1.18),
    "compress_gbps_per_core": (">=", 0.5),
    "decompress_gbps": (">=", 1.5),
    "s3_save_compressed_vs_raw": ("<=", 0.8),
    "s3_save_compressed_vs_raw_link": ("<=", 0.8),
}
NO_S3 = "n/a (no S3 server)"
LINK_MBIT = 1000


def bert_shapes(
    hidden: int = 768, layers: int = 12, vocab: int = 30522, inter: int = 3072
) -> list[tuple[str, list[int]]]:
    """Parameter names and shapes of bert-base-uncased (with the pooler)."""
    out: list[tuple[str, list[int]]] = [
        ("embeddings.word_embeddings.weight", [vocab, hidden]),
        ("embeddings.position_embeddings.weight", [512, hidden]),
        ("embeddings.token_type_embeddings.weight", [2, hidden]),
        ("embeddings.LayerNorm.weight", [hidden]), ("embeddings.LayerNorm.bias", [hidden]),
    ]  # fmt: skip
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(f"{p}{m}.weight", [hidden, hidden]), (f"{p}{m}.bias", [hidden])]
        out += [(f"{p}attention.output.LayerNorm.weight", [hidden]), (f"{p}attention.output.LayerNorm.bias", [hidden]),
                (f"{p}intermediate.dense.weight", [inter, hidden]), (f"{p}intermediate.dense.bias", [inter]),
                (f"{p}output.dense.weight", [hidden, inter]), (f"{p}output.dense.bias", [hidden]),
                (f"{p}output.LayerNorm.weight", [hidden]), (f"{p}output.LayerNorm.bias", [hidden])]  # fmt: skip
    out += [("pooler.dense.weight", [hidden, hidden]), ("pooler.dense.bias", [hidden])]
    return out


def trained_like(shapes: list[tuple[str, list[int]]], budget: int, dtype: torch.dtype,
                 g: torch.Generator) -> dict[str, torch.Tensor]:  # fmt: skip
    """Tensors of the first ``shapes`` that fit in ``budget`` bytes (the last one cut to fit), valued as trained
    weights look: a standard deviation of their own per tensor (0.01..0.06), LayerNorm weights near 1."""
    out: dict[str, torch.Tensor] = {}
    left = budget
    es = torch.empty((), dtype=dtype).element_size()
    for name, full in shapes:
        shape = full
        n = math.prod(shape)
        if n * es > left:
            if len(shape) < 2 or left < shape[-1] * es:
                break
            shape = [left // (shape[-1] * es), shape[-1]]
            n = math.prod(shape)
        std = 0.01 + 0.05 * float(torch.rand((), generator=g))
        if "LayerNorm.weight" in name:
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
        left -= n * es
    return out


def adamw_state(params: dict[str, torch.Tensor], g: torch.Generator, steps: int = 3) -> dict[str, torch.Tensor]:
    """fp32 parameters and their AdamW state (exp_avg, exp_avg_sq) after ``steps`` steps on random gradients: the
    update of ``torch.optim.AdamW`` (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01), written out here so the
    benchmark does not pay for importing torch's compiler stack."""
    lr, b1, b2, eps, wd = 1e-4, 0.9, 0.999, 1e-8, 0.01
    out: dict[str, torch.Tensor] = {}
    for i, (k, p0) in enumerate(params.items()):
        p = p0.clone()
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        for step in range(1, steps + 1):
            grad = 1e-3 * torch.randn(p.shape, generator=g)
            p.mul_(1 - lr * wd)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v / (1 - b2**step)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**step))
        out[f"model.{k}"] = p
        out[f"optimizer.state.{i}.exp_avg"] = m
        out[f"optimizer.state.{i}.exp_avg_sq"] = v
    return out


def objects(tensors: dict[str, torch.Tensor]) -> list[PackedObject]:
    """The objects ckptkit.save would write for these tensors."""
    entries = list(tensors.items())
    return [pack([(k, tensors[k]) for k in keys]) for keys in group(entries, DEFAULT_OBJECT_SIZE)]


def timed(f: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - w, time.process_time() - c


def measure_codec(objs: list[PackedObject], runs: int, warmup: int) -> dict[str, Any]:
    raw = sum(o.size for o in objs)
    enc_cpu, enc_wall, dec_cpu, dec_wall = [], [], [], []
    stored: list[list[memoryview] | None] = []
    for r in range(-warmup, runs):
        stored, wall, cpu = timed(lambda: [codecs.encode(CODEC, o.buffers, o.size) for o in objs])
        pairs = [(b"".join(s), o.size) for s, o in zip(stored, objs, strict=True) if s is not None]
        _, dwall, dcpu = timed(lambda: [codecs.decode(b, n, "bench") for b, n in pairs])  # noqa: B023
        if r >= 0:
            enc_cpu.append(cpu)
            enc_wall.append(wall)
            dec_cpu.append(dcpu)
            dec_wall.append(dwall)
    stored_bytes = sum(o.size if s is None else sum(len(b) for b in s) for s, o in zip(stored, objs, strict=True))
    decoded = sum(o.size for s, o in zip(stored, objs, strict=True) if s is not None)
    return {
        "raw_bytes": raw, "stored_bytes": stored_bytes, "ratio": raw / stored_bytes, "objects": len(objs),
        "objects_raw": sum(s is None for s in stored),
        "compress_cpu_s": statistics.median(enc_cpu), "compress_wall_s": statistics.median(enc_wall),
        "decompress_cpu_s": statistics.median(dec_cpu), "decompress_wall_s": statistics.median(dec_wall),
        "decoded_bytes": decoded,
    }  # fmt: skip


def whole_object_framing(objs: list[PackedObject]) -> dict[str, float]:
    """All byte planes of an object concatenated into one zstd frame (level 1), for comparison."""
    c = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
        codecs.ZSTD_LEVEL, **codecs.ZSTD_PARAMS))
    raw = stored = 0
    cpu = 0.0
    for o in objs:
        data = np.frombuffer(b"".join(o.buffers), dtype=np.uint8)
        head = len(o.buffers[0])
        body = data[head:]
        es = 2 if len(body) % 2 == 0 else 1
        planes = np.ascontiguousarray(body.reshape(-1, es).T).reshape(-1)
        z, _, t = timed(lambda: c.compress(planes.data))  # noqa: B023
        raw += o.size
        stored += head + len(z)
        cpu += t
    return {"ratio": raw / stored, "compress_gbps_per_core": raw / cpu / 1e9}


class LinkUnavailable(Exception):
    """Uploads cannot be shaped here (no tc, no permission, no htb)."""


@contextlib.contextmanager
def shaped(port: int, mbit: int | None) -> Iterator[None]:
    """Traffic to ``port`` on loopback limited to ``mbit`` Mbit/s (Linux tc, htb; needs CAP_NET_ADMIN), as over a
    network link; nothing is changed when ``mbit`` is None. The shaping is removed on the way out."""
    if mbit is None:
        yield
        return
    if shutil.which("tc") is None:
        raise LinkUnavailable("Linux tc is not installed (Debian: iproute2)")
    cmds = ["qdisc add dev lo root handle 1: htb default 10",
            f"class add dev lo parent 1: classid 1:1 htb rate {mbit}mbit ceil {mbit}mbit",
            "class add dev lo parent 1: classid 1:10 htb rate 100gbit",
            f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:1"]  # fmt: skip
    added = False  # a root qdisc that was there before is never removed
    try:
        for c in cmds:
            out = subprocess.run(["tc", *c.split()], capture_output=True, text=True, check=False)
            if out.returncode:
                raise LinkUnavailable(f"`tc {c}` failed ({out.stderr.strip()}); shaping needs root (CAP_NET_ADMIN), "
                                      "the htb qdisc and no root qdisc on lo already")  # fmt: skip
            added = True
        yield
    finally:
        if added:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)


def s3_ratio(
    tmp: str, tensors: dict[str, torch.Tensor], runs: int, link_mbit: int | None = None
) -> tuple[float | str, dict[str, Any]]:
    """Save time into a compressed repository over a raw one, on the Ceph S3 server (or "n/a"); with
    ``link_mbit``, also over uploads shaped to that rate (``shaped``)."""
    if shutil.which("radosgw") is None:
        return NO_S3, {"why": "radosgw is not installed"}
    try:
        from s3 import BUCKET, Server
    except ImportError as err:  # pragma: no cover - bench/s3.py is beside this file
        return NO_S3, {"why": str(err)}
    try:
        srv = Server(os.path.join(tmp, "s3server"))
    except Exception as err:  # the server did not come up: the figure is n/a, the rest still stands
        return NO_S3, {"why": f"{type(err).__name__}: {err}"[:300]}
    def rounds(link: int | None) -> dict[str, float]:
        times: dict[str, list[float]] = {"raw": [], "compressed": []}
        cpu: dict[str, list[float]] = {"raw": [], "compressed": []}
        with shaped(int(srv.server.endpoint.rsplit(":", 1)[1].strip("/")), link):
            for i in range(runs + 1):
                for kind in ("raw", "compressed") if i % 2 == 0 else ("compressed", "raw"):
                    url = f"s3://{BUCKET}/{kind}-{link}-{i}"
                    if kind == "compressed":
                        Repository(url).configure(codec=CODEC)
                    c0, s0, t0 = time.process_time(), srv.cpu_s(), time.perf_counter()
                    ckptkit.save(url, {"model": tensors}, "a", rng=False)
                    if i:  # the first round warms up
                        times[kind].append(time.perf_counter() - t0)
                        cpu[kind].append(time.process_time() - c0 + srv.cpu_s() - s0)
                    srv.delete_prefix(f"{kind}-{link}-{i}/")
        out = {f"{k}_save_s": statistics.median(v) for k, v in times.items()}
        return {**out, **{f"{k}_cpu_s": statistics.median(v) for k, v in cpu.items()}}

    try:
        info: dict[str, Any] = {"startup_s": srv.startup_s, "loopback": rounds(None)}
        if link_mbit:
            try:
                info["link"] = {"mbit": link_mbit, **rounds(link_mbit)}
            except LinkUnavailable as err:
                info["link"] = f"n/a ({err})"
    finally:
        srv.stop()
    for figures in info.values():
        if isinstance(figures, dict):
            figures["ratio"] = figures["compressed_save_s"] / figures["raw_save_s"]
    return info["loopback"]["ratio"], info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=None, help="bf16 state size in MiB (default: all of BERT-base, "
                   "~209 MiB)")  # fmt: skip
    p.add_argument("--fp32-mib", type=int, default=None, help="fp32 parameters in MiB; AdamW adds twice that "
                   "(default 96, or --size-mib when smaller)")  # fmt: skip
    p.add_argument("--no-s3", action="store_true", help="skip the S3 save (reported as n/a)")
    p.add_argument("--link-mbit", type=int, default=LINK_MBIT, help="also time the S3 saves with uploads to the "
                   f"server limited to this many Mbit/s, as over a network link (Linux tc, needs root; default "
                   f"{LINK_MBIT}; 0: not)")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    if args.fp32_mib is None:
        args.fp32_mib = min(96, args.size_mib or 96)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    shapes = bert_shapes()
    bf16 = trained_like(shapes, (args.size_mib or 1 << 20) * MiB, torch.bfloat16, g)
    fp32 = adamw_state(trained_like(shapes, args.fp32_mib * MiB, torch.float32, g), g)
    log(f"bf16 state: {sum(t.numel() for t in bf16.values()) / 1e6:.1f}M parameters; fp32 + AdamW: "
        f"{sum(t.numel() * 4 for t in fp32.values()) / MiB:.0f} MiB")  # fmt: skip
    ob, of = objects(bf16), objects(fp32)
    rb = measure_codec(ob, args.runs, args.warmup)
    rf = measure_codec(of, args.runs, args.warmup)
    framing = whole_object_framing(ob)
    with scratch_dir(args.dir, "ckptkit-bench-compress-") as tmp:
        s3, s3_info = (NO_S3, {"why": "--no-s3"}) if args.no_s3 else s3_ratio(tmp, bf16, args.runs,
                                                                                        args.link_mbit)
    raw = rb["raw_bytes"] + rf["raw_bytes"]
    decoded = rb["decoded_bytes"] + rf["decoded_bytes"]
    ratios: dict[str, float] = {
        "bf16_ratio": rb["ratio"],
        "fp32_ratio": rf["ratio"],
        "compress_gbps_per_core": raw / (rb["compress_cpu_s"] + rf["compress_cpu_s"]) / 1e9,
        "decompress_gbps": decoded / (rb["decompress_wall_s"] + rf["decompress_wall_s"]) / 1e9,
    }
    if isinstance(s3, float):
        ratios["s3_save_compressed_vs_raw"] = s3
    link = s3_info.get("link", "n/a (no S3 server)" if not isinstance(s3, float) else "n/a (--link-mbit 0)")
    if isinstance(link, dict):
        ratios["s3_save_compressed_vs_raw_link"] = link["ratio"]
    result: dict[str, Any] = {
        **ratios,
        "decompress_gbps_per_core": decoded / (rb["decompress_cpu_s"] + rf["decompress_cpu_s"]) / 1e9,
        "compress_gbps_wall": raw / (rb["compress_wall_s"] + rf["compress_wall_s"]) / 1e9,
        "s3_save_compressed_vs_raw": s3,
        "s3_save_compressed_vs_raw_link": link["ratio"] if isinstance(link, dict) else link,
        "s3": s3_info,
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "pass": {k: passes(TARGETS, k, ratios[k]) for k in TARGETS if k in ratios},
        "framing": {"per_plane_frames": {"ratio": rb["ratio"],
                                         "compress_gbps_per_core": rb["raw_bytes"] / rb["compress_cpu_s"] / 1e9},
                    "whole_object_frame": framing},
        "bf16": rb,
        "fp32_adamw": rf,
        "runs": args.runs,
        "zstd_level": codecs.ZSTD_LEVEL,
        "zstd_params": codecs.ZSTD_PARAMS,
        **machine(load_before),
    }
    note = (f"bf16 BERT-base-shaped state {rb['raw_bytes'] / MiB:.0f} MiB ({rb['objects']} objects), fp32 + AdamW "
            f"{rf['raw_bytes'] / MiB:.0f} MiB ({rf['objects']} objects), zstd level {codecs.ZSTD_LEVEL} "
            f"{codecs.ZSTD_PARAMS}, median of "
            f"{args.runs} rounds, {load_note(load_before)}")  # fmt: skip
    emit(result, args.json, lambda: table(result, note))
    return result


def table(result: dict[str, Any], note: str) -> str:
    lines = [note, f"{'figure':32s} {'value':>22s} {'target':>8s} {'pass':>5s}"]
    lines.append("-" * len(lines[1]))
    for key in ("bf16_ratio", "fp32_ratio", "compress_gbps_per_core", "decompress_gbps", "decompress_gbps_per_core",
                "compress_gbps_wall", "s3_save_compressed_vs_raw", "s3_save_compressed_vs_raw_link"):  # fmt: skip
        v = result[key]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        target = result["targets"].get(key, "-")
        ok = {True: "PASS", False: "FAIL"}.get(result["pass"].get(key), "-")  # type: ignore[call-overload]
        lines.append(f"{key:32s} {shown:>22s} {target:>8s} {ok:>5s}")
    for name, figures in result["s3"].items():
        if isinstance(figures, dict):
            where = f"uploads shaped to {figures['mbit']} Mbit/s" if name == "link" else name
            lines.append(f"S3 save, {where}: raw {figures['raw_save_s']:.3f} s, compressed "
                         f"{figures['compressed_save_s']:.3f} s (ratio {figures['ratio']:.3f}); CPU-s client + server: "
                         f"raw {figures['raw_cpu_s']:.2f}, compressed {figures['compressed_cpu_s']:.2f}")  # fmt: skip
    f = result["framing"]
    lines.append(f"framing (bf16): per-plane frames ratio {f['per_plane_frames']['ratio']:.3f} at "
                 f"{f['per_plane_frames']['compress_gbps_per_core']:.2f} GB/s/core; one frame per object "
                 f"{f['whole_object_frame']['ratio']:.3f} at {f['whole_object_frame']['compress_gbps_per_core']:.2f} "
                 "GB/s/core")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
