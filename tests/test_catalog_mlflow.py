"""Publishing to MLflow 3 (ckptkit.catalog.mlflow), against a real ``mlflow server`` with an SQLite backend store,
started on a free loopback port once for this module.

The server is the full ``mlflow`` package, installed apart from the project's venv (.ci/mlflow-server-venv makes
.venv-mlflow/; see .ci/mlflow-server-requirements.txt for why); the client is the project's own ``mlflow-skinny``
(the ``mlflow`` extra), as a user has it. Without them the tests are skipped, with ``CI=true`` they fail.

A small history is saved once: a base run (init, train), resumed, continued on new data, and a model transferred
from it into a second repository; it is indexed into a catalog and published with ``ckptkit catalog publish``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit.catalog import Catalog
from ckptkit.errors import InvalidArgumentError, StorageError
from ckptkit.schema import DataSegment, Manifest

sys.path.insert(0, str(Path(__file__).parent))
from cli_driver import run_cli

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # nothing leaves the machine


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(why: str) -> None:
    if _in_ci():
        pytest.fail(f"the MLflow tests cannot run in CI (CI={os.environ.get('CI')}): {why}", pytrace=False)
    pytest.skip(f"the MLflow tests need {why}")


def _server_command() -> list[str] | None:
    """How to run `mlflow server`: $CKPTKIT_MLFLOW_SERVER, .venv-mlflow/, or this interpreter's full mlflow."""
    given = os.environ.get("CKPTKIT_MLFLOW_SERVER")
    if given:
        return [given]
    venv = ROOT / ".venv-mlflow" / "bin" / "mlflow"
    if venv.exists():
        return [str(venv)]
    import importlib.util

    if importlib.util.find_spec("flask") is not None and importlib.util.find_spec("mlflow.server") is not None:
        return [sys.executable, "-m", "mlflow"]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _need_client() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as err:
        _unavailable(f"the MLflow client ({err}): pip install -c constraints.txt -e '.[dev]'")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend store, artifacts in a temporary folder) on loopback."""
    _need_client()
    cmd = _server_command()
    if cmd is None:
        _unavailable("an MLflow server: run `bash .ci/mlflow-server-venv` (or set CKPTKIT_MLFLOW_SERVER to the "
                     "path of an `mlflow` executable)")  # fmt: skip
    assert cmd is not None
    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logf = open(tmp / "server.log", "wb")  # noqa: SIM115  (closed below, after the server)
    proc = subprocess.Popen([*cmd, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            cwd=tmp, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **QUIET},
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180  # ~30 s on a loaded 2-CPU machine (its migrations on a fresh database)
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                logf.flush()
                tail = (tmp / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"the MLflow server did not start ({cmd}, exit {proc.poll()}):\n{tail}", pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(15)
        logf.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _models(uri: str, experiment: str) -> dict[str, Any]:
    """Checkpoint id -> logged model, of every logged model in the experiment (fails on a duplicate)."""
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    out: dict[str, Any] = {}
    token = None
    while True:
        page = c.search_logged_models([exp.experiment_id], max_results=100, page_token=token)
        for m in page:
            cid = m.tags["ckptkit.checkpoint_id"]
            assert cid not in out, f"checkpoint {cid} published twice"
            out[cid] = m
        token = page.token
        if not token:
            return out


def _bump(model: torch.nn.Module, by: float = 0.01) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


@dataclass
class Chain:
    base: str
    fine: str
    catalog: str
    m: dict[str, Manifest]  # "base/step-00000001" -> manifest


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """train -> resume -> continue (new data) in one repository, then a transfer into another; indexed."""
    tmp = tmp_path_factory.mktemp("mlflow-chain")
    base, fine = str(tmp / "base"), str(tmp / "fine")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    mgr = ckptkit.CheckpointManager(base, state, data=DataSegment(name="part-1", fingerprint="f1", size=10),
                                    hparams={"lr": 0.1, "arch": "linear"})  # fmt: skip
    for s in (1, 2):
        _bump(model)
        mgr.save(s, samples_seen=4 * s, metrics={"loss": 1.0 / s})
    mgr.close()
    mgr = ckptkit.CheckpointManager(base, state, hparams={"lr": 0.1})  # a new process resumes
    mgr.restore()
    _bump(model)
    mgr.save(3, samples_seen=12, metrics={"loss": 0.3, "acc": float("nan")})
    mgr.close()
    mgr = ckptkit.CheckpointManager(base, state, hparams={"lr": 0.05})
    mgr.continue_from(new_data=DataSegment(name="part-2", fingerprint="f2", size=5), lr=0.05)
    _bump(model)
    mgr.save(4, samples_seen=16, metrics={"loss": 0.2, "acc": 0.9})
    mgr.close()
    torch.manual_seed(1)
    clf = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 3))
    cm = ckptkit.CheckpointManager(fine, {"model": clf}, data=DataSegment(name="part-3", fingerprint="f3"))
    cm.transfer_from(base, key_map={"0.{}": "{}"})  # a parent in another repository
    _bump(clf[1], 0.5)
    cm.save(1, metrics={"loss": 0.05})
    cm.close()
    catalog = str(tmp / "catalog.db")
    with Catalog(catalog) as cat:
        assert cat.add(base, hash_tensors=False).ok and cat.add(fine, hash_tensors=False).ok
    m = {f"{Path(u).name}/{x.name}": x for u in (base, fine) for x in ckptkit.checkpoints(u)}
    assert [x.lineage.relation for x in m.values()] == ["init", "train", "resume", "continue", "transfer"]
    return Chain(base, fine, catalog, m)


def _publish(uri: str, chain: Chain, *extra: str) -> dict[str, Any]:
    [res] = run_cli([["catalog", "--catalog", chain.catalog, "publish", "--mlflow", uri, "--json", *extra]],
                    env=QUIET)  # fmt: skip
    assert res["rc"] == 0, res["err"]
    report: dict[str, Any] = json.loads(res["out"])
    return report


# --- publishing the catalog -----------------------------------------------------------------------------


def test_each_checkpoint_becomes_a_logged_model_with_its_step_metrics_data_parents_and_location(
        mlflow_uri: str, chain: Chain) -> None:  # fmt: skip
    report = _publish(mlflow_uri, chain)
    assert (report["created"], report["existing"], report["experiment"]) == (5, 0, "ckptkit")
    models = _models(mlflow_uri, "ckptkit")
    assert set(models) == {m.id for m in chain.m.values()}
    c = _client(mlflow_uri)
    runs = set()
    for key, m in chain.m.items():
        repo = chain.base if key.startswith("base/") else chain.fine
        lm = c.get_logged_model(models[m.id].model_id)  # what the server holds, metrics included
        assert str(lm.status) == "READY" and lm.model_type == "ckptkit-checkpoint" and lm.name == m.name
        t = lm.tags
        assert (t["ckptkit.name"], t["ckptkit.repo"], t["ckptkit.relation"], t["ckptkit.status"]) == (
            m.name, repo, m.lineage.relation, "committed")
        assert int(t["ckptkit.step"]) == m.progress.global_step and t["mlflow.model.isExternal"] == "true"
        # a reference to the weights, not a copy: the manifest's URL in its repository
        assert t["ckptkit.location"] == f"{repo}/checkpoints/{m.name}.json" and Path(t["ckptkit.location"]).is_file()
        # metrics at the checkpoint's step; NaN is the run's only (a logged model cannot hold it)
        finite = {k: v for k, v in m.metrics.items() if math.isfinite(v)}
        assert {x.key: (x.value, x.step) for x in lm.metrics} == {k: (v, m.progress.global_step)
                                                                  for k, v in finite.items()}
        assert lm.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in m.hparams.items()}
        data = json.loads(t["ckptkit.data"])
        assert [(d["name"], d["fingerprint"]) for d in data] == [(d.name, d.fingerprint) for d in m.data]
        # the parent link: its checkpoint id, and its MLflow model id (parents are published first)
        assert t["ckptkit.parent_ids"] == ",".join(p.id for p in m.lineage.parents)
        if m.lineage.parents:
            assert t["ckptkit.parent_model_id"] == models[m.lineage.parents[0].id].model_id
            assert [p["model_id"] for p in json.loads(t["ckptkit.parents"])] == [
                models[p.id].model_id for p in m.lineage.parents]
        else:
            assert "ckptkit.parent_model_id" not in t
        # the MLflow run that stands for the ckptkit run: the metrics' curve, the model as its output
        run = c.get_run(lm.source_run_id)
        assert run.data.tags["ckptkit.run"] == m.lineage.run
        assert lm.model_id in [o.model_id for o in run.outputs.model_outputs]
        runs.add(lm.source_run_id)
    assert len(runs) == 4  # base's first run (2 saves), its resume, its continue, the fine-tune
    step3 = chain.m["base/step-00000003"]
    run3 = c.get_run(models[step3.id].source_run_id)
    assert run3.data.metrics["loss"] == 0.3 and math.isnan(run3.data.metrics["acc"])  # NaN kept
    transfer = models[chain.m["fine/step-00000001"].id]
    assert transfer.tags["ckptkit.parent_model_id"] == models[chain.m["base/step-00000004"].id].model_id

    # again: nothing new is created, through the CLI's text output and through the Python API
    [res] = run_cli([["catalog", "--catalog", chain.catalog, "publish", "--mlflow", mlflow_uri]], env=QUIET)
    assert res["rc"] == 0 and "published 0 checkpoint(s), 5 already there" in res["out"], res
    from ckptkit.catalog.mlflow import MlflowPublisher

    with Catalog(chain.catalog) as cat:
        again = MlflowPublisher(mlflow_uri).publish_catalog(cat)
    assert (again.created, again.existing) == (0, 5) and not any(p.updated for p in again.published)
    assert _models(mlflow_uri, "ckptkit").keys() == models.keys()


def test_one_repository_into_another_experiment_and_a_publish_cut_short_is_finished(mlflow_uri: str,
                                                                                    chain: Chain) -> None:  # fmt: skip
    from mlflow.entities import LoggedModelStatus

    c = _client(mlflow_uri)
    eid = c.create_experiment("cut-short")
    step1 = chain.m["base/step-00000001"]
    # a publish that died after creating the model: PENDING, no metrics; the next publish finishes it
    pending = c.create_logged_model(eid, name=step1.name, tags={"ckptkit.checkpoint_id": step1.id})
    report = _publish(mlflow_uri, chain, "--experiment", "cut-short", "--repo", chain.base)
    assert (report["created"], report["existing"]) == (3, 1)
    models = _models(mlflow_uri, "cut-short")
    assert set(models) == {m.id for k, m in chain.m.items() if k.startswith("base/")}
    done = c.get_logged_model(pending.model_id)
    assert done.status == LoggedModelStatus.READY and [(x.key, x.step) for x in done.metrics] == [("loss", 1)]
    assert done.tags["ckptkit.location"].endswith("/checkpoints/step-00000001.json")  # tags and params completed
    assert done.tags["ckptkit.step"] == "1" and done.params == {"arch": "linear", "lr": "0.1"}


# --- publishing as the manager saves --------------------------------------------------------------------


def test_the_manager_publishes_each_commit_as_it_saves(mlflow_uri: str, tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    mgr = ckptkit.CheckpointManager(str(tmp_path / "live"), {"model": model}, mlflow=mlflow_uri,
                                    mlflow_experiment="live", hparams={"lr": 0.01},
                                    data=DataSegment(name="stream", fingerprint="s1"))  # fmt: skip
    saved = []
    for s in (1, 2, 3):
        _bump(model)
        saved.append(mgr.save(s, samples_seen=2 * s, metrics={"loss": 1.0 / s}))
    publisher = mgr._mlflow
    assert publisher is not None and publisher.flush(60)
    mgr.close()
    assert (publisher.published, publisher.rejected, publisher.dropped) == (3, 0, 0)
    models = _models(mlflow_uri, "live")
    assert set(models) == {m.id for m in saved}
    for prev, m in zip([None, *saved[:-1]], saved, strict=True):
        t = models[m.id].tags
        assert int(t["ckptkit.step"]) == m.progress.global_step
        assert t["ckptkit.location"] == f"{tmp_path / 'live'}/checkpoints/{m.name}.json"
        assert json.loads(t["ckptkit.data"])[0]["name"] == "stream"
        assert t.get("ckptkit.parent_model_id") == (None if prev is None else models[prev.id].model_id)
    with pytest.raises(InvalidArgumentError, match="without mlflow=URI"):
        ckptkit.CheckpointManager(str(tmp_path / "x"), {"model": model}, mlflow_experiment="live")


# --- a server that is down ------------------------------------------------------------------------------


def test_a_down_server_fails_no_save_and_the_cli_says_what_where_and_how(tmp_path: Path, chain: Chain,
                                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    _need_client()
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: connection refused
    model = torch.nn.Linear(3, 1)
    caplog.set_level(logging.WARNING, logger="ckptkit")
    mgr = ckptkit.CheckpointManager(str(tmp_path / "run"), {"model": model}, mlflow=down)
    t0 = time.monotonic()
    for s in (1, 2, 3):
        _bump(model)
        assert mgr.save(s, metrics={"loss": 1.0}) is not None
    saves = time.monotonic() - t0
    t0 = time.monotonic()
    mgr.close()
    closing = time.monotonic() - t0
    assert len(ckptkit.checkpoints(str(tmp_path / "run"))) == 3
    assert saves < 30 and closing < 12, (saves, closing)  # never waits on the MLflow client's retries
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"MLflow {down} unreachable" in x and "saves go on" in x for x in msgs), msgs
    assert any("3 checkpoint(s) of" in x and "not published" in x and "ckptkit catalog publish --mlflow" in x
               for x in msgs), msgs  # fmt: skip

    t0 = time.monotonic()
    [res] = run_cli([["catalog", "--catalog", chain.catalog, "publish", "--mlflow", down]], env=QUIET)
    assert res["rc"] == 2 and time.monotonic() - t0 < 60, res
    err = res["err"]
    assert err.startswith("error: reaching the MLflow tracking server") and down in err, err
    assert "refused" in err.lower() and "mlflow server --backend-store-uri" in err, err

    from ckptkit.catalog.mlflow import MlflowPublisher

    with pytest.raises(StorageError, match="no answer"):
        MlflowPublisher(down, timeout=2).check()


def test_a_url_that_is_not_an_mlflow_server_is_named(mlflow_uri: str, tmp_path: Path) -> None:
    from ckptkit.catalog.mlflow import MlflowPublisher

    with pytest.raises(StorageError, match="not an MLflow tracking server"):
        MlflowPublisher(f"{mlflow_uri}/not/here").check()
    with pytest.raises(InvalidArgumentError, match="tracking server's URI"):
        MlflowPublisher("  ")
