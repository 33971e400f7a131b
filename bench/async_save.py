"""Async save (``CheckpointManager(..., async_save=True)``): how long it blocks the training loop, and how much it
slows training down while the background writer commits.

Usage::

    python bench/async_save.py                      # ~1 GiB model + AdamW state, median of 5 rounds
    python bench/async_save.py --json               # the same, as one JSON object on stdout
    python bench/async_save.py --size-mib 8 --runs 1   # quick smoke run (a few seconds)

What is measured (on local disk, in a temporary directory under ``--dir``, removed afterwards), for the state of
bench/save_load.py (an fp32 MLP + its AdamW moments of about ``--size-mib``):

* copy: ``dst.copy_(src)`` of every tensor of the state into preallocated, already touched tensors: the least
  any snapshot to host memory can cost. ``async_block_vs_copy`` is the time ``mgr.save(step)`` blocks, divided
  by (bytes / that copy bandwidth + 50 ms of allowance for capture and bookkeeping).
* sync: ``torch.save`` of the model and optimizer state dicts + flush + fsync (the blocking time of a plain
  synchronous save); ``async_block_vs_sync`` is the async blocking time divided by it.
* async: ``mgr.save(step)`` of a manager with ``async_save=True`` and ``Retention(keep_last=1)`` (the previous
  checkpoint is pruned and its objects gc'd in the background). One training step of the big model precedes
  every save, so every object is new and written (nothing is deduplicated). The writer runs at the manager's
  default priority (``writer_nice=10``) unless ``--writer-nice`` says otherwise. The manager's first save allocates
  its host buffers; from the second save on they are reused. The first save is timed once and reported apart;
  the blocking medians are of saves 2 and later. ``mgr.wait()`` of the previous save is never timed.
* training steps: forward + backward + AdamW step of a separate small MLP (a step takes tens of ms here) with a
  fixed batch, either with nothing else running ("alone", ``--steps`` steps) or right after an async save
  returned, for as long as that save is still being written ("during": every step that starts before the
  commit is seen done, at least one per save). ``step_slowdown_during_save`` is the median step time during
  over the median alone. The same pair is also run with ``torch.set_num_threads(1)`` (training on one core,
  leaving the other to the writer) and reported as ``step_slowdown_during_save_threads1``.

Rounds are interleaved (each round runs every method once, the starting method rotating from round to round)
and the median of the timed rounds is reported, after one untimed warm-up round. During the "during" windows
the process's CPU time (user + system, all threads) is recorded, so the table also says how busy both cores were.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MiB,
    Row,
    Series,
    Targets,
    check_common,
    emit,
    format_table,
    interleaved_rounds,
    load_note,
    log,
    machine,
    parser,
    passes,
    scratch_dir,
    verdict,
)
from save_load import build_state, flat_tensors, mlp, remove

import ckptkit

TARGETS: Targets = {
    "async_block_vs_copy": ("<=", 1.5),
    "async_block_vs_sync": ("<=", 0.15),
    "step_slowdown_during_save": ("<=", 1.3),
}
ALLOWANCE_S = 0.050  # capture + bookkeeping allowed on top of the bare copy
STEP_WIDTH, STEP_LAYERS, STEP_BATCH = 1024, 4, 256  # the small training model: 4.2 M parameters


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def torch_threads(n: int | None) -> Any:
    """Run the block with ``torch.set_num_threads(n)`` (unchanged when ``n`` is None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Trainer:
    """A small MLP trained with AdamW on a fixed batch: the training loop whose steps are timed."""

    def __init__(self) -> None:
        self.model = mlp(STEP_WIDTH, STEP_LAYERS)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(STEP_BATCH, STEP_WIDTH)
        for _ in range(3):
            self.step()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model(self.x).pow(2).mean().backward()
        self.opt.step()
        return time.perf_counter() - t0


@dataclass
class Window:
    """One background save seen from the training loop: its steps, its length and the CPU used meanwhile."""

    steps: list[float]
    background_s: float
    loop_s: float
    cpu_s: float


def measure(
    tmp: str, size_mib: int, runs: int, warmup: int, n_steps: int, nice: int | None
) -> tuple[dict[str, Series], dict[str, Any]]:
    model, opt, width = build_state(size_mib * MiB)
    tensors = list(flat_tensors(model, opt).values())
    total = sum(t.numel() * t.element_size() for t in tensors)
    log(f"state: MLP 8 x Linear({width}, {width}) + AdamW moments = {total / MiB:.1f} MiB in {len(tensors)} tensors")
    trainer = Trainer()
    with torch_threads(None):
        alone0 = statistics.median(trainer.step() for _ in range(5))
    log(f"training model: MLP {STEP_LAYERS} x Linear({STEP_WIDTH}, {STEP_WIDTH}), batch {STEP_BATCH}: "
        f"{alone0 * 1e3:.0f} ms per step")  # fmt: skip

    dsts = [torch.empty_like(t) for t in tensors]
    for d, t in zip(dsts, tensors, strict=True):
        d.copy_(t)  # touch every page once: the timed copies measure bandwidth, not page faults
    niceness = {} if nice is None else {"writer_nice": nice}
    mgr = ckptkit.CheckpointManager(os.path.join(tmp, "async-repo"), {"model": model, "optimizer": opt},
                                    async_save=True, rng=False, retention=ckptkit.Retention(keep_last=1),
                                    **niceness)  # fmt: skip
    step_no = 0

    s = {k: Series(k, label) for k, label in [
        ("copy", "dst.copy_(src), every tensor"),
        ("torch_save", "torch.save + fsync (sync save)"),
        ("first_block", "async save() #1 blocks (allocates buffers)"),
        ("block", "async save() #2+ blocks (buffers reused)"),
        ("block_threads1", "async save() #2+ blocks, torch threads=1"),
        ("background", "async save: save() return -> committed"),
        ("step_alone", "train step, no save running"),
        ("step_during", "train step, during a background save"),
        ("step_alone_t1", "train step, no save, torch threads=1"),
        ("step_during_t1", "train step, during a save, threads=1"),
    ]}  # fmt: skip
    windows: dict[str, list[Window]] = {"default": [], "threads1": []}

    def async_save(threads: int | None) -> tuple[float, Window]:
        nonlocal step_no
        mgr.wait()  # the previous save (already committed: every window waits for its save)
        train_step_big()  # every object changes, so the save writes the whole state
        step_no += 1
        gc.collect()
        with torch_threads(threads):
            t0 = time.perf_counter()
            mgr.save(step_no, force=True)
            t1 = time.perf_counter()
            c0 = cpu_seconds()
            inflight = mgr._inflight
            steps = [trainer.step()]  # at least one step per save
            while inflight is not None and not inflight.done():
                steps.append(trainer.step())
            c1, t2 = cpu_seconds(), time.perf_counter()
            mgr.wait()
            t3 = time.perf_counter()
        return t1 - t0, Window(steps, t3 - t1, t2 - t1, c1 - c0)

    def train_step_big() -> None:
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, width)).pow(2).mean().backward()
        opt.step()

    # The first save of the manager: buffers are allocated (and their pages faulted in) here, once.
    block, win = async_save(None)
    s["first_block"].times.append(block)
    s["first_block"].nbytes = total
    log(f"first async save blocked {block:.3f} s; committed {win.background_s:.2f} s later")

    def run_copy(timed: bool) -> None:
        t0 = time.perf_counter()
        for d, src in zip(dsts, tensors, strict=True):
            d.copy_(src)
        if timed:
            s["copy"].times.append(time.perf_counter() - t0)
            s["copy"].nbytes = total

    def run_torch_save(timed: bool) -> None:
        path = os.path.join(tmp, f"torch-{step_no}.pt")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        n = os.path.getsize(path)
        remove(path)
        if timed:
            s["torch_save"].times.append(dt)
            s["torch_save"].nbytes = n

    def run_async(timed: bool) -> None:
        block, win = async_save(None)
        if timed:
            s["block"].times.append(block)
            s["block"].nbytes = total
            s["background"].times.append(win.background_s)
            s["background"].nbytes = total
            s["step_during"].times.extend(win.steps)
            windows["default"].append(win)

    def run_async_t1(timed: bool) -> None:
        block, win = async_save(1)
        if timed:
            s["block_threads1"].times.append(block)
            s["block_threads1"].nbytes = total
            s["step_during_t1"].times.extend(win.steps)
            windows["threads1"].append(win)

    def run_alone(timed: bool) -> None:
        steps = [trainer.step() for _ in range(n_steps)]
        if timed:
            s["step_alone"].times.extend(steps)

    def run_alone_t1(timed: bool) -> None:
        with torch_threads(1):
            steps = [trainer.step() for _ in range(n_steps)]
        if timed:
            s["step_alone_t1"].times.extend(steps)

    methods: list[Callable[[bool], None]] = [run_copy, run_torch_save, run_async, run_alone, run_async_t1,
                                             run_alone_t1]  # fmt: skip
    interleaved_rounds(methods, runs, warmup)
    mgr.close()

    def window_info(ws: list[Window], alone: Series) -> dict[str, Any]:
        wall = sum(w.loop_s for w in ws)
        cpu = sum(w.cpu_s for w in ws)
        # Training time a save costs: the steps run during it, less what they take with no save running.
        lost = [sum(w.steps) - len(w.steps) * alone.median for w in ws]
        return {
            "saves": len(ws),
            "steps_during": [len(w.steps) for w in ws],
            "background_s": [w.background_s for w in ws],
            "train_time_lost_per_save_s": statistics.median(lost) if lost else math.nan,
            "process_cpu_cores_busy": cpu / wall if wall else math.nan,  # of os.cpu_count() cores
        }

    info = {
        "state_bytes": total,
        "tensors": len(tensors),
        "width": width,
        "layers": 8,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "windows": {
            "default": window_info(windows["default"], s["step_alone"]),
            "threads1": window_info(windows["threads1"], s["step_alone_t1"]),
        },
        "snapshot_bytes": mgr._snapshots.bytes if mgr._snapshots is not None else 0,
        "writer_nice": mgr.writer_nice,
    }
    return s, info


# --- report ----------------------------------------------------------------------------------------------------


def table(s: dict[str, Series], ratios: dict[str, float], note: str) -> str:
    rows: list[Row] = []

    def series_row(key: str) -> None:
        m = s[key]
        gbps = "-" if math.isnan(m.gbps) else f"{m.gbps:.3f}"
        n = f" (n={len(m.times)})" if len(m.times) > 1 and key.startswith("step") else ""
        rows.append((m.label + n, f"{m.median:.4f}", gbps, "-", "-", "-"))

    def ratio_row(key: str, label: str, target_key: str | None = None) -> None:
        v = ratios[key]
        target, ok = verdict(TARGETS, target_key or key, v)
        if target_key and ok != "-":
            ok = f"({ok})"  # informational: the same bound, not a target of its own
        rows.append((f"  {key} {label}".rstrip(), "-", "-", f"{v:.3f}", target, ok))

    for k in ("copy", "torch_save", "first_block", "block"):
        series_row(k)
    ratio_row("async_block_vs_copy", "(block / (copy + 50 ms))")
    ratio_row("async_block_vs_sync", "(time)")
    for k in ("block_threads1", "background", "step_alone", "step_during"):
        series_row(k)
    ratio_row("step_slowdown_during_save", "(median step time)")
    for k in ("step_alone_t1", "step_during_t1"):
        series_row(k)
    ratio_row("step_slowdown_during_save_threads1", "(median step time)", "step_slowdown_during_save")
    return format_table(note, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=1024, help="model + AdamW state size in MiB (default 1024)")
    p.add_argument("--steps", type=int, default=20, help="training steps per 'alone' round (default 20)")
    p.add_argument("--writer-nice", type=int, default=None, help="CheckpointManager(writer_nice=N): the "
                   "background writer's priority below training's (default: ckptkit's default)")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    if args.steps < 1:
        p.error("--steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with scratch_dir(args.dir, "ckptkit-bench-async-") as tmp:
        s, info = measure(tmp, args.size_mib, args.runs, args.warmup, args.steps, args.writer_nice)

    ratios = {
        "async_block_vs_copy": s["block"].median / (s["copy"].median + ALLOWANCE_S),
        "async_block_vs_sync": s["block"].median / s["torch_save"].median,
        "step_slowdown_during_save": s["step_during"].median / s["step_alone"].median,
        "step_slowdown_during_save_threads1": s["step_during_t1"].median / s["step_alone_t1"].median,
    }
    by_min = {  # each series' fastest round: an estimate of the code's cost when nothing else is in the way
        "async_block_vs_copy": s["block"].best / (s["copy"].best + ALLOWANCE_S),
        "async_block_vs_sync": s["block"].best / s["torch_save"].best,
    }
    result: dict[str, Any] = {
        **ratios,
        "ratios_by_min": by_min,
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "pass": {k: passes(TARGETS, k, ratios[k]) for k in TARGETS},
        "runs": args.runs,
        "state_bytes": info["state_bytes"],
        "model": f"MLP {info['layers']} x Linear({info['width']}, {info['width']}) fp32 + AdamW",
        "training_model": f"MLP {STEP_LAYERS} x Linear({STEP_WIDTH}, {STEP_WIDTH}) fp32 + AdamW, batch {STEP_BATCH}",
        "copy_gbps": s["copy"].gbps,
        "expected_block_s": s["copy"].median + ALLOWANCE_S,
        "first_save_block_s": s["first_block"].times[0],
        "series": {
            k: {
                "median_s": m.median,
                "min_s": m.best,
                "n": len(m.times),
                **({"gbps": m.gbps, "bytes": m.nbytes} if m.nbytes else {}),
                **({"times_s": m.times} if not k.startswith("step") else {}),
            }
            for k, m in s.items()
        },
        "windows": info["windows"],
        "torch_threads": info["torch_threads"],
        "writer_nice": info["writer_nice"],
        **machine(load_before),
        "dir": args.dir,
    }
    def text() -> str:
        note = (
            f"state {info['state_bytes'] / MiB:.0f} MiB ({result['model']}), training model "
            f"{result['training_model']}, median of {args.runs} interleaved rounds, local disk under {args.dir}, "
            f"torch threads {info['torch_threads']}, writer_nice {info['writer_nice']}, {load_note(load_before)}"
        )
        lines = [table(s, ratios, note)]
        for k, w in info["windows"].items():
            lines.append(f"during-save windows ({k}): steps per save {w['steps_during']}, training time lost per "
                         f"save {w['train_time_lost_per_save_s']:.2f} s, process CPU "
                         f"{w['process_cpu_cores_busy']:.2f} of {os.cpu_count()} cores busy")  # fmt: skip
        return "\n".join(lines)

    emit(result, args.json, text)
    return result


if __name__ == "__main__":
    main()
