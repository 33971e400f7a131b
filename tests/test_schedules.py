"""LR-scheduler policies for any torch scheduler (ckptkit.state.schedulers): advance a fresh scheduler to a
checkpoint's position, hold its LR (also across a save and a restore in a new process), extend its total.

Every advanced scheduler is compared with a reference built the same way that stepped the whole way (an
``optimizer.step()`` before each ``scheduler.step()``), exactly: LRs, param groups and scheduler state.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

import ckptkit
from ckptkit.errors import ArgumentTypeError, InvalidArgumentError, ManifestError
from ckptkit.format import encode
from ckptkit.state import advance_scheduler, extend_total, hold_lr, is_held
from ckptkit.state.restore import Saved, prepare_stateful
from ckptkit.state.schedulers import HELD_LR_KEY

ROOT = Path(__file__).resolve().parents[1]


def warmup(step: int) -> float:
    """A linear warmup over 25 steps (LambdaLR)."""
    return min(1.0, (step + 1) / 25)


def make(opt_kind: str = "adamw") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an optimizer with two param groups and optimizer state (one real step taken, grads cleared)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.05}]
    if opt_kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


BUILDERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: L.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[10, 30, 45], gamma=0.3),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=40, eta_min=1e-4),  # 60 > T_max: periodic part
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[0.5, 0.2], total_steps=200),
    "LambdaLR": lambda o: L.LambdaLR(o, warmup),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.1, total_iters=10), L.CosineAnnealingLR(o, T_max=90)], milestones=[10]
    ),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=15), L.ExponentialLR(o, gamma=0.98)]
    ),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=2, factor=0.5),
}


def metric(i: int) -> float:
    return 10.0 / (i + 1)  # improving: ReduceLROnPlateau never reduces


def ref_step(sched: Any, opt: torch.optim.Optimizer, i: int) -> None:
    opt.step()  # no gradients: a no-op on the parameters, but the order torch expects
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(metric(i))
    else:
        sched.step()


def groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        for g in opt.param_groups
    ]


def plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def opt_state(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]


def same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("steps", [0, 1, 37])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_advance_equals_stepping_the_whole_way(kind: str, steps: int) -> None:
    _, ref_opt = make("adamw" if kind != "MultiStepLR" else "sgd")
    ref = BUILDERS[kind](ref_opt)
    for i in range(steps):
        ref_step(ref, ref_opt, i)
    _, opt = make("adamw" if kind != "MultiStepLR" else "sgd")
    sched = BUILDERS[kind](opt)
    before = opt_state(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "lr_scheduler.step() before optimizer.step()" warning is kept inside
        issues = advance_scheduler(sched, steps)
    assert same_state(opt_state(opt), before), "optimizer state tensors changed"
    assert groups(opt) == groups(ref_opt)
    assert getattr(sched, "last_epoch", None) == getattr(ref, "last_epoch", None)  # ChainedScheduler has none
    assert plain(sched.get_last_lr()) == plain(ref.get_last_lr())
    if kind == "ReduceLROnPlateau":
        assert (
            (len(issues) == 1 and "metric values" in issues[0] and "not replayed" in issues[0])
            if steps
            else issues == []
        )
    else:
        assert issues == []
        assert plain(sched.state_dict()) == plain(ref.state_dict())  # inner schedulers of Sequential/Chained too
    for i in range(steps, steps + 20):
        ref_step(ref, ref_opt, i)
        ref_step(sched, opt, i)
        assert groups(opt) == groups(ref_opt), f"step {i + 1}"
        assert plain(sched.get_last_lr()) == plain(ref.get_last_lr())


@pytest.mark.parametrize("kind", ["StepLR", "CosineAnnealingLR", "SequentialLR", "LambdaLR"])
def test_advance_by_epochs(kind: str) -> None:
    """A scheduler stepped once per epoch (3 optimizer steps each), moved to epoch 100."""
    build = {
        "StepLR": lambda o: L.StepLR(o, step_size=30, gamma=0.1),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=120),
        "SequentialLR": BUILDERS["SequentialLR"],
        "LambdaLR": BUILDERS["LambdaLR"],
    }[kind]
    _, ref_opt = make()
    ref = build(ref_opt)
    for _epoch in range(100):
        for _batch in range(3):
            ref_opt.step()
        ref.step()
    _, opt = make()
    sched = build(opt)
    before = opt_state(opt)
    assert advance_scheduler(sched, 100) == []
    assert same_state(opt_state(opt), before)
    assert sched.last_epoch == 100 and groups(opt) == groups(ref_opt)
    assert plain(sched.state_dict()) == plain(ref.state_dict())
    for _epoch in range(20):
        for _batch in range(3):
            ref_opt.step()
            opt.step()
        ref.step()
        sched.step()
        assert groups(opt) == groups(ref_opt)


def test_advance_long_lambda_and_numpy_int() -> None:
    import numpy as np

    _, opt = make()
    sched = L.LambdaLR(opt, warmup)
    assert advance_scheduler(sched, np.int64(5000)) == []
    assert sched.last_epoch == 5000 and opt.param_groups[0]["lr"] == 0.1 * warmup(5000)


def test_advance_onecycle_to_its_total_and_not_beyond() -> None:
    _, opt = make()
    sched = L.OneCycleLR(opt, max_lr=0.5, total_steps=50)
    assert advance_scheduler(sched, 50) == []  # torch steps a OneCycleLR up to total_steps, not one more
    _, opt = make()
    sched = L.OneCycleLR(opt, max_lr=0.5, total_steps=50)
    lrs = groups(opt)
    with pytest.raises(InvalidArgumentError, match=r"total_steps=50.*position 51"):
        advance_scheduler(sched, 51)
    assert sched.last_epoch == 0 and groups(opt) == lrs  # refused before anything moved


def test_advance_onecycle_inside_sequential() -> None:
    _, opt = make()
    sched = L.SequentialLR(
        opt,
        [L.LinearLR(opt, start_factor=0.5, total_iters=5), L.OneCycleLR(opt, max_lr=0.5, total_steps=30)],
        milestones=[10],
    )
    assert advance_scheduler(sched, 40) == []  # the OneCycleLR at its step 30
    _, opt = make()
    sched = L.SequentialLR(
        opt,
        [L.LinearLR(opt, start_factor=0.5, total_iters=5), L.OneCycleLR(opt, max_lr=0.5, total_steps=30)],
        milestones=[10],
    )
    with pytest.raises(InvalidArgumentError, match=r"_schedulers\[1\] is a OneCycleLR of total_steps=30"):
        advance_scheduler(sched, 41)


class Exploding:
    def __call__(self, step: int) -> float:
        if step == 5:
            raise RuntimeError("boom")
        return 1.0 / (step + 1)


def test_advance_that_fails_leaves_the_scheduler_as_it_was() -> None:
    _, opt = make()
    sched = L.LambdaLR(opt, Exploding())
    lrs, state = groups(opt), plain(sched.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        advance_scheduler(sched, 10)
    assert groups(opt) == lrs and plain(sched.state_dict()) == state


def test_advance_errors() -> None:
    _, opt = make()
    with pytest.raises(ArgumentTypeError, match=r"must be a torch\.optim\.lr_scheduler scheduler.*AdamW"):
        advance_scheduler(opt, 3)
    sched = L.StepLR(opt, step_size=3)
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(InvalidArgumentError, match="steps must be a non-negative int"):
            advance_scheduler(sched, bad)  # type: ignore[arg-type]
    opt.step()
    sched.step()
    with pytest.raises(InvalidArgumentError, match=r"must be freshly built.*last_epoch=1.*build the StepLR again"):
        advance_scheduler(sched, 3)
    _, opt = make()
    inner = L.ExponentialLR(opt, gamma=0.9)
    opt.step()
    inner.step()
    chained = L.ChainedScheduler([inner, L.ConstantLR(opt, factor=0.5)])
    with pytest.raises(InvalidArgumentError, match=r"scheduler._schedulers\[0\] \(ExponentialLR\)"):
        advance_scheduler(chained, 3)
    _, opt = make()
    plateau = L.ReduceLROnPlateau(opt)
    plateau.step(1.0)
    with pytest.raises(InvalidArgumentError, match="freshly built"):
        advance_scheduler(plateau, 3)


# --- hold_lr -------------------------------------------------------------------------------------------------

HOLD = [
    "StepLR",
    "CosineAnnealingLR",
    "OneCycleLR",
    "LambdaLR",
    "SequentialLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
]


def worse(i: int) -> float:
    return float(i + 1)  # a worsening metric: an unheld ReduceLROnPlateau would reduce every few steps


def step_held(sched: Any, opt: torch.optim.Optimizer, i: int) -> None:
    opt.step()
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(worse(i))
    else:
        sched.step()


@pytest.mark.parametrize("kind", HOLD)
def test_hold_keeps_the_lr_and_counts(kind: str) -> None:
    _, opt = make()
    sched = BUILDERS[kind](opt)
    for i in range(12):
        step_held(sched, opt, i)
    lrs = groups(opt)
    inner = [s.last_epoch for s in getattr(sched, "_schedulers", [])]
    hold_lr(sched)
    hold_lr(sched)  # idempotent
    assert is_held(sched) and type(sched).__name__ == f"Held{kind}" and isinstance(sched, getattr(L, kind))
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lrs[0]["lr"], lrs[1]["lr"]  # (building one moved them)
    start = sched.last_epoch
    for i in range(50):
        step_held(sched, opt, i)
        assert groups(opt) == lrs
        assert plain(sched.get_last_lr()) == [g["lr"] for g in lrs]
    assert sched.last_epoch == start + 50
    assert [s.last_epoch for s in getattr(sched, "_schedulers", [])] == inner  # children are not stepped
    state = sched.state_dict()
    assert state[HELD_LR_KEY] is True
    json.dumps(encode(state, "scheduler").json)  # the state stays JSON: no functions in the held scheduler


def test_hold_errors_and_is_held() -> None:
    _, opt = make()
    with pytest.raises(ArgumentTypeError, match="hold_lr: scheduler must be"):
        hold_lr(opt)
    assert not is_held(opt) and not is_held(L.StepLR(opt, 3))


def test_held_state_restores_held_in_process() -> None:
    _, opt = make()
    sched = L.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    hold_lr(sched)
    saved = Saved("scheduler", *_encoded(sched.state_dict()), {}, None, {})
    _, opt2 = make()
    fresh = L.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    prepare_stateful("scheduler", fresh, saved)()
    assert is_held(fresh) and fresh.last_epoch == 3 and HELD_LR_KEY not in fresh.__dict__
    for _ in range(10):
        opt2.step()
        fresh.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and fresh.last_epoch == 13


def _encoded(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    enc = encode(state, "scheduler")
    return enc.json, enc.tensors


def test_held_marker_checked_on_restore() -> None:
    _, opt = make()
    state = L.StepLR(opt, 3).state_dict()
    bad = Saved("scheduler", *_encoded({**state, HELD_LR_KEY: "yes"}), {}, None, {})
    with pytest.raises(ManifestError, match=f"state.{HELD_LR_KEY}: expected true or false"):
        prepare_stateful("scheduler", L.StepLR(opt, 3), bad)

    class Counter:
        def state_dict(self) -> dict[str, Any]:
            return {"n": 1}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    held = Saved("scheduler", *_encoded({"n": 1, HELD_LR_KEY: True}), {}, None, {})
    with pytest.raises(ManifestError, match="only a torch LR scheduler can be"):
        prepare_stateful("scheduler", Counter(), held)  # type: ignore[arg-type]
    unheld = Saved("scheduler", *_encoded({**state, HELD_LR_KEY: False}), {}, None, {})
    fresh = L.StepLR(opt, 3)
    prepare_stateful("scheduler", fresh, unheld)()
    assert not is_held(fresh) and HELD_LR_KEY not in fresh.__dict__


RESTORE = """
import json, sys
import torch
from torch.optim import lr_scheduler as L
import ckptkit
from ckptkit.state import is_held

torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer's lazy imports, while the test runs
job = json.loads(sys.stdin.readline())
out = {}
for kind in job["kinds"]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.05}],
                            lr=0.1, weight_decay=0.01)
    sched = {
        "SequentialLR": lambda: L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.1, total_iters=10),
                                                     L.CosineAnnealingLR(opt, T_max=90)], milestones=[10]),
        "ChainedScheduler": lambda: L.ChainedScheduler([L.ConstantLR(opt, factor=0.5, total_iters=15),
                                                        L.ExponentialLR(opt, gamma=0.98)]),
        "ReduceLROnPlateau": lambda: L.ReduceLROnPlateau(opt, patience=2, factor=0.5),
        "OneCycleLR": lambda: L.OneCycleLR(opt, max_lr=[0.5, 0.2], total_steps=200),
    }[kind]()
    assert not is_held(sched)
    ckptkit.restore(job["repo"] + "/" + kind, {"model": model, "optimizer": opt, "scheduler": sched}, "a", rng=False)
    lrs, epochs = [], [sched.last_epoch]
    for i in range(50):
        opt.step()
        if isinstance(sched, L.ReduceLROnPlateau):
            sched.step(float(i + 1))
        else:
            sched.step()
        lrs.append([float(g["lr"]) for g in opt.param_groups])
    epochs.append(sched.last_epoch)
    out[kind] = {"held": is_held(sched), "type": type(sched).__name__, "lrs": lrs, "epochs": epochs}
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def fresh_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """A fresh interpreter for the restore, started with the module: it imports torch while the other tests run,
    then restores what the test sends it (the held classes do not exist there before the restore)."""
    script = tmp_path_factory.mktemp("fresh") / "restore.py"
    script.write_text(textwrap.dedent(RESTORE))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_held_scheduler_survives_save_and_restore_in_a_fresh_process(
    tmp_path: Path, fresh_process: subprocess.Popen[str]
) -> None:
    kinds = ["SequentialLR", "ChainedScheduler", "ReduceLROnPlateau", "OneCycleLR"]
    expected = {}
    for kind in kinds:
        model, opt = make()
        sched = BUILDERS[kind](opt)
        for i in range(12):
            step_held(sched, opt, i)
        hold_lr(sched)
        expected[kind] = ([float(g["lr"]) for g in opt.param_groups], sched.last_epoch)
        ckptkit.save(
            str(tmp_path / "repo" / kind), {"model": model, "optimizer": opt, "scheduler": sched}, "a", rng=False
        )
        assert (
            ckptkit.inspect(str(tmp_path / "repo" / kind), "a").components["scheduler"].type
            == f"torch.optim.lr_scheduler.Held{kind}"
        )
    out, err = fresh_process.communicate(
        json.dumps({"repo": str(tmp_path / "repo"), "kinds": kinds}) + "\n", timeout=120
    )
    assert fresh_process.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    for kind in kinds:
        lrs, epoch = expected[kind]
        assert got[kind]["held"] and got[kind]["type"] == f"Held{kind}", kind
        assert all(step == lrs for step in got[kind]["lrs"]), kind
        assert got[kind]["epochs"] == [epoch, epoch + 50], kind


# --- extend_total --------------------------------------------------------------------------------------------


def lrs_of(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def run_to(sched: Any, opt: torch.optim.Optimizer, end: int) -> list[list[float]]:
    out = []
    while sched.last_epoch < end:
        opt.step()
        sched.step()
        out.append(lrs_of(opt))
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("at", [30, 65])  # inside the old cosine, and past its T_max (where it rises again)
def test_extend_cosine(at: int) -> None:
    _, opt = make()
    eta = 1e-3
    sched = L.CosineAnnealingLR(opt, T_max=50, eta_min=eta)
    advance_scheduler(sched, at)
    before = lrs_of(opt)
    assert extend_total(sched, 200) == {"total_steps": [50, 200]}
    assert lrs_of(opt) == before and sched.T_max == 200
    path = run_to(sched, opt, 200)
    for g in range(2):
        seq = [before[g]] + [p[g] for p in path]
        assert all(b <= a for a, b in itertools.pairwise(seq)), "not monotone"
        for t, lr in zip(range(at + 1, 201), seq[1:], strict=True):  # the cosine through the current LR
            want = eta + (before[g] - eta) * (1 + math.cos(math.pi * t / 200)) / (1 + math.cos(math.pi * at / 200))
            assert rel(lr, want) < 1e-9
        assert rel(seq[-1], eta) < 1e-9
        # no jump: the first step after extending is a small one (compared with a cosine of the same length)
        assert 0 <= seq[0] - seq[1] <= (before[g] - eta) * 0.05


def test_extend_polynomial() -> None:
    _, opt = make()
    sched = L.PolynomialLR(opt, total_iters=40, power=2.0)
    advance_scheduler(sched, 10)
    before = lrs_of(opt)
    assert extend_total(sched, 100) == {"total_steps": [40, 100]}
    path = run_to(sched, opt, 100)
    for g in range(2):
        seq = [before[g]] + [p[g] for p in path]
        assert all(b <= a for a, b in itertools.pairwise(seq))
        for t, lr in zip(range(11, 101), seq[1:], strict=True):
            assert rel(lr, before[g] * ((100 - t) / 90) ** 2) < 1e-9 or abs(lr) < 1e-15
        assert seq[-1] == 0.0
    _, opt = make()
    done = L.PolynomialLR(opt, total_iters=5)
    advance_scheduler(done, 8)
    with pytest.raises(InvalidArgumentError, match="ended at step 5 with an LR of 0"):
        extend_total(done, 20)


@pytest.mark.parametrize(
    ("start", "end", "iters", "at", "total"),
    [
        (1.0, 0.1, 40, 20, 100),
        (0.1, 1.0, 20, 5, 50),
        (0.5, 0.0, 30, 10, 60),
        (1.0, 0.1, 40, 20, 30),
        (0.1, 1.0, 10, 15, 40),
    ],
)
def test_extend_linear(start: float, end: float, iters: int, at: int, total: int) -> None:
    _, opt = make()
    base = lrs_of(opt)
    sched = L.LinearLR(opt, start_factor=start, end_factor=end, total_iters=iters)
    advance_scheduler(sched, at)
    before = lrs_of(opt)
    change = extend_total(sched, total)
    assert change["total_steps"] == [iters, total] and change["start_factor"][0] == start
    assert lrs_of(opt) == before
    path = run_to(sched, opt, total + 10)
    for g in range(2):
        seq = [before[g]] + [p[g] for p in path]
        up = end >= start
        assert all((b >= a - 1e-15) if up else (b <= a + 1e-15) for a, b in itertools.pairwise(seq))
        for t, lr in zip(range(at + 1, total + 1), seq[1:], strict=False):  # the line from here to the end
            want = before[g] + (base[g] * end - before[g]) * (t - at) / (total - at)
            assert abs(lr - want) <= 1e-9 * base[g]
        assert abs(seq[total - at] - base[g] * end) <= 1e-9 * base[g]
        assert seq[-1] == seq[total - at]  # and it stays there after the total
    # torch's closed form (step(epoch=...)) agrees with the new line too
    sched.last_epoch = at
    assert [abs(a - b) < 1e-12 for a, b in zip(sched._get_closed_form_lr(), before, strict=True)] == [True, True]


def test_extend_check_only_changes_nothing() -> None:
    _, opt = make()
    sched = L.LinearLR(opt, start_factor=0.5, total_iters=10)
    advance_scheduler(sched, 4)
    state = plain(sched.state_dict())
    change = extend_total(sched, 50, check_only=True)
    assert change["total_steps"] == [10, 50] and plain(sched.state_dict()) == state
    cosine = L.CosineAnnealingLR(opt, T_max=10)
    assert extend_total(cosine, 30, check_only=True) == {"total_steps": [10, 30]} and cosine.T_max == 10


def test_extend_errors() -> None:
    _, opt = make()
    for sched in (
        L.StepLR(opt, 3),
        L.LambdaLR(opt, warmup),
        L.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        L.SequentialLR(opt, [L.ConstantLR(opt), L.CosineAnnealingLR(opt, T_max=5)], milestones=[3]),
        L.ReduceLROnPlateau(opt),
    ):
        with pytest.raises(
            InvalidArgumentError,
            match=r"'extend' needs a scheduler whose total is known "
            r"\(CosineAnnealingLR, LinearLR, PolynomialLR\).*'keep'.*"
            r"'restart'.*'constant'.*PlannedLR",
        ):
            extend_total(sched, 100)
    with pytest.raises(ArgumentTypeError, match="extend_total: scheduler must be"):
        extend_total({"T_max": 3}, 100)
    cosine = L.CosineAnnealingLR(opt, T_max=10)
    advance_scheduler(cosine, 8)
    for bad in (8, 3):
        with pytest.raises(
            InvalidArgumentError, match=f"total_steps={bad} is not ahead of the CosineAnnealingLR's current step 8"
        ):
            extend_total(cosine, bad)
    for wrong in (True, 12.0, -5):
        with pytest.raises(InvalidArgumentError, match="total_steps must be a non-negative int"):
            extend_total(cosine, wrong)  # type: ignore[arg-type]
    hold_lr(cosine)
    with pytest.raises(InvalidArgumentError, match="held at a constant LR"):
        extend_total(cosine, 100)

    from ckptkit.training import PlannedLR

    with pytest.raises(InvalidArgumentError, match=r"PlannedLR re-plans itself: call its replan\('extend', 100\)"):
        extend_total(PlannedLR(opt, total_steps=10), 100)

    class Custom(L.CosineAnnealingLR):
        def get_lr(self) -> list[float]:  # type: ignore[override]
            return [0.1 for _ in self.optimizer.param_groups]

    with pytest.raises(InvalidArgumentError, match="a Custom is not one"):
        extend_total(Custom(opt, T_max=5), 100)
