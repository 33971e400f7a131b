"""Start-up time of the CLI's listing verbs: ``ckptkit ls`` and ``ckptkit log`` on a repository of 200 checkpoints.

Users run ``ls``, ``show`` and ``log`` in a shell many times; these verbs read manifests only and must not pay
for importing torch (about 4 s here). Each timed call is a fresh process, as in a shell:

* ``cli_ls_s``: wall time of ``ckptkit ls REPO`` (lists and parses every manifest), median of the rounds.
* ``cli_log_s``: wall time of ``ckptkit log REPO`` (walks the latest checkpoint's 200-long chain).
* baselines in the same run: ``python -c pass`` (the interpreter's own start) and ``python -c "import torch"``
  (what every verb paid before).

Targets: each verb under 0.8 s on the 2-core machine.

Run: ``.venv/bin/python bench/cli.py`` (``--json`` for one JSON object, ``--checkpoints N`` to change the size).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Method,
    Targets,
    check_common,
    emit,
    format_table,
    interleaved_rounds,
    load_note,
    log,
    machine,
    method_calls,
    parser,
    scratch_dir,
    verdict,
)

TARGETS: Targets = {"cli_ls_s": ("<=", 0.8), "cli_log_s": ("<=", 0.8)}


def build_repository(url: str, n: int) -> None:
    """``n`` checkpoints of one run (each the parent of the next), with metrics, as a training loop makes them."""
    import torch

    import ckptkit

    model = torch.nn.Linear(16, 16)
    with ckptkit.CheckpointManager(url, {"model": model}, rng=False) as mgr:
        for step in range(1, n + 1):
            with torch.no_grad():
                model.weight.add_(0.01)
            mgr.save(step, metrics={"loss": 1.0 / step})


def timed(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "160"})
    dt = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"bench/cli.py: {' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return dt, 0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--checkpoints", type=int, default=200, help="checkpoints in the repository (default 200)")
    args = p.parse_args()
    check_common(p, args)
    if args.checkpoints < 1:
        p.error("--checkpoints must be positive")
    cli = os.path.join(os.path.dirname(sys.executable), "ckptkit")
    if not os.path.exists(cli):
        raise SystemExit(f"bench/cli.py: no `ckptkit` command beside {sys.executable}: pip install -e .")
    load_before = os.getloadavg()
    with scratch_dir(args.dir, "cli-") as tmp:
        repo = os.path.join(tmp, "repo")
        log(f"writing {args.checkpoints} checkpoints")
        build_repository(repo, args.checkpoints)
        methods = [
            Method("cli_ls_s", "ckptkit ls", run=lambda i: timed([cli, "ls", repo])),
            Method("cli_log_s", "ckptkit log", run=lambda i: timed([cli, "log", repo])),
            Method("python_s", "python -c pass", run=lambda i: timed([sys.executable, "-c", "pass"])),
            Method("import_torch_s", "python -c 'import torch'",
                   run=lambda i: timed([sys.executable, "-c", "import torch"])),
        ]
        interleaved_rounds(method_calls(methods), args.runs, args.warmup)
    by_key = {m.key: m for m in methods}
    result = {
        "checkpoints": args.checkpoints,
        "runs": args.runs,
        **{m.key: m.median for m in methods},
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "pass": {k: verdict(TARGETS, k, by_key[k].median)[1] == "PASS" for k in TARGETS},
        "machine": machine(load_before),
    }

    def table() -> str:
        rows = []
        for m in methods:
            target, ok = verdict(TARGETS, m.key, m.median)
            rows.append((f"{m.key} ({m.label})", f"{m.median:.3f}", "-", "-", target, ok))
        note = (f"CLI start-up on a repository of {args.checkpoints} checkpoints, medians of {args.runs} interleaved "
                f"rounds; {load_note(load_before)}")  # fmt: skip
        return format_table(note, rows)

    emit(result, args.json, table)


if __name__ == "__main__":
    main()
