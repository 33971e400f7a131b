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
