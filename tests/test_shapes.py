"""The workflows in the shapes users bring them (issue 11): each example's stages run in fresh processes, as a user
runs them, and the tests assert the lineage edges and plans recorded, the data segments listed, the LR per step
against a reference scheduler, and tensor-equal state where the shape promises it. Then the pieces they rest on:
lineage that follows the model objects into any save, schedule policies for torch schedulers, bare files checked
before anything is loaded, a restore that never degrades silently, and the consistent surface."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import (
    CheckpointExistsError,
    InvalidArgumentError,
    NoRestorableCheckpointError,
    OptimizerMappingError,
    SourceFormatError,
    StateMismatchError,
)
from ckptkit.schema import DataSegment, Parent
from ckptkit.storage import Repository

EXAMPLES = Path(__file__).parents[1] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _tensors(url: str, name: str, component: str = "model") -> dict[str, torch.Tensor]:
    return load_tensors(Repository(url), ckptkit.inspect(url, name), [component])[component]


# --- the three shapes, each stage in a fresh process ------------------------------------------------------------


def test_continue_on_new_data_with_the_users_own_warmup(tmp_path: Path) -> None:
    ex = _example("new_data_own_schedule")
    url, lrs = str(tmp_path / "repo"), tmp_path / "lrs.json"
    script = str(EXAMPLES / "new_data_own_schedule.py")
    _run(script, url, "fit", "--part", "1")
    _run(script, url, "fit", "--part", "2", "--continue", "--lrs", str(lrs))

    first = ckptkit.inspect(url, "part1-0012")
    cont = ckptkit.inspect(url, "part2-0018")
    last = ckptkit.inspect(url, "part2-0024")
    assert cont.lineage.relation == "continue"
    (parent,) = cont.lineage.parents
    assert (parent.id, parent.relation) == (first.id, "continue")
    assert parent.changes["schedule"] == "restart" and parent.changes["reason"] == "new data arrived"
    assert parent.changes["data_added"]["name"] == "part-2"  # type: ignore[call-overload,index]
    # Every data segment that went into the weights, each once, with what was consumed of it.
    assert [(d.name, d.samples_consumed) for d in last.data] == [("part-1", 96), ("part-2", 96)]
    assert all(d.fingerprint for d in last.data) and last.data[0].fingerprint != last.data[1].fingerprint
    assert (last.lineage.relation, last.lineage.parents[0].name) == ("train", "part2-0018")

    # The LR of every step of part 2 is the user's fresh warmup, not the restored scheduler's.
    _, ref_opt, ref = ex.build()
    expected = []
    for _ in range(ex.STEPS):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert json.loads(lrs.read_text()) == expected

    # restart: the optimizer's moments come from the checkpoint; its hyperparameters and the schedule as built.
    model, opt, sched = ex.build()
    mgr = CheckpointManager(url, {"model": model, "optimizer": opt, "scheduler": sched}, rng=False)
    mgr.continue_from("part1-0012", schedule="restart")
    ref_model, ref_opt, _ = ex.build()
    ckptkit.restore(url, {"model": ref_model, "optimizer": ref_opt}, "part1-0012", rng=False)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
    assert opt.param_groups[0]["lr"] == ex.LR * ex.warmup(0) and sched.last_epoch == 0


def test_transfer_before_the_new_run_exists_records_the_edge_and_plan(tmp_path: Path) -> None:
    ex = _example("transfer_first")
    src, dst, trained = (str(tmp_path / n) for n in ("classifier", "regressor", "trained"))
    script = str(EXAMPLES / "transfer_first.py")
    _run(script, src, "dump")
    _run(script, src, "regress", "--into", dst, "--steps", "0")
    _run(script, src, "regress", "--into", trained, "--steps", "2")
    clf = ckptkit.inspect(src, "classifier")
    for url in (dst, trained):
        (m,) = ckptkit.api.checkpoints(url)
        assert m.lineage.relation == "transfer"
        (parent,) = m.lineage.parents
        assert (parent.id, parent.name, parent.url) == (clf.id, "classifier", src)
        plan: Any = parent.changes["plan"]
        assert plan["counts"] == {"loaded": 39, "reinit_head": 2}
        assert {k for k, t in plan["tensors"].items() if t["action"] == "reinit_head"} == {"classifier.weight",
                                                                                           "classifier.bias"}
        assert parent.changes["into"] == "model"
        # The data the loaded tensors were trained on is kept apart from the new run's data.
        assert [d["name"] for d in parent.changes["source_data"]] == ["reviews-labelled"]  # type: ignore[index,union-attr]
        assert [d.name for d in m.data] == ["ratings"]
    # Saved before any training step: every loaded tensor is the classifier's, bit for bit.
    before, after = _tensors(src, "classifier"), _tensors(dst, "step-00000000")
    loaded = [k for k, t in plan["tensors"].items() if t["action"] == "loaded"]
    assert loaded and all(torch.equal(after[k], before[k]) for k in loaded)
    assert not torch.equal(_tensors(trained, "step-00000002")[loaded[0]], before[loaded[0]])
    # The source is an open Repository just as well.
    plan2 = ckptkit.transfer(Repository(src), ex.bert(1), reset_heads=True)
    assert plan2.counts() == {"loaded": 39, "reinit_head": 2}


def test_resume_from_bare_files_continues_bit_exact_with_a_fresh_per_epoch_scheduler(tmp_path: Path) -> None:
    ex = _example("resume_bare_files")
    url, report = str(tmp_path / "files"), tmp_path / "report.json"
    script = str(EXAMPLES / "resume_bare_files.py")
    _run(script, url, "other-tool", "--epochs", "6")
    _run(script, url, "resume", "--epochs", "6", "--more", "4", "--report", str(report))

    # The reference: one uninterrupted run of 10 epochs, its scheduler stepping the whole way.
    model, opt, sched = ex.build()
    lrs = ex.train(model, opt, sched, range(10))
    got = json.loads(report.read_text())
    assert got["lrs"] == lrs[6:]
    final = _tensors(url, "epoch-0010")
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), f"{k} differs from the uninterrupted run"

    imported = ckptkit.inspect(url, "import-step-00000048")
    assert imported.lineage.relation == "import" and imported.progress.epoch == 6
    files: Any = imported.lineage.source["files"]  # type: ignore[index]
    assert set(files) == {"weights.pt", "optimizer.pt"} and all(len(h) == 64 for h in files.values())
    last = ckptkit.inspect(url, "epoch-0010")
    assert (last.lineage.relation, last.lineage.parents[0].id) == ("continue", imported.id)
    moved: Any = last.lineage.parents[0].changes["scheduler"]
    assert moved["moved_to"] == {"epoch": 6}

    # The same import from the command line, without a model: the optimizer is named by order (one group).
    cli = str(tmp_path / "cli")
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "import-files", cli, f"{url}/weights.pt",
                          "--optimizer", f"{url}/optimizer.pt", "--epoch", "6", "--step", "48"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    (m,) = ckptkit.api.checkpoints(cli)
    assert sorted(m.components) == ["model", "optimizer"] and m.progress.global_step == 48
    model, opt, sched = ex.build()
    with CheckpointManager(cli, {"model": model, "optimizer": opt, "scheduler": sched}, rng=False) as mgr:
        mgr.continue_from(position="epoch")
    files_weights = torch.load(f"{url}/weights.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in files_weights.items())
    files_opt = torch.load(f"{url}/optimizer.pt", weights_only=True)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], files_opt["state"][i]["exp_avg"])
    assert opt.param_groups[0]["lr"] == lrs[6] and sched.last_epoch == 6


# --- bare files: every file checked before anything is loaded or committed --------------------------------------


def _files(tmp_path: Path) -> tuple[torch.nn.Module, str, str]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    return model, str(tmp_path / "w.pt"), str(tmp_path / "o.pt")


def test_bad_bare_files_are_refused_before_anything_is_loaded_or_committed(tmp_path: Path) -> None:
    model, w, o = _files(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))  # another head
    wrong_opt = torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1, momentum=0.9)
    torch.nn.Linear(3, 3)(torch.ones(1, 3)).sum().backward()
    torch.save(wrong_opt.state_dict(), tmp_path / "wrong.pt")
    torch.save({"not": "an optimizer"}, tmp_path / "junk.pt")
    repo = str(tmp_path / "repo")
    with pytest.raises(StateMismatchError):
        ckptkit.import_files(repo, w, optimizer=o, model=other)
    with pytest.raises((SourceFormatError, OptimizerMappingError, ckptkit.errors.ImportFormatError)):
        ckptkit.import_files(repo, w, optimizer=str(tmp_path / "junk.pt"))
    with pytest.raises(OptimizerMappingError):
        ckptkit.import_files(repo, w, optimizer=str(tmp_path / "wrong.pt"))
    with pytest.raises(FileNotFoundError):
        ckptkit.import_files(repo, w, optimizer=str(tmp_path / "missing.pt"))
    with pytest.raises(InvalidArgumentError, match="epoch"):
        ckptkit.import_files(repo, w, epoch=-1)
    assert ckptkit.api.checkpoints(repo) == []  # nothing was committed
    ckptkit.import_files(repo, w, optimizer=o, model=model, step=3, name="files")
    with pytest.raises(CheckpointExistsError):
        ckptkit.import_files(repo, w, name="files")

    # A manager's start_from_files checks the optimizer file before it loads the weights.
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt = torch.optim.AdamW(fresh.parameters())
    mgr = CheckpointManager(str(tmp_path / "m"), {"model": fresh, "optimizer": opt})
    with pytest.raises(StateMismatchError):
        mgr.start_from_files(w, str(tmp_path / "wrong.pt"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items()), "a refused file half-loaded"
    assert not opt.state
    mgr.start_from_files(w, o)
    m = mgr.save(1)
    assert m is not None and m.lineage.relation == "import" and "optimizer_blake3" in m.lineage.source  # type: ignore[operator]


# --- lineage follows the model objects ---------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_lineage_follows_the_model_into_any_save(tmp_path: Path, async_save: bool) -> None:
    a, b, c = (str(tmp_path / n) for n in "abc")
    model = torch.nn.Linear(3, 3)
    base = ckptkit.save(a, {"model": model}, "base", data=[DataSegment(name="d1", fingerprint="f1",
                                                                       samples_consumed=10)])  # fmt: skip
    fresh = torch.nn.Linear(3, 3)
    ckptkit.restore(a, {"model": fresh}, "base")
    # The next save of the restored model, in another repository, by another API, records where it came from.
    mgr = CheckpointManager(b, {"model": fresh}, async_save=async_save, rng=False)
    mgr.save(1)
    mgr.save(2)
    mgr.close()
    first, second = ckptkit.inspect(b, "step-00000001"), ckptkit.inspect(b, "step-00000002")
    assert first.lineage.relation == "resume"
    assert (first.lineage.parents[0].id, first.lineage.parents[0].url) == (base.id, a)
    assert [d.name for d in first.data] == ["d1"]
    assert (second.lineage.relation, second.lineage.parents[0].id, second.lineage.parents[0].url) == (
        "train", first.id, None)
    # A plain save later: `train` from the manager's last checkpoint, in that repository.
    third = ckptkit.save(c, {"model": fresh}, "third", data=[DataSegment(name="d2", fingerprint="f2")])
    assert (third.lineage.relation, third.lineage.parents[0].id, third.lineage.parents[0].url) == (
        "train", second.id, b)
    assert [d.name for d in third.data] == ["d1", "d2"]  # each once: d1 inherited, d2 given
    again = ckptkit.save(c, {"model": fresh}, "again", data=[DataSegment(name="d2", fingerprint="f2",
                                                                        samples_consumed=5)])  # fmt: skip
    assert [(d.name, d.samples_consumed) for d in again.data] == [("d1", 10), ("d2", 5)]
    # An explicit parents= overrides what the objects say.
    p = Parent(id=base.id, relation="transfer", name="base", url=a)
    explicit = ckptkit.save(c, {"model": fresh}, "explicit", parents=[p])
    assert (explicit.lineage.relation, explicit.lineage.parents) == ("transfer", [p])


def test_two_transfers_into_a_fusion_model_before_a_save_become_two_parents(tmp_path: Path) -> None:
    text, image, run = (str(tmp_path / n) for n in ("text", "image", "run"))
    t = ckptkit.save(text, {"model": torch.nn.Sequential(torch.nn.Linear(4, 4))}, "text")
    i = ckptkit.save(image, {"model": torch.nn.Sequential(torch.nn.Linear(6, 6))}, "image")
    fusion = torch.nn.ModuleDict({"text": torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                  "image": torch.nn.Sequential(torch.nn.Linear(6, 6))})  # fmt: skip
    ckptkit.transfer(text, fusion, key_map={"text.{}": "{}"}, include=["text.*"])
    ckptkit.transfer(image, fusion, key_map={"image.{}": "{}"}, include=["image.*"])
    m = ckptkit.save(run, {"fusion": fusion}, "first")
    assert m.lineage.relation == "transfer"
    assert [(p.id, p.url, p.changes["into"]) for p in m.lineage.parents] == [(t.id, text, "fusion"),
                                                                             (i.id, image, "fusion")]


# --- schedule policies for torch schedulers ----------------------------------------------------------------------


def _setup(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "cosine":
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("policy", ["keep", "restart", "extend", "constant"])
def test_each_schedule_policy_with_a_torch_scheduler(tmp_path: Path, policy: str) -> None:
    url = str(tmp_path)
    kind = "cosine" if policy == "extend" else "lambda"
    model, opt, sched = _setup(kind)
    ref = _steps(model, opt, sched, 6)
    ckptkit.save(url, {"model": model, "optimizer": opt, "scheduler": sched}, "s6",
                 progress=ckptkit.schema.Progress(global_step=6))  # fmt: skip
    ref += _steps(model, opt, sched, 4)  # what `keep` continues as
    m2, o2, s2 = _setup(kind)
    mgr = CheckpointManager(url, {"model": m2, "optimizer": o2, "scheduler": s2}, rng=False)
    kwargs: dict[str, Any] = {"total_steps": 20} if policy == "extend" else {}
    mgr.continue_from("s6", schedule=policy, **kwargs)  # type: ignore[arg-type]
    got = _steps(m2, o2, s2, 4)
    if policy == "keep":
        assert got == ref[6:] and s2.last_epoch == 10
    elif policy == "restart":
        assert got == [0.1 * min(1.0, (s + 1) / 4) for s in range(4)]  # the fresh warmup
    elif policy == "extend":
        assert abs(got[0] - ref[6]) < 1e-12 and got[-1] > ref[-1] and got == sorted(got, reverse=True)
    else:
        assert got == [ref[6]] * 4
    m = mgr.save(7)
    assert m is not None and m.lineage.relation == "continue"
    assert m.lineage.parents[0].changes.get("schedule", "keep") == policy


def test_continue_checks_its_options_before_it_restores_anything(tmp_path: Path) -> None:
    url = str(tmp_path)
    model, opt, sched = _setup("lambda")
    ckptkit.save(url, {"model": model, "optimizer": opt, "scheduler": sched}, "a")
    m2, o2, s2 = _setup("lambda")
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    mgr = CheckpointManager(url, {"model": m2, "optimizer": o2, "scheduler": s2})
    for kwargs, match in [({"schedule": "extend", "total_steps": 9}, "total is known"),
                          ({"schedule": "sideways"}, "one of"),
                          ({"lr": 0.5}, "would not last"),
                          ({"total_steps": 9}, "schedule policy"),
                          ({"position": "batch"}, "step"),
                          ({"changes": {"schedule": "mine"}}, "records itself")]:  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=match):
            mgr.continue_from(**kwargs)
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in before.items())
    cosine = str(tmp_path / "cosine")
    model, opt, sched = _setup("cosine")
    _steps(model, opt, sched, 6)
    ckptkit.save(cosine, {"model": model, "optimizer": opt, "scheduler": sched}, "a")
    m3, o3, s3 = _setup("cosine")
    before = {k: v.clone() for k, v in m3.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="after the current step 6"):
        CheckpointManager(cosine, {"model": m3, "optimizer": o3, "scheduler": s3}).continue_from(
            schedule="extend", total_steps=5)
    assert all(torch.equal(m3.state_dict()[k], v) for k, v in before.items()) and s3.last_epoch == 0


def test_continue_restores_process_rng_only_when_asked(tmp_path: Path) -> None:
    url = str(tmp_path)
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(11)
    ckptkit.save(url, {"model": model}, "a")
    saved_draw = torch.rand(1)
    torch.manual_seed(99)
    CheckpointManager(url, {"model": model}).continue_from()
    assert not torch.equal(torch.rand(1), saved_draw)
    CheckpointManager(url, {"model": model}).continue_from(rng=True)
    assert torch.equal(torch.rand(1), saved_draw)


# --- a restore never degrades silently ---------------------------------------------------------------------------


def test_restore_raises_when_checkpoints_exist_and_none_can_be_restored(tmp_path: Path) -> None:
    url = tmp_path / "repo"
    model = torch.nn.Linear(2, 2)
    assert CheckpointManager(str(url), {"model": model}).restore() is None  # empty: a fresh run
    for n in ("a", "b"):
        ckptkit.save(str(url), {"model": model}, n)
    for obj in (url / "objects").rglob("*"):
        if obj.is_file():
            obj.write_bytes(b"rotten")
    with pytest.raises(NoRestorableCheckpointError) as err:
        CheckpointManager(str(url), {"model": model}).restore()
    assert [n for n, _ in err.value.skipped] == ["b", "a"] and "verify" in str(err.value)
    for f in (url / "checkpoints").glob("*.json"):
        f.write_text("{}")
    with pytest.raises(NoRestorableCheckpointError):
        CheckpointManager(str(url), {"model": model}).restore()
    with pytest.raises(NoRestorableCheckpointError):
        ckptkit.restore(str(url), {"model": model})


def test_per_save_hparams_and_the_public_listing(tmp_path: Path) -> None:
    url = str(tmp_path)
    mgr = CheckpointManager(url, {"model": torch.nn.Linear(2, 2)}, hparams={"lr": 0.1})
    m = mgr.save(1, hparams={"phase": "warmup"})
    assert m is not None and m.hparams == {"lr": 0.1, "phase": "warmup"}
    assert [x.name for x in ckptkit.checkpoints(url)] == ["step-00000001"]
    assert [x.name for x in ckptkit.checkpoints(Repository(url))] == ["step-00000001"]
