"""What is verified is the manifest as stored: ckptkit writes ``canonical_json(whole manifest)`` and nothing else,
so any other spelling of the same JSON (``1E-08``, whitespace, reordered keys, ``\\u`` escapes, a trailing
newline, a BOM, UTF-16) is an edit after the commit. Each is refused by ``parse_manifest``, reported by
``verify`` against the manifest file, refused by ``restore(name=...)``, and skipped by a ``restore()`` that falls
back to the previous checkpoint. And ``verify(raise_on_error=True)``: one typed error naming the damaged files.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.cli.main import main
from ckptkit.errors import CkptkitError, ManifestError, VerificationError
from ckptkit.history.graph import history
from ckptkit.schema import Lineage, Parent, canonical_json, parse_manifest
from ckptkit.storage import Repository

GOLDEN = Path(__file__).parent / "golden"


def _move_id_last(raw: bytes) -> bytes:
    data = json.loads(raw)
    data["id"] = data.pop("id")  # the id is outside what it hashes: only its place shows the edit
    return canonical_json(data)


def _swap_progress_keys(raw: bytes) -> bytes:
    data = json.loads(raw)
    data["progress"] = dict(reversed(list(data["progress"].items())))
    return canonical_json(data)


EDITS: dict[str, Callable[[bytes], bytes]] = {
    "1e-08 as 1E-08": lambda raw: raw.replace(b"1e-08", b"1E-08"),
    "added whitespace": lambda raw: raw.replace(b",", b", ", 1),
    "pretty-printed": lambda raw: json.dumps(json.loads(raw), indent=2, ensure_ascii=False).encode(),
    "id moved last": _move_id_last,
    "reordered keys": _swap_progress_keys,
    "ensure_ascii escapes": lambda raw: json.dumps(json.loads(raw), separators=(",", ":")).encode(),
    "trailing newline": lambda raw: raw + b"\n",
    "CRLF newline": lambda raw: raw + b"\r\n",
    "UTF-8 BOM": lambda raw: b"\xef\xbb\xbf" + raw,
    "UTF-16": lambda raw: raw.decode().encode("utf-16"),
}


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "repo")
        return
    name = f"ckptkit-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _two_checkpoints(url: str) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Checkpoint "a", then "b" (the latest), each with a float written 1e-08 and a non-ASCII string."""
    a, b = _model(0), _model(1)
    hparams = {"lr": 1e-08, "note": "café"}
    ckptkit.save(url, {"model": a}, "a", hparams=hparams, rng=False)
    ckptkit.save(url, {"model": b}, "b", hparams=hparams, rng=False)
    return a, b


def _rewrite(url: str, name: str, edit: Callable[[bytes], bytes]) -> bytes:
    """Overwrite checkpoint ``name``'s stored manifest with ``edit(bytes)``, as a hand edit would; the new bytes."""
    r = Repository(url)
    raw = r.read_manifest(name)
    edited = edit(raw)
    assert edited != raw and json.loads(edited) is not None  # still JSON: only the stored-bytes checks see it
    r.fs.pipe_file(r.manifest_path(name), edited)
    assert Repository(url).read_manifest(name) == edited
    return edited


def test_golden_manifests_are_stored_canonically() -> None:
    files = sorted(GOLDEN.glob("v*/checkpoints/*.json"))
    assert files
    for f in files:
        raw = f.read_bytes()
        assert raw == canonical_json(json.loads(raw)), f"{f} is not the canonical JSON ckptkit writes"
        assert parse_manifest(raw, str(f)).name == f.stem


def test_what_ckptkit_writes_parses(url: str) -> None:
    _two_checkpoints(url)
    r = Repository(url)
    for n in ("a", "b"):
        raw = r.read_manifest(n)
        assert b"1e-08" in raw and "café".encode() in raw
        assert parse_manifest(raw, n).hparams == {"lr": 1e-08, "note": "café"}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_parse_manifest_refuses_every_other_spelling(edit: str) -> None:
    m = ckptkit.save(f"memory://ckptkit-test-{uuid.uuid4().hex}", {"model": _model(0)}, "x", rng=False,
                     hparams={"lr": 1e-08, "note": "café"})  # fmt: skip
    from ckptkit.schema import dump_manifest

    raw = dump_manifest(m)
    assert parse_manifest(raw, "x.json").id == m.id
    edited = EDITS[edit](raw)
    assert edited != raw
    with pytest.raises(ManifestError) as info:
        parse_manifest(edited, "x.json")
    assert info.value.where == "x.json" and "edited after it was committed" in str(info.value)


def test_the_error_gives_the_first_differing_byte_and_both_excerpts() -> None:
    m = ckptkit.save(f"memory://ckptkit-test-{uuid.uuid4().hex}", {"model": _model(0)}, "x", rng=False,
                     hparams={"lr": 1e-08})  # fmt: skip
    from ckptkit.schema import dump_manifest

    raw = dump_manifest(m)
    at = raw.index(b"1e-08") + 1
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw.replace(b"1e-08", b"1E-08"), "x.json")
    msg = str(info.value)
    assert "not the form ckptkit committed" in msg and f"differ at byte {at}," in msg
    assert '"lr":1E-08' in msg and '"lr":1e-08' in msg  # the stored excerpt, and the committed one
    with pytest.raises(ManifestError, match=rf"differ at byte {len(raw)}, .*\\n`"):
        parse_manifest(raw + b"\n", "x.json")  # the newline is shown, not printed


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_an_edited_latest_manifest_is_refused_and_restore_falls_back(url: str, edit: str) -> None:
    a, _ = _two_checkpoints(url)
    _rewrite(url, "b", EDITS[edit])
    manifest_file = f"{url}/checkpoints/b.json"

    # parse_manifest, through every reader
    with pytest.raises(ManifestError) as info:
        ckptkit.inspect(url, "b")
    assert info.value.where == manifest_file and "edited after it was committed" in str(info.value)
    assert [m.name for m in checkpoints(url)] == ["a"]  # listed no more
    with pytest.raises(ManifestError, match="gc refuses"):
        gc(url)  # its objects would look unreferenced

    # verify: b is not ok, and the problem names its manifest file
    reports = {rep.name: rep for rep in ckptkit.verify(url)}
    assert reports["a"].ok and reports["a"].files == []
    bad = reports["b"]
    assert not bad.ok and bad.files == [manifest_file]
    assert len(bad.problems) == 1 and manifest_file in bad.problems[0]
    assert not ckptkit.verify(url, "b")[0].ok

    # restore(name=...) refuses it and loads nothing
    live = _model(7)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with pytest.raises(ManifestError) as info:
        ckptkit.restore(url, {"model": live}, "b", rng=False)
    assert info.value.where == manifest_file
    assert all(torch.equal(live.state_dict()[k], v) for k, v in before.items())

    # restore() without a name skips it (a ManifestError while scanning) and restores the previous checkpoint
    result = ckptkit.restore(url, {"model": live}, rng=False)
    assert result.manifest.name == "a"
    assert all(torch.equal(live.state_dict()[k], v) for k, v in a.state_dict().items())


def test_an_edited_archived_manifest_is_refused_by_the_history_walk(url: str) -> None:
    """lineage/<id>.json holds the manifest of a pruned checkpoint: read through parse_manifest too, and it must
    be the manifest of that id."""
    a = ckptkit.save(url, {"model": _model(0)}, "a", rng=False, hparams={"lr": 1e-08})
    ckptkit.save(url, {"model": _model(1)}, "b", rng=False,
                 lineage=Lineage(relation="train", parents=[Parent(id=a.id, relation="train", name="a")]))  # fmt: skip
    r = Repository(url)
    raw = r.read_manifest("a")
    r.retire("a", a.id)
    h = history(url, "b")
    assert [n.manifest.name for n in h.nodes] == ["b", "a"] and h.nodes[1].archived and not h.missing

    archived = f"{r.root}/lineage/{a.id}.json"
    r.fs.pipe_file(archived, raw.replace(b"1e-08", b"1E-08"))
    h = history(url, "b")
    assert [n.manifest.name for n in h.nodes] == ["b"]
    assert "not the form ckptkit committed" in h.missing[a.id] and f"lineage/{a.id}.json" in h.missing[a.id]

    other = ckptkit.save(url, {"model": _model(2)}, "c", rng=False)  # intact, but not the manifest of a.id
    r.fs.pipe_file(archived, Repository(url).read_manifest("c"))
    h = history(url, "b")
    assert [n.manifest.name for n in h.nodes] == ["b"]
    assert f"holds manifest {other.id}" in h.missing[a.id]


# --- verify(raise_on_error=True) ------------------------------------------------------------------------------


def test_raise_on_error_returns_the_reports_when_all_is_well(url: str) -> None:
    _two_checkpoints(url)
    reports = ckptkit.verify(url, raise_on_error=True)
    assert [(rep.name, rep.ok, rep.files) for rep in reports] == [("a", True, []), ("b", True, [])]
    assert ckptkit.verify(url, "a", raise_on_error=True)[0].ok


def test_raise_on_error_names_the_damaged_manifest(url: str) -> None:
    _two_checkpoints(url)
    _rewrite(url, "b", EDITS["trailing newline"])
    assert not ckptkit.verify(url)[1].ok  # the default still returns the reports
    with pytest.raises(VerificationError) as info:
        ckptkit.verify(url, raise_on_error=True)
    err = info.value
    assert isinstance(err, CkptkitError) and isinstance(err, OSError)
    assert [rep.name for rep in err.reports] == ["a", "b"] and [rep.name for rep in err.damaged] == ["b"]
    msg = str(err)
    assert f"1 of 2 checkpoint(s) in {url} failed verification" in msg
    assert f"b ({url}/checkpoints/b.json)" in msg
    assert "falls back" in msg and "`ckptkit gc` repairs nothing" in msg and "replica or a backup" in msg
    with pytest.raises(VerificationError):
        ckptkit.verify(url, "b", raise_on_error=True)
    assert ckptkit.verify(url, "a", raise_on_error=True)[0].ok  # only what was asked is judged


def test_raise_on_error_names_missing_and_corrupt_objects(url: str) -> None:
    _two_checkpoints(url)
    r = Repository(url)
    ma, mb = ckptkit.inspect(url, "a"), ckptkit.inspect(url, "b")
    only_a = sorted(set(ma.objects) - set(mb.objects))
    only_b = sorted(set(mb.objects) - set(ma.objects))
    assert only_a and only_b
    r.fs.rm(r.object_path(only_a[0]))  # missing
    data = bytearray(r.fs.cat_file(r.object_path(only_b[0])))
    data[-1] ^= 0xFF
    r.fs.pipe_file(r.object_path(only_b[0]), bytes(data))  # corrupt
    reports = {rep.name: rep for rep in ckptkit.verify(url)}
    assert reports["a"].files == [r.object_path(only_a[0])] and "missing" in reports["a"].problems[0]
    assert reports["b"].files == [r.object_path(only_b[0])] and "corrupt" in reports["b"].problems[0]
    with pytest.raises(VerificationError) as info:
        ckptkit.verify(url, raise_on_error=True)
    msg = str(info.value)
    assert f"2 of 2 checkpoint(s) in {url}" in msg
    assert f"a ({r.object_path(only_a[0])})" in msg and f"b ({r.object_path(only_b[0])})" in msg
    assert len(info.value.damaged) == 2


def test_a_manifest_that_points_nowhere_names_the_manifest_file(url: str) -> None:
    ckptkit.save(url, {"model": _model(0)}, "a", rng=False)
    r = Repository(url)
    data = json.loads(r.read_manifest("a"))
    data["components"]["model"]["aliases"] = {"tied": "nowhere"}
    from ckptkit.schema import manifest_id

    data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})  # a consistent forgery
    r.fs.pipe_file(r.manifest_path("a"), canonical_json(data))
    rep = ckptkit.verify(url)[0]
    assert not rep.ok and rep.files == [f"{url}/checkpoints/a.json"]
    with pytest.raises(VerificationError, match=rf"a \({url}/checkpoints/a\.json\)"):
        ckptkit.verify(url, raise_on_error=True)


def test_cli_verify_names_the_damaged_file_and_exits_nonzero(url: str) -> None:
    _two_checkpoints(url)
    _rewrite(url, "b", EDITS["1e-08 as 1E-08"])
    out = CliRunner().invoke(main, ["verify", url])
    assert out.exit_code == 1, out.output
    assert "ok       a:" in out.output
    assert f"DAMAGED  b: file {url}/checkpoints/b.json" in out.output
    assert "CORRUPT  b:" in out.output and "not the form ckptkit committed" in out.output
    assert "1 of 2 checkpoint(s) failed verification" in out.output and "falls back" in out.output
