"""Worker for tests/test_crash.py: saves a large, step-determined state in a loop until it is SIGKILLed.

Run as ``python crash_worker.py URL``, it is a fork server (tests/forkserver.py: importing torch takes seconds;
forking takes milliseconds, and the test runs many trials): it imports everything, then starts a saver per "go" on
stdin. The saver prints "ready <step>" when it is about to save its first checkpoint (the step after the
repository's latest) and "committed <step>" after each commit. ``python crash_worker.py --saver URL`` runs one
saver directly.

The state saved at step ``k`` is a pure function of ``k`` (:func:`expected_state`), so the test recomputes
what any checkpoint must hold from the ``progress.global_step`` in its manifest. The test imports this file
for :func:`build_model` and :func:`expected_state`, so the two sides cannot drift apart.

After each commit the saver deletes all but the newest :data:`KEEP` checkpoints (a retention policy), so
the repository stays small across many trials and deleted checkpoints leave orphan objects for gc.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import forkserver

LAYERS = 8
WIDTH = 1024  # 8 x Linear(1024, 1024): 32 MiB of fp32 parameters, 64 MiB more of AdamW moments
OBJECT_SIZE = 8 << 20  # so each save writes ~13 objects
KEEP = 3
MAX_STEPS_PER_RUN = 200  # a saver the test failed to kill still ends


def build_model() -> torch.nn.Sequential:
    """The model, without spending time on random initialisation (every value is overwritten anyway)."""
    layers = [torch.nn.utils.skip_init(torch.nn.Linear, WIDTH, WIDTH) for _ in range(LAYERS)]
    return torch.nn.Sequential(*layers)


@functools.cache
def _base(numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32).remainder_(1009.0).mul_(1e-3)


def _pattern(k: int, i: int, shape: torch.Size, which: int) -> torch.Tensor:
    base = _base(shape.numel())
    return base.add(float(k) + 0.01 * i + 1000.0 * which).reshape(shape)


def expected_state(k: int, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What the saver saves at step ``k``: parameters and AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``),
    each keyed by parameter name. Deterministic and bit-exact for a given ``k``; different for every ``k``."""
    out: dict[str, dict[str, torch.Tensor]] = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for i, (name, p) in enumerate(model.named_parameters()):
        out["param"][name] = _pattern(k, i, p.shape, 0)
        out["exp_avg"][name] = _pattern(k, i, p.shape, 1)
        out["exp_avg_sq"][name] = _pattern(k, i, p.shape, 2)
        out["step"][name] = torch.tensor(float(k))
    return out


def set_state(k: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Put the model and optimizer into the state of step ``k``."""
    exp = expected_state(k, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(exp["param"][name])
            opt.state[p] = {
                "step": exp["step"][name],
                "exp_avg": exp["exp_avg"][name],
                "exp_avg_sq": exp["exp_avg_sq"][name],
            }


def saver(url: str) -> None:
    """Save checkpoints step-<k> for k = latest + 1, latest + 2, ... until killed."""
    import ckptkit
    from ckptkit.api import checkpoints
    from ckptkit.schema import Progress
    from ckptkit.storage import Repository

    torch.set_num_threads(1)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    existing = checkpoints(url)
    start = existing[-1].progress.global_step + 1 if existing else 1
    set_state(start, model, opt)
    print(f"ready {start}", flush=True)
    repo = Repository(url)
    for k in range(start, start + MAX_STEPS_PER_RUN):
        if k != start:
            set_state(k, model, opt)
        ckptkit.save(url, {"model": model, "optimizer": opt}, name=f"step-{k:06d}",
                     progress=Progress(global_step=k), object_size=OBJECT_SIZE)  # fmt: skip
        print(f"committed {k}", flush=True)
        for old in sorted(repo.list())[:-KEEP]:  # names are zero-padded: sorted by name is sorted by step
            repo.delete(old)


def server(url: str) -> None:
    import ckptkit  # noqa: F401 - imported here so forked savers start instantly

    forkserver.serve(url, saver, [sys.executable, __file__, "--saver", url])


if __name__ == "__main__":
    if sys.argv[1] == "--saver":
        saver(sys.argv[2])
    else:
        server(sys.argv[1])
