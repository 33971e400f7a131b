"""Round trips of every kind of state a training loop keeps, through a real repository."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import safetensors
import torch

import ckptkit
from ckptkit.errors import StateMismatchError, UnsupportedStateError
from ckptkit.storage import Repository

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2]  # fmt: skip


def _make(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    base = torch.randn(shape) * 10
    if dtype == torch.bool:
        return base > 0
    if dtype == torch.complex64:
        return torch.complex(base, -base)
    if not dtype.is_floating_point:
        return base.abs().to(torch.int64).to(dtype)
    return base.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1 and a.dtype.is_floating_point:  # fp8 has no equality kernel: compare bytes
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (0,), (), (2, 0, 3), (7,)], ids=str)
def test_every_dtype_and_shape_round_trips_bit_exact(repo_url: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _make(dtype, shape)
    ckptkit.save(repo_url, {"extra": {"t": t}}, "a", rng=False)
    out = ckptkit.restore(repo_url, {}, "a", rng=False).values["extra"]["t"]
    assert _same(out, t)


def test_non_contiguous_and_views_round_trip(repo_url: str) -> None:
    base = torch.randn(6, 8)
    values = {"t": base.t(), "slice": base[::2, 1::3], "expanded": torch.randn(3, 1).expand(3, 4)}
    ckptkit.save(repo_url, {"v": values}, "a", rng=False)
    out = ckptkit.restore(repo_url, {}, "a", rng=False).values["v"]
    for k, t in values.items():
        assert torch.equal(out[k], t) and out[k].is_contiguous()


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.body = torch.nn.Linear(16, 16)
        self.decoder = torch.nn.Linear(16, 50, bias=False)
        self.decoder.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_stay_tied(repo_url: str) -> None:
    model = Tied()
    m = ckptkit.save(repo_url, {"model": model}, "a", rng=False)
    comp = m.components["model"]
    assert comp.aliases == {"decoder.weight": "embed.weight"}
    assert "decoder.weight" not in comp.tensors
    fresh = Tied()
    ckptkit.restore(repo_url, {"model": fresh}, "a")
    assert fresh.decoder.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


class Net(torch.nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 32))
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_unchanged_modules_produce_byte_identical_objects(repo_url: str) -> None:
    torch.manual_seed(0)
    model = Net()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    first = ckptkit.save(repo_url, {"model": model, "optimizer": opt}, "a", rng=False)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    second = ckptkit.save(repo_url, {"model": model, "optimizer": opt}, "b", rng=False)
    objs_a = {k: r.object for k, r in first.components["model"].tensors.items()}
    objs_b = {k: r.object for k, r in second.components["model"].tensors.items()}
    frozen = [k for k in objs_a if k.startswith("backbone.0") or k.startswith("backbone.2")]
    assert frozen and all(objs_a[k] == objs_b[k] for k in frozen)
    assert objs_a["head.weight"] != objs_b["head.weight"]
    # With a small object size each module gets its own object: changing one module rewrites only its object.
    tiny = Net()
    a = ckptkit.save(repo_url, {"model": tiny}, "c", rng=False, object_size=256)
    with torch.no_grad():
        tiny.backbone[2].weight.add_(1)
    b = ckptkit.save(repo_url, {"model": tiny}, "d", rng=False, object_size=256)
    changed = {k for k, r in a.components["model"].tensors.items() if b.components["model"].tensors[k].object != r.object}
    assert changed == {"backbone.2.weight"}  # its bias, unchanged, sits in an object of its own


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop,
                                     torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
                                     torch.optim.Adadelta, torch.optim.ASGD, torch.optim.Rprop])  # fmt: skip
def test_optimizer_with_param_groups_round_trips_and_continues_identically(repo_url: str, opt_cls: Any) -> None:
    torch.manual_seed(0)
    model = Net()
    groups = [{"params": list(model.backbone.parameters()), "lr": 1e-3},
              {"params": list(model.head.parameters()), "lr": 1e-2}]  # fmt: skip
    kwargs: dict[str, Any] = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(groups, **kwargs)
    _train(model, opt)
    ckptkit.save(repo_url, {"model": model, "optimizer": opt}, "a")
    torch.manual_seed(1)
    model2 = Net()
    opt2 = opt_cls([{"params": list(model2.backbone.parameters()), "lr": 5.0},
                    {"params": list(model2.head.parameters()), "lr": 5.0}], **kwargs)  # fmt: skip
    ckptkit.restore(repo_url, {"model": model2, "optimizer": opt2}, "a")
    assert [g["lr"] for g in opt2.param_groups] == [1e-3, 1e-2]
    _train(model, opt, 2)
    ckptkit.restore(repo_url, {"model": model2, "optimizer": opt2}, "a")  # RNG restored: same batches as `model`
    _train(model2, opt2, 2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_is_keyed_by_parameter_name_not_position(repo_url: str) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt)
    ckptkit.save(repo_url, {"model": model, "optimizer": opt}, "a")
    model2 = Net()
    params = dict(model2.named_parameters())
    opt2 = torch.optim.AdamW([params[n] for n in reversed(list(params))])  # same parameters, reversed order
    ckptkit.restore(repo_url, {"model": model2, "optimizer": opt2}, "a")
    names1 = dict(model.named_parameters())
    for name, p in model2.named_parameters():
        s1, s2 = opt.state[names1[name]], opt2.state[p]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert s2["step"].dtype == s1["step"].dtype == torch.float32


def _schedulers(opt: torch.optim.Optimizer) -> dict[str, Any]:
    S = torch.optim.lr_scheduler
    return {
        "StepLR": lambda: S.StepLR(opt, 3, 0.5),
        "MultiStepLR": lambda: S.MultiStepLR(opt, [2, 5], 0.3),
        "ConstantLR": lambda: S.ConstantLR(opt, 0.5, 4),
        "LinearLR": lambda: S.LinearLR(opt, 0.1, 1.0, 5),
        "ExponentialLR": lambda: S.ExponentialLR(opt, 0.9),
        "PolynomialLR": lambda: S.PolynomialLR(opt, 10, 2.0),
        "CosineAnnealingLR": lambda: S.CosineAnnealingLR(opt, 10),
        "CosineAnnealingWarmRestarts": lambda: S.CosineAnnealingWarmRestarts(opt, 3, 2),
        "CyclicLR": lambda: S.CyclicLR(opt, 0.01, 0.1, 2, mode="exp_range", gamma=0.9),
        "OneCycleLR": lambda: S.OneCycleLR(opt, 0.1, total_steps=20),
        "LambdaLR": lambda: S.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
        "MultiplicativeLR": lambda: S.MultiplicativeLR(opt, lambda e: 0.95),
        "SequentialLR": lambda: S.SequentialLR(opt, [S.LinearLR(opt, 0.1, 1.0, 3), S.CosineAnnealingLR(opt, 10)], [3]),
        "ChainedScheduler": lambda: S.ChainedScheduler([S.ConstantLR(opt, 0.5, 3), S.ExponentialLR(opt, 0.9)]),
        "ReduceLROnPlateau": lambda: S.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    }


SCHEDULERS = list(_schedulers(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)))


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_every_lr_scheduler_resumes_with_the_same_lr_sequence(repo_url: str, kind: str) -> None:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, _schedulers(opt)[kind]()

    def step(opt: torch.optim.Optimizer, sched: Any, i: int) -> float:
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a loss that never improves: the LR gets reduced
        else:
            sched.step()
        return float(opt.param_groups[0]["lr"])

    model, opt, sched = build()
    for i in range(4):
        step(opt, sched, i)
    ckptkit.save(repo_url, {"model": model, "optimizer": opt, "scheduler": sched}, "a", rng=False)
    expected = [step(opt, sched, i) for i in range(4, 12)]
    model2, opt2, sched2 = build()
    ckptkit.restore(repo_url, {"model": model2, "optimizer": opt2, "scheduler": sched2}, "a", rng=False)
    assert getattr(sched2, "last_epoch", 4) == 4 or kind == "ReduceLROnPlateau"
    assert [step(opt2, sched2, i) for i in range(4, 12)] == expected


def test_grad_scaler_round_trips(repo_url: str) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    ckptkit.save(repo_url, {"model": model, "optimizer": opt, "scaler": scaler}, "a")
    scaler2 = torch.amp.GradScaler("cpu")
    ckptkit.restore(repo_url, {"scaler": scaler2}, "a", strict=False)
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.get_scale() == scaler.get_scale() != 2.0**16


def test_process_rng_is_restored(repo_url: str) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckptkit.save(repo_url, {}, "a")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    result = ckptkit.restore(repo_url, {}, "a")
    assert not any("RNG" in i for i in result.fidelity.issues)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected


class EMA:
    """A Stateful object as users write them: an EMA of the weights plus some bookkeeping."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shadow = {k: v.clone() for k, v in model.state_dict().items()}
        self.decay = 0.99
        self.updates = 0
        self.history: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "decay": self.decay, "updates": self.updates, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        self.decay, self.updates, self.history = state["decay"], state["updates"], state["history"]


def test_stateful_objects_and_values_round_trip(repo_url: str) -> None:
    model = Net()
    ema = EMA(model)
    ema.updates, ema.history = 7, [(1, 0.5), (2, float("nan"))]
    extras = {"best": float("inf"), "ids": {1: "a", 2: "b"}, "blob": b"\x00\xff", "pair": (1, [2, 3]), "none": None,
              "np": np.float32(0.25), "dtype": torch.bfloat16, "$tricky": {"$tensor": "not a tensor"}}  # fmt: skip
    ckptkit.save(repo_url, {"model": model, "ema": ema, "extras": extras}, "a")
    ema2 = EMA(Net())
    out = ckptkit.restore(repo_url, {"ema": ema2}, "a", strict=False)
    assert ema2.updates == 7 and ema2.history[0] == (1, 0.5) and np.isnan(ema2.history[1][1])
    assert all(torch.equal(ema2.shadow[k], v) for k, v in ema.shadow.items())
    got = out.values["extras"]
    assert got["best"] == float("inf") and got["ids"] == {1: "a", 2: "b"} and got["blob"] == b"\x00\xff"
    assert got["pair"] == (1, [2, 3]) and got["none"] is None and got["dtype"] is torch.bfloat16
    assert got["np"] == np.float32(0.25) and isinstance(got["np"], np.float32)
    assert got["$tricky"] == {"$tensor": "not a tensor"}


def test_values_that_need_pickle_are_refused_with_their_path(repo_url: str) -> None:
    with pytest.raises(UnsupportedStateError, match=r"extras\.fn"):
        ckptkit.save(repo_url, {"extras": {"fn": lambda x: x}}, "a")
    with pytest.raises(UnsupportedStateError, match=r"extras\.items\[1\]"):
        ckptkit.save(repo_url, {"extras": {"items": [1, object()]}}, "a")
    assert Repository(repo_url).list() == []  # nothing half-committed


def test_mismatched_model_strict_error_and_non_strict_report(repo_url: str) -> None:
    ckptkit.save(repo_url, {"model": Net(classes=3)}, "a")
    other = Net(classes=5)
    other.extra = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateMismatchError) as err:
        ckptkit.restore(repo_url, {"model": other}, "a")
    msg = str(err.value)
    assert "head.weight saved [3, 32] vs model [5, 32]" in msg and "extra.weight" in msg and "strict=False" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing loaded
    result = ckptkit.restore(repo_url, {"model": other}, "a", strict=False)
    report = result.reports["model"]
    assert set(report.mismatched) == {"head.weight", "head.bias"}
    assert set(report.missing) == {"extra.weight", "extra.bias"}
    assert not torch.equal(other.backbone[0].weight, before["backbone.0.weight"])  # what fits was loaded
    assert torch.equal(other.head.weight, before["head.weight"])


def test_component_absent_or_of_another_kind_is_a_clear_error(repo_url: str) -> None:
    model = Net()
    ckptkit.save(repo_url, {"model": model}, "a")
    with pytest.raises(StateMismatchError, match="not in checkpoint"):
        ckptkit.restore(repo_url, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1)}, "a")
    with pytest.raises(StateMismatchError, match="saved as a model"):
        ckptkit.restore(repo_url, {"model": {"not": "a model"}}, "a")


def test_objects_are_safetensors_and_manifests_json_nothing_pickled(repo_url: str, tmp_path: Any) -> None:
    if not repo_url.startswith("/"):
        pytest.skip("inspects files on local disk")
    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    ckptkit.save(repo_url, {"model": model, "optimizer": opt, "x": {"a": (1, 2)}}, "a")
    import json
    import pathlib

    root = pathlib.Path(repo_url)
    for f in (root / "objects").rglob("*"):
        if f.is_file():
            with safetensors.safe_open(str(f), framework="pt") as st:
                assert list(st.keys())
            assert not f.read_bytes().startswith((b"\x80", b"PK"))  # no pickle protocol, no torch zip
    for f in (root / "checkpoints").glob("*.json"):
        json.loads(f.read_bytes())


def test_save_refuses_bad_arguments(repo_url: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        ckptkit.save(repo_url, {"rng": 1}, "a")
    with pytest.raises(TypeError, match="mapping"):
        ckptkit.save(repo_url, [torch.nn.Linear(1, 1)], "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="object_size"):
        ckptkit.save(repo_url, {}, "a", object_size=0)


def test_hparams_that_json_cannot_hold_are_a_typed_error(repo_url: str) -> None:
    from ckptkit.errors import ManifestError

    for bad in ({"x": float("inf")}, {"x": "\ud800"}):
        with pytest.raises(ManifestError, match="standard JSON"):
            ckptkit.save(repo_url, {}, "a", hparams=bad)
    assert Repository(repo_url).list() == []
