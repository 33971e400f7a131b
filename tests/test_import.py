"""Importing foreign checkpoints (ckptkit.interop.importers.import_from), written here by the real tools: a transformers
Trainer, Lightning, timm's CheckpointSaver, torch.distributed.checkpoint; MMDetection's layout by hand (mmdet does
not run here; tests/test_mmengine.py uses mmengine's own objects). Tiny models, offline, CPU only.

Every import is checked the same way: the checkpoint passes ckptkit.verify, restores with strict=True into a fresh
model (and optimizer, where the file has one), and the restored tensors equal the ones in the source files, read in
the test with torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

import ckptkit
from ckptkit.errors import CkptkitError, UnsupportedStateError
from ckptkit.hashing import file_hash
from ckptkit.interop.importers import FORMATS, ImportFormatError, detect_format, import_from, unsafe_globals


def _ok(repo: str) -> None:
    reports = ckptkit.verify(repo)
    assert reports and all(r.ok for r in reports), [r.problems for r in reports]


def _source(repo: str, name: str | None = None) -> dict[str, Any]:
    m = ckptkit.inspect(repo, name)
    assert m.lineage.relation == "import"
    assert m.lineage.source is not None
    return dict(m.lineage.source)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture
def keep_rng() -> Iterator[None]:
    """A restore with rng=True sets the process RNG: put the test process's back afterwards."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


# --- HF transformers ---------------------------------------------------------------------------------------------


def _bert_config(**kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                      max_position_embeddings=32, num_labels=3, **kw)  # fmt: skip


class _TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(1, 64, (8,), generator=g), "labels": torch.tensor(i % 3)}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real transformers.Trainer run on a tiny BERT: checkpoint-2 and checkpoint-4 folders."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate: pip install -e '.[import-test]'")
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf") / "run"
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config())
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, seed=0,
                             weight_decay=0.01)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return {"out": out, "args": args, "ckpt": out / "checkpoint-2"}


def test_hf_trainer_checkpoint(hf_run: dict[str, Any], tmp_path: Path, keep_rng: None) -> None:
    from transformers import BertForSequenceClassification, Trainer

    ckpt: Path = hf_run["ckpt"]
    assert detect_format(str(ckpt)) == "hf-trainer"
    repo = str(tmp_path / "repo")
    m = import_from(str(ckpt), repo)
    _ok(repo)
    assert m.name == "checkpoint-2"
    assert set(m.components) == {"model", "optimizer", "scheduler", "rng"}
    assert m.progress.global_step == 2 and m.progress.epoch == 0
    assert m.components["model"].adapter == "hf"
    assert m.components["model"].meta["class"] == "BertForSequenceClassification"
    src = _source(repo)
    assert src["format"] == "hf-trainer" and src["path"] == str(ckpt)
    files = src["files"]
    assert isinstance(files, dict)
    assert files["optimizer.pt"] == file_hash(str(ckpt / "optimizer.pt"))
    assert files["model.safetensors"] == file_hash(str(ckpt / "model.safetensors"))
    skipped = src["skipped"]
    assert isinstance(skipped, dict) and "TrainingArguments" in str(skipped["training_args.bin"])
    assert "rng_state.pth" not in skipped
    # The command line says why too, as the API records it.
    cli = subprocess.run([sys.executable, "-m", "ckptkit.cli", "import", str(ckpt), str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "skipped training_args.bin: " in cli.stdout and "TrainingArguments" in cli.stdout, cli.stdout
    state = m.hparams["hf_trainer_state"]
    assert isinstance(state, dict) and state["global_step"] == 2

    # A fresh model, and the optimizer and scheduler a fresh Trainer builds for it (Trainer's own grouping).
    fresh = BertForSequenceClassification(_bert_config())
    trainer = Trainer(model=fresh, args=hf_run["args"])
    opt = trainer.create_optimizer()
    sched = trainer.create_scheduler(num_training_steps=4, optimizer=opt)
    res = ckptkit.restore(repo, {"model": fresh, "optimizer": opt, "scheduler": sched})
    assert all(r.ok for r in res.reports.values())

    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    live = fresh.state_dict()
    assert weights.keys() <= live.keys()
    assert all(_same(live[k], v) for k, v in weights.items())
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    restored = opt.state_dict()
    assert [len(g["params"]) for g in restored["param_groups"]] == [len(g["params"]) for g in saved["param_groups"]]
    assert [g["weight_decay"] for g in restored["param_groups"]] == [g["weight_decay"] for g in saved["param_groups"]]
    assert saved["state"].keys() == restored["state"].keys()
    for i, s in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert _same(restored["state"][i][key], s[key]), (i, key)
    assert sched.last_epoch == torch.load(ckpt / "scheduler.pt", weights_only=True)["last_epoch"] == 2

    # RNG: exactly the states the Trainer saved (read here the way transformers reads them)
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        rng = torch.load(ckpt / "rng_state.pth", weights_only=True)
    assert random.getstate() == rng["python"]
    np_state = np.random.get_state()
    assert np_state[0] == rng["numpy"][0] and np.array_equal(np_state[1], rng["numpy"][1])
    assert tuple(np_state[2:]) == tuple(rng["numpy"][2:])
    assert torch.equal(torch.get_rng_state(), rng["cpu"])


def test_hf_trainer_optimizer_that_does_not_check_out_is_refused(hf_run: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(hf_run["ckpt"], folder)
    osd = torch.load(folder / "optimizer.pt", weights_only=True)
    # Swap the two groups: sizes no longer match the decay / no-decay split of the model.
    osd["param_groups"] = osd["param_groups"][::-1]
    torch.save(osd, folder / "optimizer.pt")
    with pytest.raises(CkptkitError, match=r"refusing to guess") as err:
        import_from(str(folder), str(tmp_path / "repo"))
    assert "group 0 has" in str(err.value)
    assert not (tmp_path / "repo" / "checkpoints").exists() or not os.listdir(tmp_path / "repo" / "checkpoints")


def test_hf_pretrained_export_and_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    torch.manual_seed(2)
    original = BertForSequenceClassification(_bert_config(id2label={0: "neg", 1: "neutral", 2: "pos"})).eval()
    pretrained = tmp_path / "pretrained"
    original.save_pretrained(str(pretrained))
    assert detect_format(str(pretrained)) == "hf-pretrained"
    repo = str(tmp_path / "repo")
    m = import_from(str(pretrained), repo, "bert")
    _ok(repo)
    assert set(m.components) == {"model"}
    assert m.components["model"].meta["labels"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert _source(repo)["format"] == "hf-pretrained"

    fresh = BertForSequenceClassification(_bert_config())
    ckptkit.restore(repo, {"model": fresh}, rng=False)
    assert all(_same(fresh.state_dict()[k], v) for k, v in original.state_dict().items())

    exported = tmp_path / "exported"
    ckptkit.export(repo, str(exported))
    again = AutoModelForSequenceClassification.from_pretrained(str(exported)).eval()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, original(input_ids=ids).logits)


def test_hf_sharded_bin_and_tied_weights(tmp_path: Path) -> None:
    from transformers import BertForMaskedLM, BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification(_bert_config())
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "binary"
    binary.mkdir()
    shutil.copy(sharded / "config.json", binary / "config.json")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        repo = str(tmp_path / f"repo-{folder.name}")
        import_from(str(folder), repo)
        _ok(repo)
        fresh = BertForSequenceClassification(_bert_config())
        ckptkit.restore(repo, {"model": fresh}, rng=False)
        assert all(_same(fresh.state_dict()[k], v) for k, v in model.state_dict().items())

    # save_pretrained writes one tensor of each tied pair; the import records the other as an alias
    mlm = BertForMaskedLM(_bert_config())
    tied = tmp_path / "mlm"
    mlm.save_pretrained(str(tied))
    repo = str(tmp_path / "repo-mlm")
    m = import_from(str(tied), repo)
    assert (
        m.components["model"].aliases.get("cls.predictions.decoder.weight") == "bert.embeddings.word_embeddings.weight"
    )
    fresh_mlm = BertForMaskedLM(_bert_config())
    ckptkit.restore(repo, {"model": fresh_mlm}, rng=False)  # strict
    assert torch.equal(fresh_mlm.cls.predictions.decoder.weight, mlm.bert.embeddings.word_embeddings.weight)


# --- Lightning -----------------------------------------------------------------------------------------------


def _lightning() -> Any:
    return pytest.importorskip("lightning", reason="pip install -e '.[import-test]' for the Lightning import tests")


def _lightning_module(L: Any) -> Any:
    class Classifier(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self, hidden: int = 8, args: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden, 2))  # fmt: skip

        def training_step(self, batch: Any, _i: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    return Classifier


@pytest.fixture(scope="module")
def lightning_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    L = _lightning()
    cls = _lightning_module(L)
    out = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    paths = {}
    for tag, args in (("plain", None), ("namespace", argparse.Namespace(lr=0.1, epochs=3)),
                      ("object", PurePosixPath("/data/train"))):  # fmt: skip
        torch.manual_seed(0)
        module = cls(args=args)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        paths[tag] = out / f"{tag}.ckpt"
        trainer.save_checkpoint(str(paths[tag]))
    return {"cls": cls, **paths}


def test_lightning_ckpt(lightning_ckpts: dict[str, Any], tmp_path: Path) -> None:
    cls, path = lightning_ckpts["cls"], lightning_ckpts["plain"]
    assert detect_format(str(path)) == "lightning"
    saved = torch.load(path, weights_only=True)
    repo = str(tmp_path / "repo")
    m = import_from(str(path), repo, model=cls())
    _ok(repo)
    assert set(m.components) == {"model", "optimizer", "scheduler"}
    assert (m.progress.epoch, m.progress.global_step) == (saved["epoch"], saved["global_step"])
    assert m.progress.global_step == 2
    assert m.hparams["lightning_hyper_parameters"] == {"hidden": 8, "args": None}
    src = _source(repo)
    assert src["format"] == "lightning" and src["lightning_version"] == saved["pytorch-lightning_version"]
    assert src["files"] == {"plain.ckpt": file_hash(str(path))}

    fresh = cls()
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    res = ckptkit.restore(repo, {"model": fresh, "optimizer": opt, "scheduler": sched}, rng=False)
    assert all(r.ok for r in res.reports.values())
    assert all(_same(fresh.state_dict()[k], v) for k, v in saved["state_dict"].items())
    restored = opt.state_dict()["state"]
    for i, s in saved["optimizer_states"][0]["state"].items():
        assert _same(restored[i]["exp_avg"], s["exp_avg"]) and _same(restored[i]["exp_avg_sq"], s["exp_avg_sq"])
    assert sched.state_dict()["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"]

    # Without the module, BatchNorm's running stats make the parameter order ambiguous: keyed by position, said so.
    repo2 = str(tmp_path / "repo2")
    m2 = import_from(str(path), repo2)
    _ok(repo2)
    assert "param_groups[0][0]" in str(m2.components["optimizer"].state)
    assert any("keyed by position" in str(n) for n in _source(repo2)["notes"])  # type: ignore[union-attr]
    fresh2 = cls()
    ckptkit.restore(repo2, {"model": fresh2}, rng=False)  # strict
    assert all(_same(fresh2.state_dict()[k], v) for k, v in saved["state_dict"].items())


def test_lightning_pickled_hyperparameters_are_read_as_data_or_refused(
    lightning_ckpts: dict[str, Any], tmp_path: Path
) -> None:
    """An argparse.Namespace in hyper_parameters (Lightning's save_hyperparameters of a script's args) holds only
    data: it is read as its attributes. Any other object is refused, naming its class and entry."""
    m = import_from(str(lightning_ckpts["namespace"]), str(tmp_path / "ns"))
    assert m.hparams["lightning_hyper_parameters"] == {"hidden": 8, "args": {"lr": 0.1, "epochs": 3}}
    path = lightning_ckpts["object"]
    with pytest.raises(UnsupportedStateError) as err:
        import_from(str(path), str(tmp_path / "repo"))
    msg = str(err.value)
    assert "pathlib.PurePosixPath" in msg and "'hyper_parameters.args'" in msg
    assert "pickled Python object" in msg and str(path) in msg
    with pytest.raises(UnsupportedStateError, match=r"pathlib\.PurePosixPath"):
        import_from(str(path), str(tmp_path / "repo"), format="lightning")
    assert not os.path.exists(tmp_path / "repo" / "manifests") or not os.listdir(tmp_path / "repo" / "manifests")


# --- timm ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """timm's own CheckpointSaver, after a real training step of a tiny timm model with timm's optimizer factory."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver

    out = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    args = argparse.Namespace(model="test_resnet", lr=1e-3, epochs=10)
    with_args, no_args = out / "with-args", out / "no-args"
    with_args.mkdir()
    no_args.mkdir()
    CheckpointSaver(model, opt, args=args, checkpoint_dir=str(with_args), recovery_dir=str(with_args)).save_checkpoint(
        3, metric=0.25
    )
    # The same file without the pickled args (what timm's clean_checkpoint / a re-save without 'args' leaves);
    # weights_only=False is fine here: the test wrote this file itself.
    ckpt = torch.load(with_args / "last.pth.tar", weights_only=False)
    del ckpt["args"]
    clean = out / "clean.pth.tar"
    torch.save(ckpt, clean)
    CheckpointSaver(model, opt, checkpoint_dir=str(no_args), recovery_dir=str(no_args)).save_checkpoint(3)
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=0.9)
    ema.update(model)
    with_ema = out / "with-ema"
    with_ema.mkdir()
    CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=str(with_ema),
                    recovery_dir=str(with_ema)).save_checkpoint(3)  # fmt: skip
    return {
        "with_ema": with_ema / "last.pth.tar",
        "model": model,
        "opt": opt,
        "with_args": with_args / "last.pth.tar",
        "clean": clean,
        "no_args": no_args / "last.pth.tar",
    }


def test_timm_train_py_checkpoint_with_args_imports_whole(timm_ckpts: dict[str, Any], tmp_path: Path) -> None:
    """timm's train.py passes its argparse.Namespace to CheckpointSaver, which stores it as 'args': it is read as
    plain data (nothing of argparse is run), recorded as hyperparameters, and the model, optimizer and progress
    import and restore as from a checkpoint without args."""
    import timm
    from timm.optim import create_optimizer_v2

    path = timm_ckpts["with_args"]
    repo = str(tmp_path / "repo")
    m = import_from(str(path), repo)
    _ok(repo)
    assert m.hparams["timm_args"] == {"model": "test_resnet", "lr": 1e-3, "epochs": 10}
    assert m.components["model"].adapter == "timm" and m.progress.epoch == 3
    assert "args" not in _source(repo)["skipped"]  # type: ignore[operator]
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    opt = create_optimizer_v2(fresh, "adamw", lr=1e-3, weight_decay=0.05)
    res = ckptkit.restore(repo, {"model": fresh, "optimizer": opt}, rng=False)
    assert all(r.ok for r in res.reports.values()), res.reports
    model = timm_ckpts["model"]
    assert all(_same(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    for p_new, p_old in zip(fresh.parameters(), model.parameters(), strict=True):
        assert _same(opt.state[p_new]["exp_avg"], timm_ckpts["opt"].state[p_old]["exp_avg"])


def test_timm_checkpoint_with_ema_restores_model_ema_and_optimizer_in_one_call(
    timm_ckpts: dict[str, Any], tmp_path: Path
) -> None:
    """timm's CheckpointSaver with ModelEmaV3: the optimizer is named without a component prefix (one model in
    the file), and a restore of model, EMA and optimizer together (names prefixed: two models) must still match."""
    import timm
    from timm.optim import create_optimizer_v2

    path = timm_ckpts["with_ema"]
    saved = torch.load(path, weights_only=True)
    repo = str(tmp_path / "repo")
    # Saved without args, the file names no timm architecture: model= names the parameters.
    m = import_from(str(path), repo, model=timm.create_model("test_resnet", pretrained=False, num_classes=5))
    assert set(m.components) >= {"model", "model_ema", "optimizer"}
    assert "fc.weight" in str(m.components["optimizer"].state)  # named as with one model: no component prefix
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    ema = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    opt = create_optimizer_v2(fresh, "adamw", lr=1e-3, weight_decay=0.05)
    res = ckptkit.restore(repo, {"model": fresh, "model_ema": ema, "optimizer": opt}, rng=False)
    assert all(r.ok for r in res.reports.values()), res.reports
    assert all(_same(ema.state_dict()[k], v) for k, v in saved["state_dict_ema"].items())
    restored = opt.state_dict()
    for i, s in saved["optimizer"]["state"].items():
        assert _same(restored["state"][i]["exp_avg"], s["exp_avg"])


def test_timm_checkpoint(timm_ckpts: dict[str, Any], tmp_path: Path) -> None:
    import timm
    from timm.optim import create_optimizer_v2

    path = timm_ckpts["clean"]
    assert detect_format(str(path)) == "timm"
    saved = torch.load(path, weights_only=True)
    repo = str(tmp_path / "repo")
    m = import_from(str(path), repo, "timm-epoch-3")
    _ok(repo)
    model_c = m.components["model"]
    assert model_c.adapter == "timm"
    assert model_c.meta["architecture"] == "test_resnet" and model_c.meta["num_classes"] == 5
    assert isinstance(model_c.meta["pretrained_cfg"], dict) and model_c.meta["pretrained_cfg"]["classifier"] == "fc"
    assert m.progress.epoch == 3 and m.metrics["metric"] == 0.25
    assert "fc.weight" in str(m.components["optimizer"].state)

    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    opt = create_optimizer_v2(fresh, "adamw", lr=1e-3, weight_decay=0.05)
    res = ckptkit.restore(repo, {"model": fresh, "optimizer": opt}, rng=False)
    assert all(r.ok for r in res.reports.values())
    assert all(_same(fresh.state_dict()[k], v) for k, v in saved["state_dict"].items())
    restored = opt.state_dict()
    assert [g["weight_decay"] for g in restored["param_groups"]] == [
        g["weight_decay"] for g in saved["optimizer"]["param_groups"]
    ]
    for i, s in saved["optimizer"]["state"].items():
        assert _same(restored["state"][i]["exp_avg"], s["exp_avg"])

    # CheckpointSaver without args records the class name ('resnet'), which is no timm model name: plain adapter
    repo2 = str(tmp_path / "repo2")
    m2 = import_from(str(timm_ckpts["no_args"]), repo2)
    _ok(repo2)
    assert m2.components["model"].adapter == "plain"
    assert any("not a timm model name" in str(n) for n in _source(repo2)["notes"])  # type: ignore[union-attr]
    # ... and with the model given, it is named and checked by it
    repo3 = str(tmp_path / "repo3")
    m3 = import_from(str(timm_ckpts["no_args"]), repo3, model=timm.create_model("test_resnet", num_classes=5))
    assert m3.components["model"].adapter == "timm" and "fc.weight" in str(m3.components["optimizer"].state)
    ckptkit.restore(repo3, {"model": timm.create_model("test_resnet", num_classes=5)}, rng=False)


# --- MMDetection / mmengine --------------------------------------------------------------------------------


def _detector() -> torch.nn.Module:
    from torchvision.ops import FeaturePyramidNetwork

    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "backbone": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)),
        "neck": FeaturePyramidNetwork([8, 16], 8),
        "bbox_head": torch.nn.Conv2d(8, 4 + 3, 1),
    })  # fmt: skip


def test_mmdet_checkpoint(tmp_path: Path) -> None:
    # mmdet does not run here (its models need mmcv's compiled ops): this is the structure mmengine's
    # Runner.save_checkpoint writes for a detector (a 'meta' dict, 'state_dict', 'optimizer' =
    # OptimWrapper.state_dict(), 'param_schedulers'), with torch's own scheduler; tests/test_mmengine.py writes one
    # from mmengine's own schedulers, MessageHub and OptimWrapper.
    model = _detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    feats = {"0": torch.randn(1, 8, 8, 8), "1": torch.randn(1, 16, 4, 4)}
    x = model["backbone"](torch.randn(1, 3, 10, 10)).sum() + sum(v.sum() for v in model["neck"](feats).values())
    (x + model["bbox_head"](torch.randn(1, 8, 2, 2)).sum()).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [8, 11])
    ckpt = {
        "meta": {"mmengine_version": "0.10.4", "epoch": 12, "iter": 3000, "seed": 42, "time": "20240101_000000",
                 "cfg": "model = dict(type='RetinaNet')", "experiment_name": "retinanet",
                 "dataset_meta": {"classes": ("cat", "dog", "bird"), "palette": [(220, 20, 60), (119, 11, 32),
                                                                                  (0, 0, 142)]}},
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "param_schedulers": [sched.state_dict()],
    }  # fmt: skip
    path = tmp_path / "epoch_12.pth"
    torch.save(ckpt, path)
    assert detect_format(str(path)) == "mmdet"
    repo = str(tmp_path / "repo")
    m = import_from(str(path), repo)
    _ok(repo)
    assert m.name == "epoch_12"
    assert m.components["model"].adapter == "plain" and m.components["model"].meta["labels"] == ["cat", "dog", "bird"]
    assert (m.progress.epoch, m.progress.global_step) == (12, 3000)
    mm_meta = m.hparams["mmengine_meta"]
    assert isinstance(mm_meta, dict) and mm_meta["dataset_meta"] == {"classes": ["cat", "dog", "bird"],
                                                                      "palette": [[220, 20, 60], [119, 11, 32], [0, 0, 142]]}  # fmt: skip
    assert "param_groups[0][0]" in str(m.components["optimizer"].state)
    src = _source(repo)
    assert src["mmengine_version"] == "0.10.4" and any("keyed by position" in str(n) for n in src["notes"])  # type: ignore[union-attr]
    fresh = _detector()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    ckptkit.restore(repo, {"model": fresh}, rng=False)
    assert all(_same(fresh.state_dict()[k], v) for k, v in model.state_dict().items())

    # With the model given, the optimizer is keyed by name (checked against the saved momentum buffers)
    repo2 = str(tmp_path / "repo2")
    import_from(str(path), repo2, model=_detector())
    _ok(repo2)
    fresh2 = _detector()
    opt2 = torch.optim.SGD(fresh2.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, [8, 11])
    res = ckptkit.restore(repo2, {"model": fresh2, "optimizer": opt2, "scheduler": sched2}, rng=False)
    assert all(r.ok for r in res.reports.values())
    for i, s in opt.state_dict()["state"].items():
        assert _same(opt2.state_dict()["state"][i]["momentum_buffer"], s["momentum_buffer"])


# --- torch.distributed.checkpoint ----------------------------------------------------------------------------


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 2))  # fmt: skip


def _trained_mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def _dcp_save(state: dict[str, Any], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming ... a single process"
        dcp.save(state, checkpoint_id=str(folder))  # one process, no process group needed


def test_dcp_checkpoints(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _trained_mlp()
    model_sd, optim_sd = get_state_dict(model, opt)  # optimizer state keyed by parameter name
    named, positional = tmp_path / "named", tmp_path / "positional"
    _dcp_save({"model": model_sd, "optimizer": optim_sd, "step": 7, "epoch": 1}, named)
    _dcp_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, positional)
    saved = opt.state_dict()
    for folder, note in ((named, "keyed by parameter name in the checkpoint"), (positional, "named by order")):
        assert detect_format(str(folder)) == "dcp"
        repo = str(tmp_path / f"repo-{folder.name}")
        m = import_from(str(folder), repo)
        _ok(repo)
        src = _source(repo)
        assert src["format"] == "dcp" and ".metadata" in src["files"]  # type: ignore[operator]
        assert any(note in str(n) for n in src["notes"]), src["notes"]  # type: ignore[union-attr]
        fresh = _mlp()
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        res = ckptkit.restore(repo, {"model": fresh, "optimizer": fresh_opt}, rng=False)
        assert all(r.ok for r in res.reports.values())
        assert all(_same(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
        for i, s in saved["state"].items():
            got = fresh_opt.state_dict()["state"][i]
            assert _same(got["exp_avg"], s["exp_avg"]) and _same(got["step"], s["step"])
        assert fresh_opt.param_groups[0]["lr"] == 1e-2
        if folder is named:
            assert (m.progress.global_step, m.progress.epoch) == (7, 1)


def test_dcp_refuses_pickled_objects(tmp_path: Path) -> None:
    model, _ = _trained_mlp()
    # a non-tensor entry DCP stores with torch.save: read with weights_only=True, so an object is refused
    objects = tmp_path / "objects"
    _dcp_save({"model": model.state_dict(), "config": PurePosixPath("/data/train")}, objects)
    with pytest.raises(UnsupportedStateError) as err:
        import_from(str(objects), str(tmp_path / "repo"))
    assert "pathlib.PurePosixPath" in str(err.value) and "'config'" in str(err.value)

    # .metadata itself is a pickle: only DCP's metadata classes are resolved; nothing else is imported or run
    evil = tmp_path / "evil"
    shutil.copytree(objects, evil)
    marker = tmp_path / "ran"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsupportedStateError, match=rf"needs {_MKDIR}, which is not one of DCP's metadata classes"):
        import_from(str(evil), str(tmp_path / "repo"))
    assert not marker.exists()


_MKDIR = f"{os.mkdir.__module__}.{os.mkdir.__name__}"  # posix.mkdir


class _Payload:
    """Pickles as a call of os.mkdir(path): would create ``path`` if anything unpickled it for real."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.path),))


# --- detection and refusals ----------------------------------------------------------------------------------


def test_unknown_layouts_are_explained(tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ImportFormatError) as err:
        import_from(str(folder), str(tmp_path / "repo"))
    assert "notes.txt" in str(err.value) and all(f in str(err.value) for f in FORMATS)

    bare = tmp_path / "weights.pt"
    torch.save(_mlp().state_dict(), bare)
    with pytest.raises(ImportFormatError, match="bare state dict"):
        import_from(str(bare), str(tmp_path / "repo"))
    with pytest.raises(ImportFormatError, match="unknown format"):
        import_from(str(bare), str(tmp_path / "repo"), format="keras")
    with pytest.raises(ImportFormatError, match="is a file"):
        import_from(str(bare), str(tmp_path / "repo"), format="dcp")
    with pytest.raises(FileNotFoundError):
        import_from(str(tmp_path / "missing.ckpt"), str(tmp_path / "repo"))


def test_pickle_scan_finds_globals_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for protocol in (2, 4, 5):
        data = pickle.dumps({"a": [1, _Payload(marker)], "b": OrderedDict(c=2)}, protocol=protocol)
        assert unsafe_globals(data) == [_MKDIR]
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {"hook": _Payload(marker)}}, path)
    with pytest.raises(UnsupportedStateError) as err:
        import_from(str(path), str(tmp_path / "repo"))
    assert f"entry 'meta.hook' needs {_MKDIR}" in str(err.value)
    assert not marker.exists()


def test_optimizer_saved_beside_one_model_restores_beside_two(tmp_path: Path) -> None:
    """Parameter names carry the component prefix only when the state holds several models: a checkpoint of
    {model, optimizer} restores into {model, ema, optimizer} (and back) with every moment where it belongs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ckptkit.save(one, {"model": model, "optimizer": opt}, "a", rng=False)
    ckptkit.save(two, {"model": model, "ema": torch.nn.Linear(4, 2), "optimizer": opt}, "a", rng=False)
    for src, state_models in ((one, ("model", "ema")), (two, ("model",))):
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        fopt = torch.optim.AdamW(fresh.parameters())
        state: dict[str, Any] = {"model": fresh, "optimizer": fopt}
        if "ema" in state_models:
            state["ema"] = torch.nn.Linear(4, 2)
        res = ckptkit.restore(src, state, rng=False, strict=src == two)  # `one` has no ema to restore
        assert res.reports["optimizer"].ok
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(opt.state[p]["exp_avg"], fopt.state[q]["exp_avg"])
