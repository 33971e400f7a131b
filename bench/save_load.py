"""Save/restore throughput of ckptkit against dd, torch.save and safetensors, and storage cost of dedup.

Usage::

    python bench/save_load.py                       # ~1 GiB model + AdamW state, median of 5 rounds
    python bench/save_load.py --json                # the same, as one JSON object on stdout
    python bench/save_load.py --size-mib 32 --runs 2   # quick smoke run (a few seconds)

What is measured (all on local disk, in a temporary directory under ``--dir``, removed afterwards):

* save: ``dd if=/dev/zero ... conv=fsync`` of the same number of bytes ckptkit stores; ``torch.save`` of the
  model and optimizer state dicts + flush + fsync; ``safetensors.torch.save_file`` of the flat tensor dict +
  fsync; ``ckptkit.save`` into a fresh repository each run (nothing deduplicated), timing the whole call.
* restore: ``torch.load(weights_only=True)`` + ``model.load_state_dict`` + ``optimizer.load_state_dict``
  against ``ckptkit.restore`` (which also hash-verifies every object it reads).
* dedup: 10 checkpoints of a model whose backbone (~90% of the parameters) is frozen, AdamW on the head, one
  training step between saves, in one repository; the bytes stored against the least any format could store.

Rounds are interleaved (each round runs every method once, the starting method rotating from round to round)
and the median of the timed rounds is reported, after one untimed warm-up round. Ratios compare throughput
(bytes / second), so a format that writes a few more bytes is not penalised for it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import ckptkit
from ckptkit.storage import Repository

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
    log,
    method_calls,
    method_row,
    parser,
    passes,
    scratch_dir,
    verdict,
)

TARGETS: Targets = {
    "save_vs_dd": (">=", 0.85),
    "save_vs_torch_save": (">=", 1.4),
    "restore_vs_torch_load": ("<=", 1.0),
    "dedup_vs_min": ("<=", 1.05),
}


# --- the state -------------------------------------------------------------------------------------------------


def mlp(width: int, layers: int) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    opt.zero_grad(set_to_none=True)
    model(torch.randn(8, width)).pow(2).mean().backward()
    opt.step()


def build_state(size_bytes: int, layers: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """An fp32 MLP whose parameters + AdamW moments (3 x 4 bytes per parameter) total about ``size_bytes``."""
    params = size_bytes / 12
    width = max(8, round(math.sqrt(params / layers) / 8) * 8)
    model = mlp(width, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, width)  # so that exp_avg / exp_avg_sq exist
    return model, opt, width


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n: int = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        n += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return n


def flat_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors as one flat dict, the way one would hand them to safetensors."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for idx, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer.{idx}.{k}"] = v
    return out


# --- timing helpers --------------------------------------------------------------------------------------------


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete a file or tree, then sync, so a method's clean-up (journal commit, discards) is not billed to the
    next method's timing."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.sync()


def repo_bytes(manifest: ckptkit.schema.Manifest) -> int:
    return sum(o.size for o in manifest.objects.values())


def dd_supports_count_bytes() -> bool:
    probe = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1", "iflag=count_bytes"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


# --- the throughput benchmark ----------------------------------------------------------------------------------


def throughput(tmp: str, size_mib: int, runs: int, warmup: int) -> tuple[dict[str, Method], dict[str, Any]]:
    model, opt, width = build_state(size_mib * MiB)
    total = state_bytes(model, opt)
    log(f"state: MLP 8 x Linear({width}, {width}) + AdamW moments = {total / MiB:.1f} MiB")
    state: dict[str, object] = {"model": model, "optimizer": opt}

    # Fixtures for the restore benchmarks, written once. Dropping the page cache needs root and is not reliable
    # in containers, so both restores read from the page cache: each file is written here and read once in the
    # warm-up round, which is the same (best) case for both methods.
    load_path = os.path.join(tmp, "load.pt")
    with open(load_path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
    load_repo = os.path.join(tmp, "restore-repo")
    restore_bytes = repo_bytes(ckptkit.save(load_repo, state, "base", rng=False))
    ckpt_bytes = restore_bytes  # every save of the same state stores the same bytes
    count_bytes = dd_supports_count_bytes()

    def dd(i: int) -> tuple[float, int]:
        path = os.path.join(tmp, f"dd-{i}.bin")
        bs = 64 * MiB
        count = [f"count={ckpt_bytes}", "iflag=count_bytes"] if count_bytes else [f"count={-(-ckpt_bytes // bs)}"]
        cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", *count, "conv=fsync"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        dt = time.perf_counter() - t0
        n = os.path.getsize(path)
        remove(path)
        return dt, n

    def torch_save(i: int) -> tuple[float, int]:
        path = os.path.join(tmp, f"torch-{i}.pt")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        n = os.path.getsize(path)
        remove(path)
        return dt, n

    def safetensors_save(i: int) -> tuple[float, int]:
        path = os.path.join(tmp, f"st-{i}.safetensors")
        t0 = time.perf_counter()
        save_file(flat_tensors(model, opt), path)
        fsync_path(path)
        dt = time.perf_counter() - t0
        n = os.path.getsize(path)
        remove(path)
        return dt, n

    def ckptkit_save(i: int) -> tuple[float, int]:
        repo = os.path.join(tmp, f"save-repo-{i}")  # fresh each run: nothing is deduplicated
        t0 = time.perf_counter()
        manifest = ckptkit.save(repo, state, f"r{i}", rng=False)
        dt = time.perf_counter() - t0
        remove(repo)
        return dt, repo_bytes(manifest)

    def ckptkit_save_buffered(i: int) -> tuple[float, int]:
        repo = os.path.join(tmp, f"save-buffered-{i}")
        t0 = time.perf_counter()
        manifest = ckptkit.save(Repository(repo, direct_io=False), state, f"r{i}", rng=False)
        dt = time.perf_counter() - t0
        remove(repo)
        return dt, repo_bytes(manifest)

    def torch_load(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        sd = torch.load(load_path, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        dt = time.perf_counter() - t0
        return dt, os.path.getsize(load_path)

    def ckptkit_restore(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ckptkit.restore(load_repo, state, "base", rng=False)
        dt = time.perf_counter() - t0
        return dt, restore_bytes

    methods = [
        Method("dd", "dd if=/dev/zero conv=fsync", run=dd),
        Method("torch_save", "torch.save + fsync", run=torch_save),
        Method("safetensors_save", "safetensors save_file + fsync", run=safetensors_save),
        Method("ckptkit_save", "ckptkit.save (fresh repo)", run=ckptkit_save),
        Method("ckptkit_save_buffered", "ckptkit.save, direct_io=False", run=ckptkit_save_buffered),
        Method("torch_load", "torch.load + load_state_dict x2", run=torch_load),
        Method("ckptkit_restore", "ckptkit.restore", run=ckptkit_restore),
    ]
    interleaved_rounds(method_calls(methods), runs, warmup)
    info = {"state_bytes": total, "ckptkit_bytes": ckpt_bytes, "width": width, "layers": 8}
    return {m.key: m for m in methods}, info


# --- the dedup benchmark ---------------------------------------------------------------------------------------


def dedup(tmp: str, size_mib: int, saves: int = 10) -> dict[str, Any]:
    """``saves`` checkpoints of a model with a frozen backbone (9 of 10 equal Linear layers) into one repository."""
    width = max(8, round(math.sqrt(size_mib * MiB / 48) / 8) * 8)  # 10 layers of params + 2 moments of one
    backbone = mlp(width, 9)
    head = torch.nn.Linear(width, width)
    model = torch.nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("head", head)
    backbone.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    repo = os.path.join(tmp, "dedup-repo")
    times = []
    for step in range(1, saves + 1):
        train_step(model, opt, width)
        t0 = time.perf_counter()
        ckptkit.save(repo, {"model": model, "optimizer": opt}, f"step-{step}", rng=False)
        times.append(time.perf_counter() - t0)

    all_params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt_state = sum(
        v.numel() * v.element_size() for s in opt.state_dict()["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor)
    )  # fmt: skip
    minimum = all_params + opt_state + (saves - 1) * (trainable + opt_state)
    stored = 0
    for sub in ("objects", "checkpoints"):
        for dirpath, _, files in os.walk(os.path.join(repo, sub)):
            stored += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_params = sum(p.numel() for p in model.parameters())
    remove(repo)
    return {
        "saves": saves,
        "state_bytes": all_params + opt_state,
        "frozen_fraction": frozen / n_params,
        "stored_bytes": stored,
        "min_bytes": minimum,
        "save_median_s": statistics.median(times),
    }


# --- report ----------------------------------------------------------------------------------------------------


def table(methods: dict[str, Method], ratios: dict[str, float], dd_info: dict[str, Any], size_note: str) -> str:
    rows: list[Row] = []

    def ratio_row(key: str, label: str, seconds: str = "-", gbps: str = "-") -> None:
        v = ratios[key]
        rows.append((f"  {key} {label}".rstrip(), seconds, gbps, f"{v:.3f}", *verdict(TARGETS, key, v)))

    rows += [method_row(methods[k]) for k in ("dd", "torch_save", "safetensors_save", "ckptkit_save",
                                              "ckptkit_save_buffered")]  # fmt: skip
    ratio_row("save_vs_dd", "(throughput)")
    ratio_row("save_vs_torch_save", "(throughput)")
    ratio_row("save_vs_safetensors", "(throughput)")
    rows += [method_row(methods[k]) for k in ("torch_load", "ckptkit_restore")]
    ratio_row("restore_vs_torch_load", "(time)")
    ratio_row("dedup_vs_min", "(stored / min bytes)", f"{dd_info['save_median_s']:.3f}")
    lines = [format_table(size_note, rows)]
    lines.append(
        f"dedup: {dd_info['saves']} checkpoints of a {dd_info['state_bytes'] / MiB:.0f} MiB state "
        f"({dd_info['frozen_fraction']:.0%} of parameters frozen) in one repository: stored "
        f"{dd_info['stored_bytes'] / MiB:.1f} MiB, minimum {dd_info['min_bytes'] / MiB:.1f} MiB; its median_s is "
        "one save"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=1024, help="model + AdamW state size in MiB (default 1024)")
    p.add_argument("--dedup-mib", type=int, default=None, help="state size of the dedup model (default "
                   "min(128, --size-mib))")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    if args.dedup_mib is None:
        args.dedup_mib = min(128, args.size_mib)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    with scratch_dir(args.dir, "ckptkit-bench-") as tmp:
        methods, info = throughput(tmp, args.size_mib, args.runs, args.warmup)
        dd_info = dedup(tmp, args.dedup_mib)

    ck_save = methods["ckptkit_save"].gbps
    ratios = {
        "save_vs_dd": ck_save / methods["dd"].gbps,
        "save_vs_torch_save": ck_save / methods["torch_save"].gbps,
        "save_vs_safetensors": ck_save / methods["safetensors_save"].gbps,
        "restore_vs_torch_load": methods["ckptkit_restore"].median / methods["torch_load"].median,
        "dedup_vs_min": dd_info["stored_bytes"] / dd_info["min_bytes"],
    }
    # The same ratios from each method's fastest round: steadier than the medians where the disk is noisy (a
    # shared or virtual disk), and an estimate of what the code does when the device is not in the way.
    by_min = {
        "save_vs_dd": (methods["ckptkit_save"].nbytes / methods["ckptkit_save"].best)
        / (methods["dd"].nbytes / methods["dd"].best),
        "save_vs_torch_save": (methods["ckptkit_save"].nbytes / methods["ckptkit_save"].best)
        / (methods["torch_save"].nbytes / methods["torch_save"].best),
        "restore_vs_torch_load": methods["ckptkit_restore"].best / methods["torch_load"].best,
    }
    result: dict[str, Any] = {
        **ratios,
        "ratios_by_min": by_min,
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "pass": {k: passes(TARGETS, k, ratios[k]) for k in TARGETS},
        "runs": args.runs,
        "state_bytes": info["state_bytes"],
        "model": f"MLP {info['layers']} x Linear({info['width']}, {info['width']}) fp32 + AdamW",
        "methods": {
            k: {"median_s": m.median, "min_s": m.best, "gbps": m.gbps, "bytes": m.nbytes, "times_s": m.times}
            for k, m in methods.items()
        },
        "dedup": dd_info,
        "dir": args.dir,
    }
    note = (
        f"state {info['state_bytes'] / MiB:.0f} MiB ({result['model']}), median of {args.runs} interleaved "
        f"rounds, local disk under {args.dir}, restores read from the page cache"
    )
    emit(result, args.json, lambda: table(methods, ratios, dd_info, note))
    return result


if __name__ == "__main__":
    main()
