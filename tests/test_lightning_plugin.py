"""ckptkit inside Lightning: ModelCheckpoint saves through CkptkitCheckpointIO, a SIGKILLed run resumes with
``fit(ckpt_path=io.latest())``, and checkpoints export back to a ``.ckpt`` that Lightning resumes from."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.errors import CheckpointNotFoundError, InvalidArgumentError, UnsupportedStateError
from ckptkit.schema import Progress

pytest.importorskip("lightning")
from ckptkit.integrations.lightning import CkptkitCheckpointIO

sys.path.insert(0, str(Path(__file__).parent))
import lightning_worker as w

WORKER = str(Path(__file__).parent / "lightning_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[str, torch.Tensor]]:
    """Uninterrupted runs with Lightning's own .ckpt files: noisy (shuffle, dropout, ProcessRNG) and quiet."""
    out = {}
    for noisy in (True, False):
        root = str(tmp_path_factory.mktemp(f"ref-{noisy}"))
        _, module = w.fit(root, noisy=noisy, rng=noisy)
        out[noisy] = (root, w.weights(module))
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A worker SIGKILLed after its first commit, then a fresh process that resumes through the plugin."""
    d = tmp_path_factory.mktemp("killed")
    url, out = str(d / "repo"), str(d / "final.pt")
    proc = subprocess.Popen([sys.executable, WORKER, url, out, "--slow", "0.1"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    saved = []
    for line in proc.stdout:
        if line.startswith("SAVED"):
            saved.append(line.split()[1])
            time.sleep(0.2)  # mid-training, after the commit
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and saved and not os.path.exists(out)
    done = subprocess.run([sys.executable, WORKER, url, out, "--resume"], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("RESUMED"))
    return {"url": url, "saved": saved, "resumed": resumed, "final": torch.load(out, weights_only=True),
            "stdout": done.stdout}


def _lightning_file(root: str, name: str) -> str:
    """Lightning's own .ckpt that the plugin names ``name``."""
    io = CkptkitCheckpointIO("memory://names")
    found = [f for f in os.listdir(f"{root}/ckpts") if io.name_of(f) == name]
    assert len(found) == 1, (name, os.listdir(f"{root}/ckpts"))
    return f"{root}/ckpts/{found[0]}"


def test_a_sigkilled_run_resumes_through_the_plugin_bit_for_bit(
    killed_and_resumed: dict[str, Any], reference: dict[bool, tuple[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Every save is at an epoch end (ModelCheckpoint(every_n_train_steps=batches per epoch)), where Lightning's
    resume is exact once ProcessRNG restores the RNG (shuffled loader, dropout): so the resumed run's final weights
    equal both Lightning's own resume from its own .ckpt at the same step and the uninterrupted run."""
    k = killed_and_resumed
    root, full = reference[True]
    assert k["resumed"] in {"epoch_0-step_4", "epoch_1-step_8"} and k["resumed"] not in ("None", None)
    _, own = w.fit(str(tmp_path), ckpt_path=_lightning_file(root, k["resumed"]), save=False)
    assert torch.equal(k["final"], w.weights(own))
    assert torch.equal(k["final"], full)
    assert not torch.equal(k["final"], w.weights(w.Tiny()))  # trained, not a fresh model
    # the repository: every checkpoint verifies, the resumed run's first save records the resume edge
    assert all(rep.ok for rep in ckptkit.verify(k["url"]))
    ms = {m.name: m for m in ckptkit.checkpoints(k["url"])}
    after = [m for m in ms.values() if m.lineage.relation == "resume"]
    assert len(after) == 1 and after[0].lineage.parents[0].name == k["resumed"]
    assert ms["epoch_2-step_12"].progress.global_step == 12
    assert ms["epoch_2-step_12"].hparams["lightning_hyper_parameters"] == {"lr": 0.05, "noisy": True}


def test_plugin_checkpoint_exports_to_a_ckpt_lightning_resumes(
    killed_and_resumed: dict[str, Any], reference: dict[bool, tuple[str, torch.Tensor]], tmp_path: Path
) -> None:
    root, full = reference[True]
    files = ckptkit.export(killed_and_resumed["url"], str(tmp_path / "out"), "epoch_0-step_4", format="lightning")
    assert [os.path.basename(f) for f in files] == ["epoch_0-step_4.ckpt", "ckptkit.json"]
    exported = torch.load(files[0], weights_only=True)
    own = torch.load(_lightning_file(root, "epoch_0-step_4"), weights_only=True)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step"):
        assert _same(exported[key], own[key]), key
    _, module = w.fit(str(tmp_path), ckpt_path=files[0], save=False)
    assert torch.equal(w.weights(module), full)


def test_plain_ckptkit_checkpoint_exports_to_a_ckpt_lightning_resumes(
    reference: dict[bool, tuple[str, torch.Tensor]], tmp_path: Path
) -> None:
    """A checkpoint saved by ckptkit.save (model, optimizer by parameter name, scheduler, progress) becomes a .ckpt
    whose Lightning resume ends where Lightning's uninterrupted run does (no shuffle or dropout: no RNG saved)."""
    root, full = reference[False]
    own = torch.load(_lightning_file(root, "epoch_0-step_4"), weights_only=True)
    module = w.Tiny(noisy=False)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    module.load_state_dict(own["state_dict"])
    opt.load_state_dict(own["optimizer_states"][0])
    sched.load_state_dict(own["lr_schedulers"][0])
    url = str(tmp_path / "repo")
    ckptkit.save(url, {"model": module, "optimizer": opt, "scheduler": sched}, "plain",
                 progress=Progress(epoch=1, global_step=4))
    files = ckptkit.export(url, str(tmp_path / "out"), format="lightning")
    assert torch.load(files[0], weights_only=True)["global_step"] == 4
    _, resumed = w.fit(str(tmp_path), ckpt_path=files[0], noisy=False, rng=False, save=False)
    assert torch.equal(w.weights(resumed), full)


def test_bad_inputs_give_typed_errors(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    io = CkptkitCheckpointIO(url)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint named 'epoch_9-step_99'"):
        w.fit(str(tmp_path), plugin=io, ckpt_path="runs/epoch=9-step=99.ckpt", save=False)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint("nope")

    class Config:  # not JSON, not a tensor
        pass

    checkpoint = {"state_dict": w.Tiny().state_dict(), "epoch": 0, "global_step": 1,
                  "hyper_parameters": {"lr": 0.05, "cfg": Config()}}  # save_hyperparameters() of a config object
    with pytest.raises(UnsupportedStateError, match=r"hyper_parameters\.cfg.*save_hyperparameters"):
        io.save_checkpoint(checkpoint, str(tmp_path / "ckpts" / "epoch=0-step=1.ckpt"))
    assert io.latest() is None  # nothing committed
    ckptkit.save(url, {"values": {"a": 1}}, "no-model")
    with pytest.raises(InvalidArgumentError, match="no model component"):
        ckptkit.export(url, str(tmp_path / "e1"), "no-model", format="lightning")
    ckptkit.save(url, {"model": w.Tiny()}, "no-optimizer", progress=Progress(epoch=1, global_step=4))
    with pytest.raises(InvalidArgumentError, match="no optimizer"):
        ckptkit.export(url, str(tmp_path / "e2"), "no-optimizer", format="lightning")
    assert not os.path.exists(tmp_path / "e1") or not os.listdir(tmp_path / "e1")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
