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

* sync: ``mgr.save(step)`` of a second manager with ``async_save=False`` and the same repository options
  (``Retention(keep_last=1)``, ``rng=False``), also after a training step of the big model: what a synchronous
  ckptkit save costs the training loop (it is blocked for all of it).
* ``async_lost_vs_sync``: the training time an async save costs, divided by that synchronous save's time
  (medians over the timed rounds, both measured in the same run, interleaved). The training time lost per
  async save is ``block + sum(steps during) - sum(steps after)``: the time ``mgr.save`` blocks, plus how much
  longer the training steps run while the save is in the background took than as many steps run right after it
  committed (nothing in flight, same conditions): a paired comparison over the same number of steps, so a
  machine whose load drifts from round to round shifts both alike, and a save that costs nothing comes out at
  zero on average (above or below it by the noise; below zero is reported as it is). A save that commits before
  the first step ends still counts that step. Until 2026-12-02 the baseline was ``len(steps during) *
  median(--steps steps before)``, and a window that came out below it counted as no loss: that biases the figure
  upward (step times have a long right tail, so the median step is shorter than the mean one, and the
  difference is added once per step of the window) and makes it noisy in long windows (a baseline of 20 steps,
  multiplied by every step of the window). It is still reported as ``async_lost_vs_sync_median_baseline``
  (``_loaded_median_baseline``), with its bias on its own (``null_s`` in the JSON: what it gives a save that
  costs nothing).
* Two scenarios, one after the other: quiet (nothing else started by the benchmark), then loaded: one
  competing CPU-bound process (a pure-Python busy loop, nice 0, started before the scenario and killed after
  it) runs throughout, for the steps before, the steps during and the synchronous saves alike.
  ``async_lost_vs_sync_loaded`` is the same ratio measured there. Targets: <= 0.5 quiet, <= 1.0 loaded.

Rounds are interleaved (each round runs every method once, the starting method rotating from round to round)
and the median of the timed rounds is reported, after one untimed warm-up round. During the "during" windows
the CPU time of this process (user + system, all threads) and of the writer process (``writer="process"``) is
recorded, so the table also says how busy both cores were. A full run at the default size took about 15
minutes on 2 cores (most of it the background saves, which commit slowly at low priority, and as many steps
after each); each ``--compare`` adds about half as much again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    "async_lost_vs_sync": ("<=", 0.5),
    "async_lost_vs_sync_loaded": ("<=", 1.0),
}
COMPETITOR = "while True: pass"  # the loaded scenario's competing CPU-bound process (one core's worth)
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
    """One background save seen from the training loop: the steps run right before it (nothing in flight), how
    long ``save`` blocked, the steps run while it was written, its length and the CPU used meanwhile."""

    before: list[float]
    block_s: float
    steps: list[float]
    background_s: float
    loop_s: float
    cpu_s: float
    after: list[float]

    @property
    def lost_s(self) -> float:
        """Training time this save cost: the blocking time, plus how much longer the steps during it took than as
        many steps right after it committed (nothing in flight). Unbiased, and paired: the two sums are over the
        same number of steps under the same conditions, so a save that costs nothing comes out at zero on average,
        above or below by the noise of the two sums, whatever the window's length."""
        return self.block_s + sum(self.steps) - sum(self.after)

    @property
    def lost_median_s(self) -> float:
        """The estimate this benchmark reported before 2026-12-02: the excess over as many *median* steps
        before, an excess below zero counted as none. Biased upward: step times have a long right tail (the
        scheduler setting a thread aside), so the median step is shorter than the mean one and every step of a
        long window adds the difference (``null_s``), and the clamp drops the windows that came out below; and it
        is noisy: the baseline is ``--steps`` steps, multiplied by every step of the window."""
        excess = sum(self.steps) - len(self.steps) * statistics.median(self.before)
        return self.block_s + max(0.0, excess)

    @property
    def null_s(self) -> float:
        """What :attr:`lost_median_s` attributes to a save that costs nothing: the mean step before less the
        median one, times the steps of this window."""
        return len(self.steps) * (statistics.fmean(self.before) - statistics.median(self.before))


@contextlib.contextmanager
def competitor(start: bool) -> Iterator[int | None]:
    """A competing CPU-bound process (a pure-Python busy loop) for the block, killed after it; its pid."""
    if not start:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # running (and its interpreter started) before the scenario's first step
        if proc.poll() is not None:
            raise RuntimeError(f"the competing process exited at once (status {proc.returncode})")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def writer_cpu_seconds(mgr: ckptkit.CheckpointManager) -> float:
    """CPU seconds used so far by the manager's writer process (0 for a writer thread: counted in this
    process's own CPU time)."""
    pid = getattr(mgr._writer, "pid", None)
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


SERIES = [
    ("copy", "dst.copy_(src), every tensor"),
    ("torch_save", "torch.save + fsync (sync save)"),
    ("sync", "ckptkit save, async_save=False (blocks)"),
    ("first_block", "async save() #1 blocks (allocates buffers)"),
    ("block", "async save() #2+ blocks (buffers reused)"),
    ("lost", "async save: training time lost per save"),
    ("lost_median", "  the same, by the median step before (old)"),
    ("block_threads1", "async save() #2+ blocks, torch threads=1"),
    ("background", "async save: save() return -> committed"),
    ("step_alone", "train step, no save running"),
    ("step_during", "train step, during a background save"),
    ("step_alone_t1", "train step, no save, torch threads=1"),
    ("step_during_t1", "train step, during a save, threads=1"),
    ("sync_loaded", "loaded: ckptkit save, async_save=False"),
    ("block_loaded", "loaded: async save() blocks"),
    ("lost_loaded", "loaded: async, training time lost per save"),
    ("lost_median_loaded", "  the same, by the median step before (old)"),
    ("background_loaded", "loaded: async save() return -> committed"),
    ("step_alone_loaded", "loaded: train step, no save running"),
    ("step_during_loaded", "loaded: train step, during a save"),
]


def measure(
    tmp: str,
    size_mib: int,
    runs: int,
    warmup: int,
    n_steps: int,
    options: dict[str, Any],
    compare: dict[str, dict[str, Any]] | None = None,
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
    state = {"model": model, "optimizer": opt}
    common: dict[str, Any] = {"rng": False, "retention": ckptkit.Retention(keep_last=1)}
    mgr = ckptkit.CheckpointManager(os.path.join(tmp, "async-repo"), state, async_save=True, **common, **options)
    sync_mgr = ckptkit.CheckpointManager(os.path.join(tmp, "sync-repo"), state, async_save=False, **common)
    others = {spec: ckptkit.CheckpointManager(compare_repo(os.path.join(tmp, f"compare-{i}"), opts), state,
                                              async_save=True, **common,
                                              **{k: v for k, v in opts.items() if k != "direct_io"})
              for i, (spec, opts) in enumerate((compare or {}).items())}  # fmt: skip
    other_windows: dict[str, dict[str, list[Window]]] = {spec: {"quiet": [], "loaded": []} for spec in others}
    step_no = 0

    s = {k: Series(k, label) for k, label in SERIES}
    windows: dict[str, list[Window]] = {"default": [], "threads1": [], "loaded": []}

    def train_step_big() -> None:
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, width)).pow(2).mean().backward()
        opt.step()

    def async_save(threads: int | None, mgr: ckptkit.CheckpointManager = mgr) -> Window:
        nonlocal step_no
        mgr.wait()  # the previous save (already committed: every window waits for its save)
        train_step_big()  # every object changes, so the save writes the whole state
        step_no += 1
        gc.collect()
        with torch_threads(threads):
            before = [trainer.step() for _ in range(n_steps)]
            t0 = time.perf_counter()
            mgr.save(step_no, force=True)
            t1 = time.perf_counter()
            c0 = cpu_seconds() + writer_cpu_seconds(mgr)
            inflight = mgr._inflight
            steps = [trainer.step()]  # at least one step per save
            while inflight is not None and not inflight.done():
                steps.append(trainer.step())
            c1, t2 = cpu_seconds() + writer_cpu_seconds(mgr), time.perf_counter()
            mgr.wait()
            t3 = time.perf_counter()
            after = [trainer.step() for _ in steps]  # as many steps, with nothing in flight
        return Window(before, t1 - t0, steps, t3 - t1, t2 - t1, c1 - c0, after)

    for other in others.values():
        async_save(None, other)  # their first save (buffers allocated, a writer process started), untimed
    # The first save of the manager: buffers are allocated (and their pages faulted in) here, once.
    win = async_save(None)
    s["first_block"].times.append(win.block_s)
    s["first_block"].nbytes = total
    log(f"first async save blocked {win.block_s:.3f} s; committed {win.background_s:.2f} s later")

    def record(key: str, dt: float) -> None:
        s[key].times.append(dt)
        if not key.startswith(("step", "lost")):
            s[key].nbytes = total

    def run_copy(timed: bool) -> None:
        t0 = time.perf_counter()
        for d, src in zip(dsts, tensors, strict=True):
            d.copy_(src)
        if timed:
            record("copy", time.perf_counter() - t0)

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

    def sync_save(key: str) -> Callable[[bool], None]:
        def run(timed: bool) -> None:
            nonlocal step_no
            train_step_big()  # every object changes, as for the async saves
            step_no += 1
            gc.collect()
            t0 = time.perf_counter()
            sync_mgr.save(step_no, force=True)
            if timed:
                record(key, time.perf_counter() - t0)

        return run

    def async_run(threads: int | None, window: str, keys: dict[str, str]) -> Callable[[bool], None]:
        def run(timed: bool) -> None:
            win = async_save(threads)
            if timed:
                windows[window].append(win)
                for what, key in keys.items():
                    if what == "steps":
                        s[key].times.extend(win.steps)
                    elif what == "before":
                        s[key].times.extend(win.before)
                    else:
                        record(key, {"block": win.block_s, "lost": win.lost_s, "background": win.background_s,
                                     "lost_median": win.lost_median_s}[what])  # fmt: skip

        return run

    def alone(key: str, threads: int | None) -> Callable[[bool], None]:
        def run(timed: bool) -> None:
            with torch_threads(threads):
                steps = [trainer.step() for _ in range(n_steps)]
            if timed:
                s[key].times.extend(steps)

        return run

    def other_run(spec: str, scenario: str) -> Callable[[bool], None]:
        def run(timed: bool) -> None:
            win = async_save(None, others[spec])
            if timed:
                other_windows[spec][scenario].append(win)

        return run

    quiet: list[Callable[[bool], None]] = [
        run_copy, run_torch_save, sync_save("sync"),
        async_run(None, "default", {"block": "block", "lost": "lost", "background": "background",
                                    "steps": "step_during", "lost_median": "lost_median"}),
        alone("step_alone", None),
        async_run(1, "threads1", {"block": "block_threads1", "steps": "step_during_t1"}),
        alone("step_alone_t1", 1),
    ]  # fmt: skip
    loaded: list[Callable[[bool], None]] = [
        sync_save("sync_loaded"),
        async_run(None, "loaded", {"block": "block_loaded", "lost": "lost_loaded", "background": "background_loaded",
                                   "steps": "step_during_loaded", "before": "step_alone_loaded",
                                   "lost_median": "lost_median_loaded"}),
    ]  # fmt: skip
    quiet += [other_run(spec, "quiet") for spec in others]
    loaded += [other_run(spec, "loaded") for spec in others]
    t_quiet = time.perf_counter()
    log("quiet scenario")
    interleaved_rounds(quiet, runs, warmup)
    t_loaded = time.perf_counter()
    with competitor(True) as pid:
        log(f"loaded scenario: competing CPU-bound process {pid}")
        interleaved_rounds(loaded, runs, warmup)
    t_end = time.perf_counter()
    mgr.close()
    sync_mgr.close()
    for other in others.values():
        other.close()

    def window_info(ws: list[Window], alone: Series | None) -> dict[str, Any]:
        wall = sum(w.loop_s for w in ws)
        cpu = sum(w.cpu_s for w in ws)
        # Training time a save costs: the steps run during it, less what they take with no save running.
        if alone is not None:  # the scenario's mean step with no save running (the table's "alone" row)
            lost = [sum(w.steps) - len(w.steps) * statistics.fmean(alone.times) for w in ws]
        else:
            lost = [w.lost_s - w.block_s for w in ws]
        return {
            "saves": len(ws),
            "steps_during": [len(w.steps) for w in ws],
            "background_s": [w.background_s for w in ws],
            "block_s": [w.block_s for w in ws],
            "lost_s": [w.lost_s for w in ws],  # block + steps' excess over the mean step right before the save
            "lost_median_s": [w.lost_median_s for w in ws],  # the old, upward-biased estimate
            "null_s": [w.null_s for w in ws],  # its bias: what it gives a save that costs nothing
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
            "loaded": window_info(windows["loaded"], None),
        },
        "snapshot_bytes": mgr._snapshots.bytes if mgr._snapshots is not None else 0,
        "writer_nice": mgr.writer_nice,
        "options": {k: v for k, v in options.items()},
        "scenario_s": {"quiet": t_loaded - t_quiet, "loaded": t_end - t_loaded},
        "compare": {
            spec: {
                "options": (compare or {})[spec],
                "async_lost_vs_sync": statistics.median(w.lost_s for w in ws["quiet"]) / s["sync"].median,
                "async_lost_vs_sync_loaded": statistics.median(w.lost_s for w in ws["loaded"])
                / s["sync_loaded"].median,
                "lost_s": [w.lost_s for w in ws["quiet"]],
                "lost_loaded_s": [w.lost_s for w in ws["loaded"]],
                "lost_median_s": [w.lost_median_s for w in ws["quiet"]],
                "lost_median_loaded_s": [w.lost_median_s for w in ws["loaded"]],
                "block_s": [w.block_s for w in ws["quiet"]],
                "background_s": [w.background_s for w in ws["quiet"]],
                "background_loaded_s": [w.background_s for w in ws["loaded"]],
            }
            for spec, ws in other_windows.items()
        },
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

    for k in ("copy", "torch_save", "sync", "first_block", "block"):
        series_row(k)
    ratio_row("async_block_vs_copy", "(block / (copy + 50 ms))")
    ratio_row("async_block_vs_sync", "(time)")
    for k in ("background", "lost", "lost_median"):
        series_row(k)
    ratio_row("async_lost_vs_sync", "(lost / ckptkit sync save)")
    ratio_row("async_lost_vs_sync_median_baseline", "(old estimate)", "async_lost_vs_sync")
    for k in ("step_alone", "step_during"):
        series_row(k)
    ratio_row("step_slowdown_during_save", "(median step time)")
    for k in ("block_threads1", "step_alone_t1", "step_during_t1"):
        series_row(k)
    ratio_row("step_slowdown_during_save_threads1", "(median step time)", "step_slowdown_during_save")
    for k in ("sync_loaded", "block_loaded", "background_loaded", "lost_loaded", "lost_median_loaded"):
        series_row(k)
    ratio_row("async_lost_vs_sync_loaded", "(lost / sync, loaded)")
    ratio_row("async_lost_vs_sync_loaded_median_baseline", "(old estimate)", "async_lost_vs_sync_loaded")
    for k in ("step_alone_loaded", "step_during_loaded"):
        series_row(k)
    ratio_row("step_slowdown_during_save_loaded", "(median step time)", "step_slowdown_during_save")
    return format_table(note, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--size-mib", type=int, default=1024, help="model + AdamW state size in MiB (default 1024)")
    p.add_argument("--steps", type=int, default=20, help="training steps per 'alone' round (default 20)")
    p.add_argument("--writer-nice", type=int, default=None, help="CheckpointManager(writer_nice=N): the "
                   "background writer's priority below training's (default: ckptkit's default)")  # fmt: skip
    p.add_argument("--writer", choices=["thread", "process"], default=None,
                   help="CheckpointManager(writer=...): a thread or a process (default: ckptkit's)")  # fmt: skip
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also measure an async manager with these options (e.g. writer=thread, writer_nice=19 or "
                        "direct_io=0), interleaved with the main one in both scenarios; repeatable")  # fmt: skip
    args = p.parse_args(argv)
    check_common(p, args)
    if args.steps < 1:
        p.error("--steps must be positive")
    args.compare_options = compare_options(p, args.compare)
    return args


def manager_options(args: argparse.Namespace) -> dict[str, Any]:
    """The async manager's options that the command line sets (the others keep ckptkit's defaults)."""
    options: dict[str, Any] = {} if args.writer_nice is None else {"writer_nice": args.writer_nice}
    return options if args.writer is None else {**options, "writer": args.writer}


def compare_repo(path: str, opts: dict[str, Any]) -> str | ckptkit.storage.Repository:
    """The repository of a compared manager: ``direct_io`` is the repository's option, not the manager's."""
    return ckptkit.storage.Repository(path, direct_io=opts["direct_io"]) if "direct_io" in opts else path


def compare_options(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, dict[str, Any]]:
    """``--compare`` specs as manager options, by spec."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        opts: dict[str, Any] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or key not in ("writer", "writer_nice", "direct_io"):
                p.error(f"--compare {spec!r}: expected writer=thread|process, writer_nice=N or direct_io=0|1 items")
            opts[key] = int(value) if key == "writer_nice" else bool(int(value)) if key == "direct_io" else value
        out[spec] = opts
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with scratch_dir(args.dir, "ckptkit-bench-async-") as tmp:
        s, info = measure(tmp, args.size_mib, args.runs, args.warmup, args.steps, manager_options(args),
                          args.compare_options)
    load_after = os.getloadavg()

    ratios = {
        "async_block_vs_copy": s["block"].median / (s["copy"].median + ALLOWANCE_S),
        "async_block_vs_sync": s["block"].median / s["torch_save"].median,
        "step_slowdown_during_save": s["step_during"].median / s["step_alone"].median,
        "step_slowdown_during_save_threads1": s["step_during_t1"].median / s["step_alone_t1"].median,
        "async_lost_vs_sync": s["lost"].median / s["sync"].median,
        "async_lost_vs_sync_loaded": s["lost_loaded"].median / s["sync_loaded"].median,
        "async_lost_vs_sync_median_baseline": s["lost_median"].median / s["sync"].median,
        "async_lost_vs_sync_loaded_median_baseline": s["lost_median_loaded"].median / s["sync_loaded"].median,
        "step_slowdown_during_save_loaded": s["step_during_loaded"].median / s["step_alone_loaded"].median,
    }
    by_min = {  # each series' fastest round: an estimate of the code's cost when nothing else is in the way
        "async_block_vs_copy": s["block"].best / (s["copy"].best + ALLOWANCE_S),
        "async_block_vs_sync": s["block"].best / s["torch_save"].best,
        "async_lost_vs_sync": s["lost"].best / s["sync"].best,
        "async_lost_vs_sync_loaded": s["lost_loaded"].best / s["sync_loaded"].best,
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
        "manager_options": info["options"],
        "compare": info["compare"],
        "scenario_s": info["scenario_s"],
        "loadavg_before": list(load_before),  # 1, 5 and 15 minutes, as uptime prints them
        "loadavg_after": list(load_after),
        **machine(load_before),
        "dir": args.dir,
    }

    def text() -> str:
        note = (
            f"state {info['state_bytes'] / MiB:.0f} MiB ({result['model']}), training model "
            f"{result['training_model']}, median of {args.runs} interleaved rounds, local disk under {args.dir}, "
            f"torch threads {info['torch_threads']}, writer_nice {info['writer_nice']}, options "
            f"{info['options'] or 'default'}, {load_note(load_before)} (1/5/15-min "
            f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after); "
            f"quiet scenario {info['scenario_s']['quiet']:.0f} s, loaded {info['scenario_s']['loaded']:.0f} s"
        )
        lines = [table(s, ratios, note)]
        for k, w in info["windows"].items():
            lines.append(f"during-save windows ({k}): steps per save {w['steps_during']}, training time lost per "
                         f"save {w['train_time_lost_per_save_s']:.2f} s, process CPU "
                         f"{w['process_cpu_cores_busy']:.2f} of {os.cpu_count()} cores busy; the old estimate's "
                         f"bias (a free save) {statistics.median(w['null_s']):.2f} s per save")  # fmt: skip
        for spec, c in info["compare"].items():
            old = (statistics.median(c["lost_median_s"]) / result["series"]["sync"]["median_s"],
                   statistics.median(c["lost_median_loaded_s"]) / result["series"]["sync_loaded"]["median_s"])
            lines.append(f"compared, {spec}: async_lost_vs_sync {c['async_lost_vs_sync']:.3f} (old estimate "
                         f"{old[0]:.3f}; lost "
                         f"{statistics.median(c['lost_s']):.2f} s, committed after "
                         f"{statistics.median(c['background_s']):.2f} s), loaded "
                         f"{c['async_lost_vs_sync_loaded']:.3f} (old estimate {old[1]:.3f}; lost "
                         f"{statistics.median(c['lost_loaded_s']):.2f} s, "
                         f"committed after {statistics.median(c['background_loaded_s']):.2f} s)")  # fmt: skip
        return "\n".join(lines)

    emit(result, args.json, text)
    return result


if __name__ == "__main__":
    main()
