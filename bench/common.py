"""What the benchmarks in bench/ share: interleaved rounds, targets, the table, the scratch directory, the CLI."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".bench-tmp"
Targets = dict[str, tuple[str, float]]  # key -> (comparison, bound)
Row = tuple[str, str, str, str, str, str]  # name, median_s, GB/s, ratio, target, pass
HEADER: Row = ("name", "median_s", "GB/s", "ratio", "target", "pass")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Series:
    """Timings of one measured quantity (seconds), one or many per round, and the bytes each one moved."""

    key: str
    label: str
    times: list[float] = field(default_factory=list)
    nbytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median / 1e9 if self.nbytes else math.nan


def _not_runnable(i: int) -> tuple[float, int]:
    raise TypeError("a Method needs run=")


@dataclass
class Method(Series):
    """A benchmarked operation: ``run(i)`` does it once and returns (seconds, bytes moved)."""

    run: Callable[[int], tuple[float, int]] = field(default=_not_runnable, kw_only=True)


def method_calls(methods: list[Method]) -> list[Callable[[bool], None]]:
    """One call per method for :func:`interleaved_rounds`, recording its timing when the round is timed; every
    call gets a number of its own (for fresh file and prefix names)."""
    counter = iter(range(1 << 62))

    def call(m: Method) -> Callable[[bool], None]:
        def run(timed: bool) -> None:
            dt, n = m.run(next(counter))
            if timed:
                m.times.append(dt)
                m.nbytes = n

        return run

    return [call(m) for m in methods]


def interleaved_rounds(calls: list[Callable[[bool], None]], runs: int, warmup: int) -> None:
    """``warmup`` untimed rounds, then ``runs`` timed ones; each round makes every call once, the first call
    rotating from round to round, after a garbage collection that only scans what the benchmark allocated."""
    gc.collect()
    gc.freeze()
    try:
        for r in range(-warmup, runs):
            shift = r % len(calls)
            for call in calls[shift:] + calls[:shift]:
                gc.collect()
                call(r >= 0)
            log(f"round {r + 1}/{runs}" if r >= 0 else "warm-up round done")
    finally:
        gc.unfreeze()  # frozen objects are never collected, which native extensions report as leaks at exit


def passes(targets: Targets, key: str, value: float) -> bool:
    op, bound = targets[key]
    return value >= bound if op == ">=" else value <= bound


def verdict(targets: Targets, key: str, value: float) -> tuple[str, str]:
    """The target and PASS/FAIL cells of a ratio's row ("-" for a ratio without a target)."""
    if key not in targets:
        return "-", "-"
    op, bound = targets[key]
    return f"{op} {bound:g}", ("PASS" if passes(targets, key, value) else "FAIL")


def method_row(m: Method) -> Row:
    return (m.label, f"{m.median:.3f}", f"{m.gbps:.3f}", "-", "-", "-")


def format_table(note: str, rows: list[Row]) -> str:
    widths = [max(len(HEADER[0]), *(len(r[0]) for r in rows)), 9, 7, 7, 7, 6]

    def fmt(r: Row) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])

    return "\n".join([note, fmt(HEADER), "-" * len(fmt(HEADER)), *(fmt(r) for r in rows)])


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark has: --runs, --warmup, --json, --dir."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--runs", type=int, default=5, help="timed interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help=f"where the temporary directory goes ({DEFAULT_DIR})")
    return p


def check_common(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse non-positive --runs and --size-mib and a negative --warmup."""
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be positive, --warmup non-negative")
    if getattr(args, "size_mib", None) is not None and args.size_mib < 1:
        p.error("--size-mib must be positive")


@contextlib.contextmanager
def scratch_dir(parent: str, prefix: str) -> Iterator[str]:
    """A temporary directory under ``parent``, removed afterwards (and ``parent`` too when this created it)."""
    created = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: something else uses it
                os.rmdir(parent)


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine's CPU count and its 1-minute load average before and after the run (other work on it)."""
    return {"cpu_count": os.cpu_count(), "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]}


def load_note(load_before: tuple[float, float, float]) -> str:
    return f"{os.cpu_count()} CPUs, 1-min load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"


def emit(result: dict[str, Any], as_json: bool, table: Callable[[], str]) -> None:
    """Print the result as one JSON object, or as the table."""
    print(json.dumps(result, indent=2) if as_json else table())
