"""Accelerate: ``Accelerator.save_state`` folders import in one call and restore the same state accelerate's own
``load_state`` gives; an Accelerate loop saving through ckptkit's AcceleratorCheckpoint, SIGKILLed mid-training in a
subprocess, resumes in a fresh process and ends bit-for-bit where an uninterrupted run ends."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli.main import main as cli
from ckptkit.interop.importers import detect_format, import_from
from ckptkit.interop.importers.registry import detect_folder

accelerate = pytest.importorskip("accelerate")

HERE = Path(__file__).parent
WORKER = HERE / "accelerate_worker.py"
sys.path.insert(0, str(HERE))
import accelerate_worker  # noqa: E402
from forkserver import ForkServer  # noqa: E402

STEPS = 3  # optimizer steps before save_state: mid-epoch (the loader has 8 batches)


def _build(seed: int) -> tuple[Any, ...]:
    """A prepared run: dropout MLP, AdamW, LambdaLR, a registered object, a stateful prepared DataLoader."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    set_seed(seed)  # weights differ per seed, so a load that does nothing fails the comparisons
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model = accelerate_worker.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    g = torch.Generator().manual_seed(7)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g))
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    tally = accelerate_worker.Tally()
    acc.register_for_checkpointing(tally)
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    return acc, model, opt, dl, sched, tally


def _snapshot(model: Any, opt: Any, sched: Any, tally: Any) -> dict[str, Any]:
    """Everything a restore must bring back, then the next numbers of every RNG stream (drawn last)."""
    out: dict[str, Any] = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    out["lr"] = sched.get_last_lr()
    out["sched"] = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    out["tally"] = tally.state_dict()
    out["python"], out["numpy"], out["torch"] = random.random(), np.random.rand(3), torch.rand(3)
    return out


def _assert_same(want: dict[str, Any], got: dict[str, Any]) -> None:
    assert want.keys() == got.keys()
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            assert w.dtype == g.dtype and torch.equal(w, g), k
        elif isinstance(w, np.ndarray):
            assert np.array_equal(w, g), k
        elif isinstance(w, dict) and "loss_sum" in w:
            assert w["steps"] == g["steps"] and torch.equal(w["loss_sum"], g["loss_sum"]), k
        else:
            assert w == g, k


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real save_state folder written mid-epoch, and what accelerate's own load_state restores from it."""
    root = tmp_path_factory.mktemp("accelerate")
    folder = root / "checkpoint_3"
    acc, model, opt, dl, sched, tally = _build(0)
    first = None
    for done, (x, y) in enumerate(dl, start=1):
        first = x if first is None else first
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        tally.steps += 1
        tally.loss_sum += loss.detach().double()
        if done == STEPS:
            break
    acc.save_state(str(folder))
    torch.rand(5), random.random()  # move the streams on: the loads below must put them back
    acc2, model2, opt2, dl2, sched2, tally2 = _build(1)
    acc2.load_state(str(folder))  # accelerate's own resume (it unpickles custom_checkpoint_0.pkl fully)
    want = _snapshot(model2, opt2, sched2, tally2)
    next_batch = next(iter(dl2))[0]
    assert not torch.equal(next_batch, first)  # the loader's position was restored, not its epoch restarted
    return {"root": root, "folder": folder, "want": want, "next_batch": next_batch, "acc_step": acc2.step}


def test_a_save_state_folder_is_detected_and_never_confused_with_a_trainer_folder(saved: dict[str, Any]) -> None:
    files = set(os.listdir(saved["folder"]))
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
            "dl_state_dict.bin"} <= files  # fmt: skip
    assert detect_format(str(saved["folder"])) == "accelerate"
    trainer = {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
    trainer.add("trainer_state.json")
    assert detect_folder(trainer) == "hf-trainer"
    assert detect_folder(trainer | {"optimizer.bin"}) == "hf-trainer"  # a Trainer (FSDP) folder stays a Trainer's
    assert detect_folder({"config.json", "model.safetensors"}) == "hf-pretrained"
    assert detect_folder(files | {"config.json"}) == "accelerate"  # an HF model's config saved beside save_state
    assert detect_folder({"pytorch_model.bin", "optimizer.bin"}) == "accelerate"


def test_an_imported_folder_restores_what_accelerates_own_load_state_restores(saved: dict[str, Any]) -> None:
    repo = saved["root"] / "repo"
    m = import_from(str(saved["folder"]), str(repo), model=accelerate_worker.make_model())
    assert m.name == "checkpoint_3" and m.lineage.relation == "import"
    src = m.lineage.source
    assert src["format"] == "accelerate" and src["processes"] == 1 and src["skipped"] == {}
    assert sorted(m.components) == ["accelerator", "custom_checkpoint_0", "dl_state_dict", "model", "optimizer",
                                    "rng", "scheduler"]  # fmt: skip
    assert m.components["rng"].kind == "rng" and m.components["custom_checkpoint_0"].kind == "stateful"
    assert any("named by the given model" in n for n in src["notes"])
    assert set(src["files"]) == set(os.listdir(saved["folder"]))
    assert ckptkit.verify(str(repo))[0].ok

    _, model, opt, dl, sched, tally = _build(2)
    torch.rand(7)
    result = ckptkit.restore(str(repo), {"model": model, "optimizer": opt.optimizer, "scheduler": sched.scheduler,
                                         "custom_checkpoint_0": tally, "dl_state_dict": dl})  # fmt: skip
    assert all(r.ok for r in result.reports.values())
    _assert_same(saved["want"], _snapshot(model, opt, sched, tally))
    assert saved["want"]["opt.0.exp_avg"].abs().sum() > 0 and saved["want"]["sched"]["last_epoch"] == STEPS
    # the prepared loader goes on with the batch accelerate's own resume gives (the 4th of this epoch's order)
    assert torch.equal(next(iter(dl))[0], saved["next_batch"])
    assert ckptkit.inspect(str(repo), "checkpoint_3").components["accelerator"].state == {"step": saved["acc_step"]}


def test_an_imported_folder_resumes_through_accelerator_checkpoint(saved: dict[str, Any]) -> None:
    from ckptkit.integrations.accelerate import AcceleratorCheckpoint

    url = str(saved["root"] / "repo-migrate")
    import_from(str(saved["folder"]), url, "step-00000003", model=accelerate_worker.make_model())
    acc, model, opt, _, sched, tally = _build(3)
    ckpt = AcceleratorCheckpoint(acc, url)
    result = ckpt.restore(strict=False)
    assert result is not None and acc.step == saved["acc_step"]
    _assert_same(saved["want"], _snapshot(model, opt, sched, tally))
    assert not result.fidelity.exact and "'dataloader'" in str(result.fidelity)  # save_state kept no loader position
    ckpt.close()


def test_without_a_model_the_safetensors_optimizer_is_kept_by_position_and_says_so(saved: dict[str, Any]) -> None:
    m = import_from(str(saved["folder"]), str(saved["root"] / "repo-nomodel"))
    params = m.components["optimizer"].state["param_groups"][0]["params"]  # type: ignore[index]
    assert params == [f"param_groups[0][{i}]" for i in range(4)]
    assert any("keyed by position" in n and "model=" in n for n in m.lineage.source["notes"])


class _Hostile:
    """Unpickling this would create a file: an import must refuse it, never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_objects_that_need_unpickling_are_skipped_with_the_reason_and_never_run(saved: dict[str, Any]) -> None:
    folder = saved["root"] / "hostile"
    shutil.copytree(saved["folder"], folder)
    marker = saved["root"] / "was-unpickled"
    torch.save({"count": 1, "cfg": _Hostile(str(marker))}, folder / "custom_checkpoint_1.pkl")
    torch.save(_Hostile(str(marker)), folder / "sampler.bin")
    torch.save({"python": 1}, folder / "random_states_1.pkl")  # a second process's file that is not random states
    out = CliRunner().invoke(cli, ["import", str(folder), str(saved["root"] / "repo-hostile"), "--model",
                                   "accelerate_worker:make_model"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert not marker.exists()
    m = ckptkit.inspect(str(saved["root"] / "repo-hostile"))
    skipped = m.lineage.source["skipped"]
    assert "needs pathlib.Path" in skipped["custom_checkpoint_1.pkl"]
    assert "sampler.bin" in skipped and "custom_checkpoint_1" not in m.components
    assert "random_states_1.pkl" in skipped and m.lineage.source["processes"] == 2
    assert {"model", "optimizer", "rng", "custom_checkpoint_0"} <= set(m.components)
    assert "skipped custom_checkpoint_1.pkl: not imported: cannot import" in out.output
    assert "skipped sampler.bin" in out.output


def test_a_loop_killed_mid_training_resumes_through_ckptkit_and_ends_exactly_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    server = ForkServer([sys.executable, str(WORKER), "--serve", url], env, tmp_path / "worker.log")
    try:
        pid, start, lines = server.start()  # a process of its own, forked from one that imported torch only
        assert start == 0
        lines = server.wait_committed(server.wait_committed(lines))  # steps 2 and 4
        time.sleep(0.1)  # mid-training: the next steps are under way
        reported = server.kill(pid, lines)
        assert reported[:2] == [2, 4]
        committed = [m.progress.global_step for m in ckptkit.checkpoints(url)]
        assert committed[-1] == reported[-1] < accelerate_worker.TOTAL
        pid, start, lines = server.start()  # a fresh process resumes
        assert start == committed[-1]
        assert f"resumed {start} exact" in lines, lines  # the fidelity report: nothing missing
        lines += server._until("done")  # runs to the end on its own
        server._send("reap")
        assert server._until("reaped ")[-1] == f"reaped {pid} 0"
        server.child = None
    finally:
        server.close()
    got = torch.load(f"{url}-final.pt", weights_only=True)
    want = accelerate_worker.train(str(tmp_path / "reference"), every=100, pause=0)  # uninterrupted, in-process
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    after = {m.progress.global_step: m for m in ckptkit.checkpoints(url)}[start + 2]
    assert after.lineage.relation == "resume" and after.lineage.parents[0].name == f"step-{start:08d}"
    last = ckptkit.inspect(url)
    assert last.progress.global_step == accelerate_worker.TOTAL
    assert set(last.components) >= {"model", "optimizer", "scheduler", "custom_checkpoint_0", "accelerator",
                                     "dataloader", "rng"}  # fmt: skip
