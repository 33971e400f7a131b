"""A DCP folder written by two gloo processes: DCP lists the model's tensors in write order, not parameter order,
so naming numbered optimizer state by that order would swap Adam moments between same-shaped layers and restore
would report success (issue 12, defect 1). The import names them by the model when given, else keeps them
positional and says why; never by a guessed order."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit.errors import StateMismatchError

sys.path.insert(0, str(Path(__file__).parent))
from cli_driver import run_cli
from dcp_writer import build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_rank_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dcp") / "ckpt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    writer = str(Path(__file__).parent / "dcp_writer.py")
    procs = [subprocess.Popen([sys.executable, writer, str(folder)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    assert {f.name for f in folder.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    return folder


def _moments(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    return [opt.state[p]["exp_avg"] for p in model.parameters()]


def test_two_rank_dcp_optimizer_is_named_by_the_model_exactly(two_rank_folder: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    ckptkit.import_from(str(two_rank_folder), repo, model=build())
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckptkit.restore(repo, {"model": model, "optimizer": opt}, rng=False)
    ref = torch.load(f"{two_rank_folder}-ref.pt", weights_only=True)
    for i, got in enumerate(_moments(opt, model)):
        assert torch.equal(got, ref["state"][i]["exp_avg"]), f"parameter {i}: moments of another layer"
        assert torch.equal(opt.state[list(model.parameters())[i]]["exp_avg_sq"], ref["state"][i]["exp_avg_sq"])


def test_two_rank_dcp_optimizer_without_a_model_is_never_named_by_write_order(
    two_rank_folder: Path, tmp_path: Path
) -> None:
    repo = str(tmp_path / "repo")
    m = ckptkit.import_from(str(two_rank_folder), repo)
    notes = m.lineage.source["notes"]  # type: ignore[index]
    assert any("several ranks" in n and "model=" in n for n in notes), notes  # type: ignore[union-attr]
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(StateMismatchError):  # refused, never a silent swap
        ckptkit.restore(repo, {"model": model, "optimizer": opt}, rng=False)
    ckptkit.restore(repo, {"model": model}, rng=False)  # the weights themselves import exactly
    state = model.state_dict()
    ref_model = build()
    assert state.keys() == ref_model.state_dict().keys()


def test_cli_import_names_the_optimizer_by_a_model_spec(two_rank_folder: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "import", str(two_rank_folder), repo,
                          "--model", "dcp_writer:build"], cwd=Path(__file__).parent,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckptkit.restore(repo, {"model": model, "optimizer": opt}, rng=False)
    ref = torch.load(f"{two_rank_folder}-ref.pt", weights_only=True)
    assert all(torch.equal(got, ref["state"][i]["exp_avg"]) for i, got in enumerate(_moments(opt, model)))
    cases = (("nonsense", "timm:NAME"), ("timm:no_such_model_xyz", "no model"),
             ("torchvision:resnet18,bogus=1", "bogus"), ("hf:" + str(tmp_path), "config.json"))  # fmt: skip
    results = run_cli([["import", str(two_rank_folder), str(tmp_path / "other"), "--model", spec]
                       for spec, _ in cases])  # fmt: skip
    for (spec, says), bad in zip(cases, results, strict=True):
        assert bad["rc"] == 2 and bad["err"].startswith("error:") and says in bad["err"], (spec, bad["err"])
    assert not (tmp_path / "other").exists() or ckptkit.api.checkpoints(str(tmp_path / "other")) == []


def test_model_specs_build_fresh_models(tmp_path: Path) -> None:
    from transformers import BertConfig

    from ckptkit.interop.model_spec import build_model, parse_spec

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)  # fmt: skip
    assert type(build_model(f"hf:{tmp_path},num_labels=4")).__name__ == "BertForSequenceClassification"

    assert parse_spec("timm:resnet18,num_classes=10,drop_rate=0.1") == (
        "timm", "resnet18", {"num_classes": 10, "drop_rate": 0.1})
    assert build_model("timm:test_resnet,num_classes=5").get_classifier().out_features == 5  # type: ignore[operator,union-attr]
    assert build_model("torchvision:fasterrcnn_resnet50_fpn,num_classes=3").roi_heads.box_predictor.cls_score.out_features == 3  # type: ignore[union-attr]
    assert isinstance(build_model("torch.nn:Linear,in_features=2,out_features=3"), torch.nn.Linear)
