"""Hostile input that passes the first checks: manifests with a valid id (rewritten and re-hashed, as an attacker or a
broken tool would) whose content is wrong, files named like checkpoints that are not theirs, and foreign files built
to exhaust memory. Each is refused with a typed error that names what is wrong, and nothing the user holds changes.

- restore decodes and checks every component before it loads the first (aliases, optimizer state against the live
  optimizer, RNG state, scheduler state, values), so a failed restore leaves model, optimizer, scheduler and RNG as
  they were;
- a timezone-less ``created_at`` is an invalid manifest, skipped by listing like any other;
- verify checks everything restore relies on, and a manifest stored under another name is refused;
- the command line answers bad input with one ``error:`` line and exit status 2, never a traceback;
- imports refuse zip bombs (and forged DCP sizes) before inflating or allocating anything.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tied_model import same_bits, trained

import ckptkit
from ckptkit.api import checkpoints
from ckptkit.errors import (
    CheckpointNotFoundError,
    CkptkitError,
    CorruptObjectError,
    ImportFormatError,
    InvalidNameError,
    ManifestError,
    StateMismatchError,
)
from ckptkit.hashing import check_name, is_hash, is_name
from ckptkit.schema import Manifest, canonical_json, manifest_id, parse_manifest

# --- a checkpoint to forge from ------------------------------------------------------------------------------




INFO = {"tag": np.float32(0.5), "pair": (1, 2), 3: "three", "ids": {4, 5}}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "repo"
    model, opt, sched = trained(0, 1e-2)
    random.seed(1)
    ckptkit.save(str(root), {"model": model, "optimizer": opt, "scheduler": sched, "info": INFO}, "base")
    return root


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(template, root)
    return root


def _data(root: Path, name: str = "base") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "checkpoints" / f"{name}.json").read_bytes())
    return data


def forge(root: Path, mutate: Callable[[dict[str, Any]], object], name: str = "forged", base: str = "base") -> str:
    """Rewrite checkpoint ``base`` as ``name`` with ``mutate`` applied and the id recomputed, so the manifest passes
    the id check and its content reaches validation and restore."""
    data = _data(root, base)
    mutate(data)
    data["name"] = name
    data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})
    (root / "checkpoints" / f"{name}.json").write_bytes(canonical_json(data))
    return name


class Live:
    """Objects to restore into, differing from the saved run in every value, and a snapshot to prove that a
    restore that failed changed none of them (RNG included)."""

    def __init__(self) -> None:
        self.model, self.opt, self.sched = trained(7, 3e-3)
        random.seed(11)
        np.random.seed(11)
        torch.manual_seed(11)
        self.before = self.snapshot()

    @property
    def state(self) -> dict[str, object]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched}

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scheduler": copy.deepcopy(self.sched.state_dict()),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }

    def assert_unchanged(self) -> None:
        assert same_bits(self.snapshot(), self.before), "a restore that failed changed the live objects"
        assert self.model.dec.weight is self.model.enc.weight


def _tensor_key(data: dict[str, Any], component: str, suffix: str) -> str:
    return next(k for k in data["components"][component]["tensors"] if k.endswith(suffix))


def _opt_state(d: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = d["components"]["optimizer"]["state"]
    return state


def _rng_state(d: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = d["components"]["rng"]["state"]
    return state


def _nested(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


def _point_exp_avg_at_bias(d: dict[str, Any]) -> None:
    key = _tensor_key(d, "optimizer", "enc.bias.exp_avg")
    _opt_state(d)["state"]["enc.weight"]["exp_avg"] = {"$tensor": key}


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], object], type[CkptkitError], list[str]]] = {
    # model: aliases that loop or point nowhere
    "alias-loop": (lambda d: d["components"]["model"]["aliases"].update({"dec.weight": "x", "x": "dec.weight"}),
                   ManifestError, ["component 'model'", "aliases.", "loop"]),
    "alias-self": (lambda d: d["components"]["model"]["aliases"].update({"dec.weight": "dec.weight"}),
                   ManifestError, ["component 'model'", "aliases.dec.weight", "loop"]),
    "alias-to-missing-key": (lambda d: d["components"]["model"]["aliases"].update({"dec.weight": "nope"}),
                             ManifestError, ["component 'model'", "aliases.dec.weight", "'nope'"]),
    # optimizer: names, structure, shapes and types that do not fit the live optimizer
    "optimizer-unhashable-param-name": (lambda d: _opt_state(d)["param_groups"][0]["params"].__setitem__(0, ["x"]),
                                        ManifestError, ["component 'optimizer'", "param_groups[0].params[0]"]),
    "optimizer-wrong-param-names": (lambda d: _opt_state(d)["param_groups"][0]["params"].__setitem__(0, "enc.wait"),
                                    StateMismatchError, ["optimizer", "enc.wait"]),
    "optimizer-param-twice": (lambda d: _opt_state(d)["param_groups"][0]["params"].__setitem__(1, "enc.weight"),
                              ManifestError, ["component 'optimizer'", "more than once", "enc.weight"]),
    "optimizer-wrong-shape": (_point_exp_avg_at_bias, StateMismatchError, ["optimizer", "enc.weight", "[4]"]),
    "optimizer-state-not-a-dict": (lambda d: _opt_state(d)["state"].__setitem__("enc.weight", 5),
                                   ManifestError, ["component 'optimizer'", "state.enc.weight"]),
    "optimizer-state-string": (lambda d: _opt_state(d)["state"]["enc.weight"].__setitem__("exp_avg", "abc"),
                               ManifestError, ["component 'optimizer'", "state.enc.weight.exp_avg"]),
    "optimizer-step-not-a-number": (lambda d: _opt_state(d)["state"]["enc.weight"].__setitem__("step", [1, 2]),
                                    ManifestError, ["component 'optimizer'", "state.enc.weight.step"]),
    "optimizer-lr-not-a-number": (lambda d: _opt_state(d)["param_groups"][0].__setitem__("lr", "fast"),
                                  ManifestError, ["component 'optimizer'", "param_groups[0].lr"]),
    "optimizer-betas-short": (lambda d: _opt_state(d)["param_groups"][0].__setitem__("betas", {"$tuple": [0.9]}),
                              ManifestError, ["component 'optimizer'", "param_groups[0].betas"]),
    "optimizer-not-a-dict": (lambda d: d["components"]["optimizer"].__setitem__("state", [1]),
                             ManifestError, ["component 'optimizer'", "state"]),
    # RNG: wrong types and lengths for each generator
    "rng-python-type": (lambda d: _rng_state(d).__setitem__("python", "abc"),
                        ManifestError, ["component 'rng'", "state.python"]),
    "rng-python-length": (lambda d: _rng_state(d).__setitem__("python", {"$tuple": [3, {"$tuple": [1, 2]}, None]}),
                          ManifestError, ["component 'rng'", "state.python"]),
    "rng-python-huge-int": (lambda d: _rng_state(d)["python"]["$tuple"][1]["$tuple"].__setitem__(5, 2**80),
                            ManifestError, ["component 'rng'", "state.python"]),
    "rng-numpy-type": (lambda d: _rng_state(d).__setitem__("numpy", [1, 2]),
                       ManifestError, ["component 'rng'", "state.numpy"]),
    "rng-torch-wrong-tensor": (lambda d: _rng_state(d).__setitem__("torch", {"$tensor": "rng.numpy[1]"}),
                               ManifestError, ["component 'rng'", "state.torch"]),
    "rng-torch-number": (lambda d: _rng_state(d).__setitem__("torch", 5),
                         ManifestError, ["component 'rng'", "state.torch"]),
    "rng-cuda-not-a-list": (lambda d: _rng_state(d).__setitem__("cuda", 5),
                            ManifestError, ["component 'rng'", "state.cuda"]),
    "rng-missing": (lambda d: _rng_state(d).pop("numpy"), ManifestError, ["component 'rng'", "numpy"]),
    # typed JSON: numpy scalars of huge or unknown types, out of range; unhashable keys; deep nesting
    "np-huge-void": (lambda d: d["components"]["info"].__setitem__("state", {"$np": "V100000000", "value": 10**8}),
                     ManifestError, ["component 'info'", "$np"]),
    "np-object": (lambda d: d["components"]["info"].__setitem__("state", {"$np": "|O", "value": 1}),
                  ManifestError, ["component 'info'", "$np"]),
    "np-out-of-range": (lambda d: d["components"]["info"].__setitem__("state", {"$np": "|i1", "value": 1000}),
                        ManifestError, ["component 'info'", "out of the range"]),
    "np-float-overflow": (lambda d: d["components"]["info"].__setitem__("state", {"$np": "<f2", "value": 1e300}),
                          ManifestError, ["component 'info'", "out of the range"]),
    "dict-unhashable-key": (lambda d: d["components"]["info"].__setitem__("state", {"$dict": [[[1, 2], "x"]]}),
                            ManifestError, ["component 'info'", "unhashable"]),
    "dict-not-pairs": (lambda d: d["components"]["info"].__setitem__("state", {"$dict": "ab"}),
                       ManifestError, ["component 'info'", "$dict"]),
    "set-unhashable": (lambda d: d["components"]["info"].__setitem__("state", {"$set": [{"a": 1}]}),
                       ManifestError, ["component 'info'", "unhashable"]),
    "tensor-not-in-component": (lambda d: d["components"]["info"].__setitem__("state", {"$tensor": "rng.torch"}),
                                ManifestError, ["component 'info'", "rng.torch"]),
    "deep-nesting": (lambda d: d["components"]["info"].__setitem__("state", _nested(200)),
                     ManifestError, ["component 'info'", "nested deeper"]),
    # scheduler: state its load_state_dict would take as it is
    "scheduler-epoch-not-a-number": (lambda d: d["components"]["scheduler"]["state"].__setitem__("last_epoch", "x"),
                                     ManifestError, ["component 'scheduler'", "state.last_epoch"]),
    "scheduler-not-a-dict": (lambda d: d["components"]["scheduler"].__setitem__("state", [1, 2]),
                             ManifestError, ["component 'scheduler'", "state"]),
    "scheduler-lrs-length": (lambda d: d["components"]["scheduler"]["state"].__setitem__("base_lrs", [0.1, 0.2]),
                             ManifestError, ["component 'scheduler'", "state.base_lrs"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_before_anything_loads(repo: Path, case: str) -> None:
    mutate, error, words = HOSTILE[case]
    name = forge(repo, mutate)
    live = Live()
    with pytest.raises(error) as info:
        ckptkit.restore(str(repo), live.state, name)
    for w in words:
        assert w in str(info.value), str(info.value)
    if isinstance(info.value, ManifestError):
        assert f"checkpoint {name!r}" in str(info.value)
    live.assert_unchanged()


def test_the_forged_manifests_are_valid_until_their_content_is_checked(repo: Path) -> None:
    """The baseline of the cases above: a forged manifest with the id recomputed parses, and forging nothing
    restores exactly."""
    for case, (mutate, _, _) in HOSTILE.items():
        data = _data(repo)
        mutate(data)
        data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})
        assert isinstance(parse_manifest(canonical_json(data), case), Manifest)
    name = forge(repo, lambda d: None)
    live = Live()
    result = ckptkit.restore(str(repo), live.state, name)
    saved, _, _ = trained(0, 1e-2)
    for k, v in saved.state_dict().items():
        assert torch.equal(live.model.state_dict()[k], v)
    assert result.values["info"] == INFO


def test_optimizer_state_of_another_shape_is_reported_and_skipped_when_not_strict(repo: Path) -> None:
    name = forge(repo, _point_exp_avg_at_bias)
    live = Live()
    result = ckptkit.restore(str(repo), live.state, name, strict=False)
    rep = result.reports["optimizer"]
    assert "enc.weight" in rep.mismatched and rep.loaded == 2
    params = dict(live.model.named_parameters())
    assert not live.opt.state[params["enc.weight"]]  # starts fresh, as a parameter the checkpoint lacks would
    assert set(live.opt.state[params["enc.bias"]]) == {"step", "exp_avg", "exp_avg_sq"}
    live.model(torch.randn(2, 4)).sum().backward()
    live.opt.step()  # the optimizer still works


def test_restore_latest_falls_back_past_a_hostile_manifest(repo: Path) -> None:
    name = forge(repo, HOSTILE["rng-python-type"][0], name="zz-newest")
    live = Live()
    result = ckptkit.restore(str(repo), live.state)
    assert result.manifest.name == "base"
    assert [n for n, _ in result.skipped] == [name] and "state.python" in result.skipped[0][1]


# --- 2. created_at must carry its timezone ------------------------------------------------------------------


def _naive(d: dict[str, Any]) -> None:
    d["created_at"] = "2031-01-01T00:00:00"


def test_a_timezone_less_created_at_is_an_invalid_manifest(repo: Path) -> None:
    data = _data(repo)
    _naive(data)
    data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})
    with pytest.raises(ManifestError, match="created_at"):
        parse_manifest(canonical_json(data), "naive.json")


def test_one_naive_created_at_does_not_break_listing_or_restore_latest(repo: Path) -> None:
    forge(repo, _naive, name="naive")
    forge(repo, lambda d: d.update(created_at="2031-01-01T00:00:00+02:00"), name="later")
    assert [m.name for m in checkpoints(str(repo))] == ["base", "later"]
    live = Live()
    result = ckptkit.restore(str(repo), live.state)
    assert result.manifest.name == "later" and [n for n, _ in result.skipped] == ["naive"]
    out = _cli("ls", str(repo), "--json")
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == ["base", "later"]
    out = _cli("ls", str(repo))
    assert out.returncode == 0 and "2 checkpoint(s)" in out.stdout and "Traceback" not in out.stderr
    (report,) = ckptkit.verify(str(repo), "naive")
    assert any("created_at" in p for p in report.problems)


# --- 3. verify checks what restore relies on; a manifest is only its own name ------------------------------------


def _other_object(root: Path) -> str:
    """An object in the repository that checkpoint "base" does not list (written by a save of another model)."""
    m = ckptkit.save(str(root), {"model": torch.nn.Linear(3, 3)}, "other", rng=False)
    return next(iter(m.objects))


def _problems(root: Path, name: str) -> list[str]:
    (report,) = ckptkit.verify(str(root), name)
    return report.problems


def test_a_tensor_in_an_unlisted_object_fails_verify(repo: Path) -> None:
    h = _other_object(repo)
    name = forge(repo, lambda d: d["components"]["model"]["tensors"]["enc.bias"].update(object=h))
    problems = _problems(repo, name)
    assert any(h in p and "does not list" in p for p in problems), problems
    with pytest.raises(ManifestError, match="not listed"):
        ckptkit.restore(str(repo), Live().state, name)


def test_a_manifest_stored_under_another_name_is_refused(repo: Path) -> None:
    shutil.copy(repo / "checkpoints" / "base.json", repo / "checkpoints" / "copy.json")
    problems = _problems(repo, "copy")
    assert problems and "'base'" in problems[0] and "copy" in problems[0]
    live = Live()
    with pytest.raises(ManifestError, match="names itself 'base'"):
        ckptkit.restore(str(repo), live.state, "copy")
    live.assert_unchanged()
    with pytest.raises(ManifestError):
        ckptkit.inspect(str(repo), "copy")
    assert [m.name for m in checkpoints(str(repo))] == ["base"]
    out = _cli("verify", str(repo), "copy")
    assert out.returncode == 1 and "names itself" in out.stdout


@pytest.mark.parametrize("field", ["dtype", "key", "alias"])
def test_verify_checks_each_tensor_entry_and_alias(repo: Path, field: str) -> None:
    def mutate(d: dict[str, Any]) -> None:
        if field == "dtype":
            d["components"]["model"]["tensors"]["enc.weight"]["dtype"] = "F16"
        elif field == "key":
            d["components"]["model"]["tensors"]["enc.weight"]["key"] = "enc.bias"  # present, another shape
        else:
            d["components"]["model"]["aliases"]["dec.weight"] = "nope"

    name = forge(repo, mutate, name="zz-forged")  # verified after "base", whose objects it shares
    reports = {r.name: r for r in ckptkit.verify(str(repo))}
    assert reports["base"].ok
    assert reports[name].problems, field
    assert ("enc.weight" if field != "alias" else "dec.weight") in " ".join(reports[name].problems)
    live = Live()
    with pytest.raises(CorruptObjectError if field != "alias" else ManifestError):
        ckptkit.restore(str(repo), live.state, name)
    live.assert_unchanged()


# --- 4. the command line: one error line, exit status 2 -----------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptkit.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, **(env or {})})  # fmt: skip


def _assert_one_error_line(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    empty = root / "empty.pt"
    empty.write_bytes(b"")
    truncated = root / "truncated.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(8)}, buf, _use_new_zipfile_serialization=False)
    truncated.write_bytes(buf.getvalue()[:30])
    dcp_empty = root / "dcp-empty-metadata"
    dcp_empty.mkdir()
    (dcp_empty / ".metadata").write_bytes(b"")
    (dcp_empty / "__0_0.distcp").write_bytes(b"")
    dcp_good = root / "dcp"
    _dcp_save({"model": torch.nn.Linear(4, 4).state_dict(), "step": 3}, dcp_good)
    dcp_damaged = root / "dcp-damaged"
    shutil.copytree(dcp_good, dcp_damaged)
    data = next(dcp_damaged.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[: len(raw) // 2] = b"\xff" * (len(raw) // 2)  # as long as before, so the records lie inside it
    data.write_bytes(bytes(raw))
    return {"empty": empty, "truncated": truncated, "dcp-empty": dcp_empty, "dcp-damaged": dcp_damaged,
            "dcp": dcp_good}  # fmt: skip


def _dcp_save(state: dict[str, Any], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    "show-path-name": (["show", "{repo}", "../../x"], ["invalid checkpoint name"]),
    "show-newline-name": (["show", "{repo}", "base\n"], ["invalid checkpoint name"]),
    "verify-path-name": (["verify", "{repo}", "a/b"], ["invalid checkpoint name"]),
    "log-path-name": (["log", "{repo}", "../x"], ["invalid checkpoint name"]),
    "ls-unknown-protocol": (["ls", "nosuchproto://x"], ["nosuchproto"]),
    "copy-unknown-protocol": (["copy", "{repo}", "nosuchproto://x"], ["nosuchproto"]),
    "show-missing": (["show", "{repo}", "nope"], ["no checkpoint named 'nope'"]),
    "show-bad-option": (["show", "{repo}", "-o", "novalue"], ["KEY=VALUE"]),
    "usage": (["show"], ["Missing argument"]),
    "lineage-unwritable-output": (["lineage", "{repo}", "-O", "{tmp}/no/such/dir/graph.txt"], ["graph.txt"]),
    "import-empty-file": (["import", "{empty}", "{tmp}/imported"], ["empty.pt"]),
    "import-truncated-file": (["import", "{truncated}", "{tmp}/imported"], ["truncated.pt"]),
    "import-dcp-empty-metadata": (["import", "{dcp-empty}", "{tmp}/imported"], [".metadata"]),
    "import-dcp-damaged-data": (["import", "{dcp-damaged}", "{tmp}/imported"], ["dcp-damaged"]),
    "import-bad-name": (["import", "{dcp}", "{tmp}/imported", "no/slash"], ["invalid checkpoint name"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_is_one_error_line_and_exit_2(
    case: str, repo: Path, bad_inputs: dict[str, Path], tmp_path: Path
) -> None:
    args, words = CLI_CASES[case]
    fill = {"repo": str(repo), "tmp": str(tmp_path), **{k: str(v) for k, v in bad_inputs.items()}}
    _assert_one_error_line(_cli(*(a.format(**fill) for a in args)), *words)


def test_cli_an_end_of_file_inside_a_command_is_an_error_not_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """click turns an EOFError into its Abort (exit 130, as for Ctrl-C, with no message): one raised by the code
    (torch reading an empty file raises a bare EOFError) must be reported as an error instead."""
    from ckptkit.cli.main import run
    from ckptkit.interop import importers

    def eof(*args: Any, **kwargs: Any) -> Any:
        raise EOFError

    monkeypatch.setattr(importers, "import_from", eof)
    src = tmp_path / "x.pt"
    src.write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["ckptkit", "import", str(src), str(tmp_path / "repo")])
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code not in (0, 130)
    err = capsys.readouterr().err.strip()  # click writes a blank line (closing a terminal's ^C) before it aborts
    assert err.startswith("error: ") and "EOFError" in err and len(err.splitlines()) == 1


def test_names_with_a_trailing_newline_are_refused_everywhere() -> None:
    assert not is_name("base\n") and not is_hash("0" * 64 + "\n")
    with pytest.raises(InvalidNameError):
        check_name("base\n")
    with pytest.raises(CheckpointNotFoundError):  # a valid name that is not there: the newline never reaches storage
        ckptkit.inspect("memory://ckptkit-newline", "base")
    with pytest.raises(InvalidNameError):
        ckptkit.inspect("memory://ckptkit-newline", "base\n")


def test_a_dcp_entry_name_follows_the_component_name_rule(tmp_path: Path) -> None:
    folder = tmp_path / "dcp"
    _dcp_save({"model": torch.nn.Linear(2, 2).state_dict(), "note\n": 1, "ok": 2, "x.json": 3}, folder)
    m = ckptkit.import_from(str(folder), str(tmp_path / "repo"))
    assert "ok" in m.components and not any(n.endswith("\n") or n.endswith(".json") for n in m.components)
    skipped = m.lineage.source["skipped"]  # type: ignore[index]
    assert "note\n" in skipped and "x.json" in skipped  # type: ignore[operator]


# --- 5. imports bound memory before inflating or allocating ---------------------------------------------------

BOMB_MB = 256


def _zip_bomb(path: Path) -> None:
    """A torch-file-shaped zip whose data.pkl is BOMB_MB MiB of zeros, deflated to a few hundred KiB."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/version", "3\n")
        with zf.open("archive/data.pkl", "w") as f:
            for _ in range(BOMB_MB):
                f.write(chunk)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    _zip_bomb(bomb)
    assert bomb.stat().st_size < 2 << 20
    script = textwrap.dedent(f"""
        import resource, sys, time
        import torch
        from ckptkit.errors import ImportFormatError
        from ckptkit.interop.importers import import_from
        import ckptkit.interop.importers.pipeline, ckptkit.interop.importers._pickle  # imported before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        try:
            import_from({str(bomb)!r}, {str(tmp_path / "repo")!r})
            print("IMPORTED")
        except ImportFormatError as err:
            print("REFUSED", err)
        except Exception as err:
            print("OTHER", type(err).__name__, err)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print("GROWN_MB", grown, "SECONDS", round(time.monotonic() - t0, 2))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "bomb.pt" in lines[0] and "zip bomb" in lines[0], out.stdout
    _, grown, _, seconds = lines[-1].split()
    assert int(grown) < 64, f"peak RSS grew by {grown} MiB refusing a {BOMB_MB} MiB bomb"
    assert float(seconds) < 10


def test_a_zip_bomb_inside_a_dcp_entry_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dcp"
    _dcp_save({"model": torch.nn.Linear(2, 2).state_dict(), "note": "a plain entry, stored as torch.save bytes"}, folder)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta = folder / ".metadata"
    md = pickle.loads(meta.read_bytes())  # our own file: trusted here
    bomb = tmp_path / "bomb.zip"
    _zip_bomb(bomb)
    data = next(folder.glob("*.distcp"))
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(bomb.read_bytes())
    key = next(k for k in md.storage_data if k.fqn == "note")
    md.storage_data[key] = _StorageInfo(data.name, offset, bomb.stat().st_size)
    meta.write_bytes(pickle.dumps(md))
    t0 = time.monotonic()
    with pytest.raises(ImportFormatError, match="zip bomb") as info:
        ckptkit.import_from(str(folder), str(tmp_path / "repo"))
    assert "'note'" in str(info.value) and time.monotonic() - t0 < 10


def test_a_dcp_metadata_declaring_huge_tensors_is_refused_before_allocating(tmp_path: Path) -> None:
    folder = tmp_path / "dcp"
    _dcp_save({"model": torch.nn.Linear(2, 2).state_dict()}, folder)
    meta = folder / ".metadata"
    md = pickle.loads(meta.read_bytes())
    entry = md.state_dict_metadata["model.weight"]
    entry.size = torch.Size([1 << 20, 1 << 20])  # 4 TiB of float32 from a few hundred bytes of metadata
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(ImportFormatError, match="declares"):
        ckptkit.import_from(str(folder), str(tmp_path / "repo"))


def test_a_damaged_safetensors_file_in_an_import_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from ckptkit.errors import SourceFormatError

    folder = tmp_path / "hf"
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(folder)  # fmt: skip
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: the header says more than the file holds
    with pytest.raises(SourceFormatError, match=r"model\.safetensors"):
        ckptkit.import_from(str(folder), str(tmp_path / "repo"))
    assert checkpoints(str(tmp_path / "repo")) == []
    out = subprocess.run([sys.executable, "-m", "ckptkit.cli", "import", str(folder), str(tmp_path / "repo")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and "model.safetensors" in out.stderr


def test_diff_of_a_component_that_is_not_there_says_which_ones_are(tmp_path: Path) -> None:
    from ckptkit.errors import InvalidArgumentError
    from ckptkit.history.diff import diff

    url = str(tmp_path / "r")
    ckptkit.save(url, {"model": torch.nn.Linear(2, 2)}, "a")
    ckptkit.save(url, {"model": torch.nn.Linear(2, 2)}, "b")
    with pytest.raises(InvalidArgumentError, match=r"no model component 'nope'.*\['model'\]"):
        diff(url, "a", url, "b", component="nope")


def test_a_key_map_pattern_does_not_match_a_key_with_a_trailing_newline() -> None:
    from ckptkit.interop.transfer import map_key

    assert map_key("head.weight", {"head.{}": "classifier.{}"}) == "classifier.weight"
    assert map_key("head.weight\n", {"head.{}": "classifier.{}"}) is None
