"""Every public entry point that takes a repository takes it in each of three forms: a URL (``str``), a local path
(``str`` or ``os.PathLike``, e.g. a ``pathlib.Path``) or an open :class:`~ckptkit.storage.Repository`; anything
else is an :class:`~ckptkit.errors.ArgumentTypeError` (a ``TypeError``) naming the parameter and the accepted
types. On local disk and on ``memory://`` (where a path is not a form: ``Path`` would mangle the URL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.engine.manifests import RepoLike
from ckptkit.errors import ArgumentTypeError, CkptkitError, InvalidArgumentError
from ckptkit.history.audit import audit
from ckptkit.history.chain import verify_chain
from ckptkit.history.copy import copy
from ckptkit.history.diff import diff
from ckptkit.history.graph import history
from ckptkit.schema import Lineage, Parent
from ckptkit.storage import Repository

FORMS = [("local", "str"), ("local", "path"), ("local", "repository"), ("memory", "str"), ("memory", "repository")]
WRONG: list[Any] = [42, None, b"/tmp/repo", ["/tmp/repo"], {"url": "/tmp/repo"}, 1.5]
ACCEPTED = "must be a URL, a local path (str or os.PathLike) or an open ckptkit.storage.Repository"


@dataclass
class Where:
    """A repository location and the form under test; ``arg()`` is what is passed to an entry point."""

    url: str
    form: str
    _repo: Repository | None = None

    def arg(self) -> RepoLike:
        if self.form == "path":
            return Path(self.url)
        if self.form == "repository":
            if self._repo is None:
                self._repo = Repository(self.url)
            return self._repo
        return self.url


class Places:
    """Fresh repository locations on one backend, each in the form under test."""

    def __init__(self, backend: str, form: str, tmp_path: Path) -> None:
        self.backend, self.form, self.tmp_path = backend, form, tmp_path
        self.memory: list[str] = []

    def new(self, label: str = "repo") -> Where:
        if self.backend == "local":
            return Where(str(self.tmp_path / f"{label}-{uuid.uuid4().hex[:8]}"), self.form)
        name = f"ckptkit-test-{uuid.uuid4().hex}"
        self.memory.append(name)
        return Where(f"memory://{name}", self.form)

    def cleanup(self) -> None:
        fs = fsspec.filesystem("memory")
        for name in self.memory:
            if fs.exists(f"/{name}"):
                fs.rm(f"/{name}", recursive=True)


@pytest.fixture(params=FORMS, ids=[f"{b}-{f}" for b, f in FORMS])
def places(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Places]:
    p = Places(*request.param, tmp_path)
    yield p
    p.cleanup()


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _chain(url: str) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Checkpoint "a", and "b" trained from it (a `train` parent), saved through the URL."""
    a, b = _model(0), _model(1)
    ma = ckptkit.save(url, {"model": a}, "a", rng=False, hparams={"lr": 0.1})
    ckptkit.save(url, {"model": b}, "b", rng=False, hparams={"lr": 0.2},
                 lineage=Lineage(relation="train", parents=[Parent(id=ma.id, relation="train", name="a")]))  # fmt: skip
    return a, b


def _type_error(call: Callable[[], object], param: str) -> None:
    with pytest.raises(ArgumentTypeError) as info:
        call()
    err = info.value
    assert isinstance(err, TypeError) and isinstance(err, CkptkitError)
    assert str(err).startswith(f"{param} {ACCEPTED}, got "), str(err)


# --- the functions of ckptkit.api ---------------------------------------------------------------------------


def test_save_inspect_checkpoints_restore(places: Places) -> None:
    w = places.new()
    saved = _model(0)
    m = ckptkit.save(w.arg(), {"model": saved}, "a", rng=False)
    assert ckptkit.inspect(w.url, "a").id == m.id  # written where the URL says
    assert ckptkit.inspect(w.arg(), "a").id == m.id and ckptkit.inspect(w.arg()).id == m.id
    assert [c.name for c in checkpoints(w.arg())] == ["a"]
    live = _model(5)
    assert ckptkit.restore(w.arg(), {"model": live}, rng=False).manifest.id == m.id
    assert _equal(live, saved)
    live = _model(6)
    assert ckptkit.restore(w.arg(), {"model": live}, "a", rng=False).manifest.name == "a" and _equal(live, saved)


def test_verify_and_gc(places: Places) -> None:
    w = places.new()
    _chain(w.url)
    reports = ckptkit.verify(w.arg())
    assert [(r.name, r.ok) for r in reports] == [("a", True), ("b", True)]
    assert ckptkit.verify(w.arg(), "a", raise_on_error=True)[0].ok
    assert gc(w.arg(), dry_run=True).objects_removed == 0
    assert gc(w.arg()).objects_removed == 0


def test_storage_options_with_an_open_repository_is_refused(places: Places) -> None:
    w = places.new()
    r = Repository(w.url)
    with pytest.raises(InvalidArgumentError, match="already open"):
        ckptkit.inspect(r, storage_options={"anon": True})


@pytest.mark.parametrize("wrong", WRONG, ids=repr)
def test_api_refuses_other_types_naming_the_parameter(wrong: Any) -> None:
    state = {"model": _model()}
    _type_error(lambda: ckptkit.save(wrong, state, "a"), "repo")
    _type_error(lambda: ckptkit.restore(wrong, state), "repo")
    _type_error(lambda: ckptkit.inspect(wrong), "repo")
    _type_error(lambda: ckptkit.verify(wrong), "repo")
    _type_error(lambda: checkpoints(wrong), "repo")
    _type_error(lambda: gc(wrong), "repo")


# --- interop: transfer, export, import_from -----------------------------------------------------------------


def test_transfer_from_a_repository(places: Places) -> None:
    w = places.new()
    saved = _model(0)
    m = ckptkit.save(w.url, {"model": saved}, "a", rng=False)
    target = _model(9)
    plan = ckptkit.transfer(w.arg(), target)
    assert plan.source_id == m.id and plan.source_url == w.url and plan.counts() == {"loaded": 2}
    assert _equal(target, saved)


def test_export_and_transfer_from_the_exported_folder_and_file(places: Places) -> None:
    w = places.new()
    saved = _model(0)
    ckptkit.save(w.url, {"model": saved}, "a", rng=False)
    dest = places.tmp_path / f"export-{uuid.uuid4().hex[:8]}"
    written = ckptkit.export(w.arg(), str(dest))
    assert sorted(os.path.basename(f) for f in written) == ["ckptkit.json", "model.safetensors"]
    for source in (dest, dest / "model.safetensors"):  # a folder and a file, as pathlib.Path
        target = _model(9)
        plan = ckptkit.transfer(source, target)
        assert plan.counts() == {"loaded": 2} and plan.source == str(source) and _equal(target, saved)


def test_import_from_into_the_repository(places: Places) -> None:
    w = places.new()
    lin = _model(0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    src = places.tmp_path / f"src-{uuid.uuid4().hex[:8]}"
    src.mkdir()
    torch.save({"pytorch-lightning_version": "2.5.0", "state_dict": lin.state_dict(), "epoch": 1,
                "global_step": 10, "optimizer_states": [opt.state_dict()]}, src / "last.ckpt")  # fmt: skip
    m = ckptkit.import_from(str(src / "last.ckpt"), w.arg(), model=lin)
    assert m.name == "last" and ckptkit.inspect(w.url, "last").id == m.id


@pytest.mark.parametrize("wrong", WRONG, ids=repr)
def test_interop_refuses_other_types_naming_the_parameter(wrong: Any, tmp_path: Path) -> None:
    _type_error(lambda: ckptkit.transfer(wrong, _model()), "source")
    _type_error(lambda: ckptkit.export(wrong, str(tmp_path / "out")), "repo")
    assert not (tmp_path / "out").exists()
    missing = str(tmp_path / "no-such.ckpt")  # the type is checked before the source is looked for
    _type_error(lambda: ckptkit.import_from(missing, wrong), "repo")


# --- history: history, verify_chain, audit, diff, copy ------------------------------------------------------


def test_history_verify_chain_and_audit(places: Places) -> None:
    w = places.new()
    _chain(w.url)
    h = history(w.arg(), "b")
    assert [(n.manifest.name, n.url) for n in h.nodes] == [("b", w.url), ("a", w.url)] and not h.missing
    rep = verify_chain(w.arg(), "b")
    assert rep.ok and rep.checked == 2
    a = audit(w.arg())
    assert a.url == w.url and a.integrity.ok and a.head.name == "b" and len(a.history.nodes) == 2


def test_diff(places: Places) -> None:
    w = places.new()
    _chain(w.url)
    d = diff(w.arg(), "a", w.arg(), "b")
    assert d.hparams == {"lr": [0.1, 0.2]} and {t.status for t in d.tensors.values()} == {"changed"}
    other = places.new("other")
    ckptkit.save(other.url, {"model": _model(0)}, "c", rng=False)
    d = diff(w.arg(), "a", other.arg(), None)  # across repositories
    assert {t.status for t in d.tensors.values()} == {"unchanged"}


def test_copy(places: Places) -> None:
    src, dst = places.new("src"), places.new("dst")
    _, b = _chain(src.url)
    rep = copy(src.arg(), dst.arg(), ["b"])
    assert rep.checkpoints == ["b"] and rep.ancestors_archived == 1 and rep.objects_copied > 0
    live = _model(7)
    ckptkit.restore(dst.url, {"model": live}, "b", rng=False)
    assert _equal(live, b)
    assert [n.manifest.name for n in history(dst.arg(), "b").nodes] == ["b", "a"]  # the ancestor was archived
    again = copy(src.arg(), dst.arg(), ["b"])
    assert again.skipped == ["b"] and again.objects_copied == 0


@pytest.mark.parametrize("wrong", WRONG, ids=repr)
def test_history_refuses_other_types_naming_the_parameter(wrong: Any, tmp_path: Path) -> None:
    good = str(tmp_path / "repo")
    ckptkit.save(good, {"model": _model()}, "a", rng=False)
    _type_error(lambda: history(wrong), "url")
    _type_error(lambda: verify_chain(wrong), "url")
    _type_error(lambda: audit(wrong), "url")
    _type_error(lambda: diff(wrong, None, good, None), "url_a")
    _type_error(lambda: diff(good, None, wrong, None), "url_b")
    _type_error(lambda: copy(wrong, str(tmp_path / "dst")), "src")
    _type_error(lambda: copy(good, wrong), "dst")
    assert not (tmp_path / "dst").exists()
