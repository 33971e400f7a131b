"""mmengine's own objects, checkpointed as mmengine's Runner.save_checkpoint lays them out, imported and restored
into mmengine's own objects: parameter schedulers (mmengine's LinearLR / MultiStepLR are not torch LR schedulers),
the Runner's MessageHub (logged scalars are HistoryBuffer objects, read as plain data) and the optimizer.

mmengine-lite is installed (mmengine's Runner itself needs opencv for its visualizer, which the tests do not
install): the checkpoint dict is built exactly as ``Runner.save_checkpoint`` (mmengine 0.10) builds it, from the
objects' own ``state_dict()`` and mmengine's ``apply_to``, and written with ``torch.save`` as mmengine's
``save_checkpoint`` does for a local path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.errors import ManifestError
from ckptkit.interop.importers import detect_format, import_from

mmengine = pytest.importorskip("mmengine", reason="pip install -e '.[test]' (mmengine-lite) for the mmengine tests")


def _run(name: str, steps: int) -> dict[str, Any]:
    """A tiny mmengine-style run: an OptimWrapper, a LinearLR warm-up then MultiStepLR (by iteration), and a
    MessageHub logging the loss and the LR each iteration, as mmengine's hooks do."""
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import LinearLR, MultiStepLR

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scheds = [LinearLR(wrapper, start_factor=0.1, by_epoch=False, begin=0, end=4),
              MultiStepLR(wrapper, milestones=[6, 8], by_epoch=False, begin=4, end=10)]  # fmt: skip
    hub = MessageHub.get_instance(name)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for it in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        wrapper.update_params(loss)
        for s in scheds:
            s.step()
        hub.update_scalar("train/loss", float(loss))
        hub.update_scalar("train/lr", wrapper.get_lr()["lr"][0])
        hub.update_info("iter", it + 1)
    return {"model": model, "wrapper": wrapper, "scheds": scheds, "hub": hub, "x": x, "y": y}


def _runner_checkpoint(run: dict[str, Any], path: Path) -> None:
    """What Runner.save_checkpoint writes (mmengine/runner/runner.py): meta, state_dict, message_hub, optimizer,
    param_schedulers."""
    from mmengine.utils import apply_to

    checkpoint = {
        "meta": {"epoch": 0, "iter": 5, "cfg": "model = dict(type='Toy')", "seed": 0, "experiment_name": "toy",
                 "time": "20261202_000000", "mmengine_version": mmengine.__version__},
        "state_dict": {k: v.cpu() for k, v in run["model"].state_dict().items()},
        "message_hub": apply_to(run["hub"].state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()),
        "optimizer": apply_to(run["wrapper"].state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()),
        "param_schedulers": [s.state_dict() for s in run["scheds"]],
    }  # fmt: skip
    with open(path, "wb") as f:
        torch.save(checkpoint, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = _run("ckptkit-test-saved", 5)
    path = tmp_path_factory.mktemp("mmengine") / "iter_5.pth"
    _runner_checkpoint(run, path)
    return {"path": path, "run": run}


def test_runner_checkpoint_restores_into_mmengine_schedulers_message_hub_and_optimizer(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    from mmengine.logging import HistoryBuffer

    path, orig = saved["path"], saved["run"]
    assert detect_format(str(path)) == "mmdet"
    repo = str(tmp_path / "repo")
    m = import_from(str(path), repo, model=orig["model"])
    assert {"model", "optimizer", "scheduler", "scheduler_1", "message_hub"} <= set(m.components)
    assert (m.progress.epoch, m.progress.global_step) == (0, 5)
    assert "message_hub" not in (m.lineage.source or {}).get("skipped", {})

    fresh = _run("ckptkit-test-fresh", 0)  # newly built, never stepped
    res = ckptkit.restore(repo, {"model": fresh["model"], "optimizer": fresh["wrapper"].optimizer,
                                 "scheduler": fresh["scheds"][0], "scheduler_1": fresh["scheds"][1],
                                 "message_hub": fresh["hub"]}, rng=False)  # fmt: skip
    assert all(r.ok for r in res.reports.values()), res.reports
    for a, b in zip(fresh["scheds"], orig["scheds"], strict=True):
        assert a.state_dict() == b.state_dict()
    hub, ohub = fresh["hub"], orig["hub"]
    assert set(hub.log_scalars) == {"train/loss", "train/lr"}
    for key in ("train/loss", "train/lr"):
        got, want = hub.get_scalar(key), ohub.get_scalar(key)
        assert isinstance(got, HistoryBuffer)
        assert got.data[0].tolist() == want.data[0].tolist() and got.data[1].tolist() == want.data[1].tolist()
        assert got.mean() == want.mean() and got.current() == want.current()
    assert hub.get_info("iter") == 5

    # Training goes on exactly as the original run would: same LRs, same weights, the hub keeps logging
    for run in (orig, fresh):
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(run["model"](orig["x"]), orig["y"])
            run["wrapper"].update_params(loss)
            for s in run["scheds"]:
                s.step()
            run["hub"].update_scalar("train/loss", float(loss))
    assert fresh["wrapper"].get_lr() == orig["wrapper"].get_lr()
    assert all(torch.equal(a, b) for a, b in zip(fresh["model"].parameters(), orig["model"].parameters(), strict=True))
    assert hub.get_scalar("train/loss").data[0].tolist() == ohub.get_scalar("train/loss").data[0].tolist()


def test_mmengine_objects_save_and_restore_through_ckptkit(tmp_path: Path) -> None:
    """The same objects saved by ckptkit.save itself (a user's own mmengine-based loop) come back as mmengine's."""
    from mmengine.logging import HistoryBuffer

    orig = _run("ckptkit-test-direct", 3)
    repo = str(tmp_path / "repo")
    ckptkit.save(repo, {"scheduler": orig["scheds"][0], "message_hub": orig["hub"]}, "it3")
    m = ckptkit.inspect(repo, "it3") if hasattr(ckptkit, "inspect") else None
    fresh = _run("ckptkit-test-direct-fresh", 0)
    ckptkit.restore(repo, {"scheduler": fresh["scheds"][0], "message_hub": fresh["hub"]}, rng=False)
    assert fresh["scheds"][0].state_dict() == orig["scheds"][0].state_dict()
    assert isinstance(fresh["hub"].get_scalar("train/loss"), HistoryBuffer)
    assert fresh["hub"].get_scalar("train/loss").data[0].tolist() == orig["hub"].get_scalar("train/loss").data[0].tolist()
    del m


def test_a_damaged_stored_history_buffer_is_a_typed_error(saved: dict[str, Any], tmp_path: Path) -> None:
    from ckptkit.state.foreign import live_state

    hub = _run("ckptkit-test-damaged", 0)["hub"]
    bad = {"log_scalars": {"train/loss": {"ckptkit_type": "mmengine.logging.history_buffer.HistoryBuffer",
                                          "log_history": [1.0, 2.0], "count_history": [1], "max_length": 10}},
           "runtime_info": {}, "resumed_keys": {}}  # fmt: skip
    with pytest.raises(ManifestError, match=r"log_scalars\['train/loss'\].*one length"):
        live_state(hub, bad, "checkpoint x component 'message_hub'")
    with pytest.raises(ManifestError, match=r"expected a stored HistoryBuffer"):
        live_state(hub, {"log_scalars": {"train/loss": [1.0]}}, "checkpoint x component 'message_hub'")


class _Sneaky:
    """Pickles as ``getattr(torch.Tensor, "add_")``: a pickle may name builtins.getattr (HistoryBuffer's does), but
    only for a data class's attribute."""

    def __reduce__(self) -> Any:
        return (getattr, (torch.Tensor, "add_"))


def test_getattr_in_a_pickle_reaches_only_data_classes(tmp_path: Path) -> None:
    from ckptkit.errors import UnsupportedStateError

    path = tmp_path / "sneaky.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {}, "x": _Sneaky()}, path)
    with pytest.raises(UnsupportedStateError, match=r"weights_only=True\) refused it"):
        import_from(str(path), str(tmp_path / "repo"))
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.json"))
