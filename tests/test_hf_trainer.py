"""ckptkit inside HF ``transformers.Trainer`` (CkptkitCallback) and export back to a Trainer checkpoint folder.

Every Trainer run happens in a process of its own, forked from tests/hf_trainer_worker.py (a fork server: importing
transformers takes many seconds; each run is a fresh child of a process that imported it and trained nothing):

- a run saving through the callback every 2 steps (``save_strategy="no"``) is SIGKILLed after a commit, a fresh
  process resumes through ``cb.resume_from()`` and finishes: its final weights equal, bit for bit, those of a run
  that was never interrupted (which equal those of Trainer without the callback), and the lineage and retention
  record the resume;
- a mid-epoch checkpoint exported with ``format="hf-trainer"`` is resumed by a fresh Trainer from the folder alone,
  again bit for bit;
- exports that Trainer could not resume from are refused with typed errors, writing nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptkit
from ckptkit.errors import InvalidArgumentError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")

WORKER = Path(__file__).with_name("hf_trainer_worker.py")
sys.path.insert(0, str(Path(__file__).parent))
import hf_trainer_worker as worker  # noqa: E402 - imports nothing heavy at the top


class Server:
    """The test's end of the worker's fork server."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false",
               "PYTHONPATH": str(WORKER.parent.parent)}  # single-threaded after import: safe to fork
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1, env=env)  # fmt: skip
        self.child: int | None = None

    def fail(self, why: str) -> None:
        self.close()
        pytest.fail(f"{why}; worker stderr:\n{self.log.read_text()[-3000:]}")

    def until(self, prefix: str) -> list[str]:
        """Lines read up to and including the first that starts with ``prefix``."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.fail(f"worker ended; it said {lines}")
            if line.startswith("error "):
                self.fail(f"job failed: {line.strip()}")
            lines.append(line.strip())
            if line.startswith(prefix):
                return lines

    def start(self, **job: object) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.child = int(self.until("child ")[-1].split()[1])
        return self.child

    def reap(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        code = int(self.until("reaped ")[-1].split()[2])
        self.child = None
        return code

    def run(self, **job: object) -> list[str]:
        """Run a job to its end; its output lines."""
        self.start(**job)
        lines = self.until("done")
        assert self.reap() == 0, lines
        return lines

    def close(self) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
            self.child = None
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("hf-worker") / "stderr.txt")
    s.until("loaded")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An uninterrupted run saving every 2 steps (all kept), and the same run without the callback."""
    tmp = tmp_path_factory.mktemp("hf-ref")
    url = str(tmp / "repo")
    lines = server.run(job="train", url=url, tmp=str(tmp / "t1"), out=str(tmp / "ref.safetensors"))
    assert [int(x.split()[1]) for x in lines if x.startswith("committed ")] == list(range(2, worker.STEPS + 1, 2))
    server.run(job="plain", tmp=str(tmp / "t2"), out=str(tmp / "plain.safetensors"))
    return {"url": url, "weights": load_file(tmp / "ref.safetensors"), "plain": load_file(tmp / "plain.safetensors")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in any bit (or that one side lacks)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def test_the_callback_does_not_change_training(reference: dict[str, object]) -> None:
    ref, plain = reference["weights"], reference["plain"]
    assert isinstance(ref, dict) and isinstance(plain, dict)
    assert _same(ref, plain) == []
    m = ckptkit.checkpoints(str(reference["url"]))[-1]
    assert m.progress.global_step == worker.STEPS and m.progress.epoch == 2
    assert {"model", "optimizer", "scheduler", "trainer_state", "rng"} <= set(m.components)
    assert m.metrics["loss"] > 0 and m.progress.samples_seen == worker.STEPS * 4


def test_sigkill_mid_training_then_resume_is_bit_exact(server: Server, reference: dict[str, object],
                                                       tmp_path: Path) -> None:  # fmt: skip
    url = str(tmp_path / "repo")
    pid = server.start(job="train", url=url, slow=True, keep_last=1, tmp=str(tmp_path / "t1"),
                       out=str(tmp_path / "never.safetensors"))  # fmt: skip
    lines = server.until("committed 4")
    time.sleep(worker.SLOW_S / 2)  # a bit later: the worker sleeps SLOW_S after each step, so it is mid-run
    os.kill(pid, signal.SIGKILL)
    assert server.reap() == -signal.SIGKILL, f"the run ended before the kill: {lines}"
    assert not (tmp_path / "never.safetensors").exists()
    before = ckptkit.checkpoints(url)
    assert len(before) == 1 and 4 <= before[0].progress.global_step < worker.STEPS  # keep_last=1
    source = before[0]

    lines = server.run(job="train", url=url, keep_last=1, tmp=str(tmp_path / "t2"),
                       out=str(tmp_path / "resumed.safetensors"))  # fmt: skip
    assert "fidelity exact" in lines, lines
    committed = [int(x.split()[1]) for x in lines if x.startswith("committed ")]
    assert committed == list(range(source.progress.global_step + 2, worker.STEPS + 1, 2))
    ref = reference["weights"]
    assert isinstance(ref, dict)
    assert _same(load_file(tmp_path / "resumed.safetensors"), ref) == []

    after = {m.name: m for m in ckptkit.checkpoints(url)}
    assert source.name in after, "retention deleted the checkpoint the run resumed from"
    assert sorted(after) == [source.name, f"step-{worker.STEPS:08d}"]
    last = after[f"step-{worker.STEPS:08d}"]
    assert last.lineage.relation == "train" and last.lineage.run != source.lineage.run
    # the resumed run's first save (since pruned) recorded the resume: walk the archived chain back
    chain = ckptkit.storage.Repository(url)
    parent = last.lineage.parents[0].id
    seen = []
    while True:
        raw = chain.read_archived(parent)
        assert raw is not None, f"parent {parent} neither committed nor archived"
        m = ckptkit.schema.parse_manifest(raw, parent)
        seen.append((m.name, m.lineage.relation))
        if m.lineage.relation != "train":
            break
        parent = m.lineage.parents[0].id
    assert seen[-1] == (f"step-{source.progress.global_step + 2:08d}", "resume")
    assert m.lineage.parents[0].id == source.id and m.lineage.parents[0].relation == "resume"


def test_export_hf_trainer_folder_resumes_in_trainer_bit_exact(server: Server, reference: dict[str, object],
                                                               tmp_path: Path) -> None:  # fmt: skip
    dest = tmp_path / "checkpoint-8"
    lines = server.run(job="export", url=reference["url"], name="step-00000008", dest=str(dest),
                       tmp=str(tmp_path / "t"), out=str(tmp_path / "exported.safetensors"))  # fmt: skip
    files = json.loads(next(x for x in lines if x.startswith("files "))[6:])
    assert files == ["ckptkit.json", "config.json", "model.safetensors", "optimizer.pt", "rng_state.pth",
                     "scheduler.pt", "trainer_state.json"]  # fmt: skip
    ref = reference["weights"]
    assert isinstance(ref, dict)
    assert _same(load_file(tmp_path / "exported.safetensors"), ref) == []  # the fresh Trainer resumed exactly
    # what Trainer reads with weights_only=True holds plain tensors and containers, in Trainer's own layout
    m = ckptkit.inspect(str(reference["url"]), "step-00000008")
    osd = torch.load(dest / "optimizer.pt", weights_only=True)
    saved_groups = m.components["optimizer"].state["param_groups"]  # type: ignore[index]
    assert [len(g["params"]) for g in osd["param_groups"]] == [len(g["params"]) for g in saved_groups]
    assert [g["weight_decay"] for g in osd["param_groups"]] == [0.01, 0.0]
    assert sorted(osd["state"]) == list(range(sum(len(g["params"]) for g in osd["param_groups"])))
    assert torch.load(dest / "scheduler.pt", weights_only=True)["last_epoch"] == 8
    state = json.loads((dest / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and abs(state["epoch"] - 8 / 6) < 1e-9
    prov = json.loads((dest / "ckptkit.json").read_text())
    assert prov["checkpoint"] == m.id and prov["format"] == "hf-trainer" and prov["notes"] == []


def test_exports_trainer_cannot_resume_are_refused(server: Server, reference: dict[str, object],
                                                   tmp_path: Path) -> None:  # fmt: skip
    lines = server.run(job="refusals", url=str(tmp_path / "repo"), ref=reference["url"], tmp=str(tmp_path))
    cases = {c["case"]: c for c in (json.loads(x[5:]) for x in lines if x.startswith("case "))}
    assert set(cases) == {"no-optimizer", "custom-groups", "wrong-component", "resume-not-passed", "never-saves"}
    for c in cases.values():
        assert c["type"] == "InvalidArgumentError" and "ValueError" in c["classes"], c
    for case in ("no-optimizer", "custom-groups", "wrong-component"):
        assert cases[case]["wrote"] == [], f"{case}: a refused export wrote {cases[case]['wrote']}"
    assert "pass the path it returned to trainer.train(resume_from_checkpoint=...)" in cases["resume-not-passed"]["msg"]
    assert "save_strategy='no' never does: pass every=N" in cases["never-saves"]["msg"]
    assert len(ckptkit.checkpoints(str(reference["url"]))) == worker.STEPS // worker.EVERY  # nothing saved there
    assert "no optimizer and no LR scheduler" in cases["no-optimizer"]["msg"]
    assert "format='model'" in cases["no-optimizer"]["msg"]
    assert "not built by Trainer.create_optimizer" in cases["custom-groups"]["msg"]
    assert "'encoder' is not one of them" in cases["wrong-component"]["msg"]
    assert "['model']" in cases["wrong-component"]["msg"]


def test_a_plain_model_is_refused_without_transformers(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    ckptkit.save(url, {"model": torch.nn.Linear(2, 2)}, "plain")
    with pytest.raises(InvalidArgumentError, match=r"not an HF transformers model.*format='model'"):
        ckptkit.export(url, str(tmp_path / "out"), format="hf-trainer")
    assert not (tmp_path / "out").exists()
