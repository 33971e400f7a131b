"""Damaged repositories: bit flips, truncated, grown and deleted objects, hand-edited, non-JSON and too-new
manifests; and fuzzing of the two parsers of untrusted bytes (``parse_manifest`` and ``unpack``).

Every damage must be detected before anything is loaded (the live model stays exactly as it was), reported by
``verify`` and ``ckptkit verify`` naming the damaged file, and must never make ``gc`` delete what a checkpoint
needs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ckptkit
from ckptkit.api import checkpoints, gc
from ckptkit.errors import (
    CkptkitError,
    CorruptObjectError,
    FormatVersionError,
    IncompleteCheckpointError,
    ManifestError,
)
from ckptkit.format import pack, unpack
from ckptkit.schema import (
    FORMAT_VERSION,
    DataSegment,
    Lineage,
    Manifest,
    Parent,
    Progress,
    canonical_json,
    dump_manifest,
    parse_manifest,
)
from ckptkit.storage import Repository

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- a repository with one checkpoint to damage and one that must stay intact -------------------------------


def _model(seed: int, width: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))


def _trained(seed: int, width: int = 16, lr: float = 1e-2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model(torch.randn(5, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@dataclass
class Repo:
    url: str
    root: Path
    manifest: Manifest  # of checkpoint "good"

    def objects_of(self, component: str) -> list[str]:
        return sorted({ref.object for ref in self.manifest.components[component].tensors.values()})

    def object_file(self, h: str) -> Path:
        return self.root / "objects" / h[:2] / h

    def manifest_file(self, name: str = "good") -> Path:
        return self.root / "checkpoints" / f"{name}.json"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    url = str(tmp_path / "repo")
    model, opt = _trained(0)
    m = ckptkit.save(url, {"model": model, "optimizer": opt}, "good", metrics={"loss": 0.5},
                     progress=Progress(global_step=10))  # fmt: skip
    other, other_opt = _trained(1, width=12)  # different shapes, no RNG: shares no object with "good"
    ckptkit.save(url, {"model": other, "optimizer": other_opt}, "other", rng=False)
    return Repo(url, tmp_path / "repo", m)


class Live:
    """A model and optimizer to restore into, and a snapshot to prove a failed restore left them untouched."""

    def __init__(self) -> None:
        self.model, self.opt = _trained(42, lr=3e-3)  # differs from the saved run in every tensor and in lr
        self.snapshot = self._state()

    def _state(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}
        for i, s in self.opt.state_dict()["state"].items():
            out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
        return out

    @property
    def state(self) -> dict[str, object]:
        return {"model": self.model, "optimizer": self.opt}

    def assert_unchanged(self) -> None:
        now = self._state()
        assert now.keys() == self.snapshot.keys()
        for k, v in self.snapshot.items():
            assert torch.equal(now[k], v), f"{k} changed by a restore that failed"
        assert self.opt.param_groups[0]["lr"] == 3e-3


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptkit.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def _problems(url: str, name: str) -> list[str]:
    (report,) = ckptkit.verify(url, name)
    assert report.name == name
    return report.problems


def test_intact_repository_restores_and_verifies(repo: Repo) -> None:
    """The baseline the damage tests depart from."""
    live = Live()
    ckptkit.restore(repo.url, live.state, "good", rng=False)
    expected, _ = _trained(0)
    for k, v in expected.state_dict().items():
        assert torch.equal(live.model.state_dict()[k], v)
    assert live.opt.param_groups[0]["lr"] == 1e-2  # a restore that gets through does change the live objects
    with pytest.raises(AssertionError):
        live.assert_unchanged()
    assert set(ckptkit.inspect(repo.url, "other").objects).isdisjoint(repo.manifest.objects)
    assert all(r.ok for r in ckptkit.verify(repo.url))
    assert len(repo.objects_of("model")) == 1 and len(repo.objects_of("optimizer")) == 1


# --- objects -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["model", "optimizer"])
@pytest.mark.parametrize("where", ["length", "header", "data", "last"])
def test_flipped_byte_in_object_is_detected_before_anything_loads(repo: Repo, component: str, where: str) -> None:
    (h,) = repo.objects_of(component)
    path = repo.object_file(h)
    data = bytearray(path.read_bytes())
    (hlen,) = struct.unpack_from("<Q", data, 0)
    pos = {"length": 0, "header": 8 + hlen // 2, "data": 8 + hlen + (len(data) - 8 - hlen) // 2, "last": -1}[where]
    data[pos] ^= 0x10
    path.write_bytes(data)

    live = Live()
    with pytest.raises(CorruptObjectError) as info:
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    err = info.value
    assert Path(err.path) == path
    assert err.expected == h
    assert HEX64.match(err.found) and err.found != h
    assert err.found == blake3.blake3(bytes(data)).hexdigest()
    assert str(path) in str(err)
    live.assert_unchanged()  # the model is untouched even when only the optimizer's object is damaged

    problems = _problems(repo.url, "good")
    assert len(problems) == 1 and str(path) in problems[0] and "corrupt" in problems[0]
    assert _problems(repo.url, "other") == []
    other = _model(7, 12)
    ckptkit.restore(repo.url, {"model": other}, "other", strict=False, rng=False)  # the intact one still restores
    assert torch.equal(other[0].weight, _trained(1, 12)[0][0].weight)


def test_cli_verify_names_the_flipped_object_and_exits_1(repo: Repo) -> None:
    (h,) = repo.objects_of("model")
    path = repo.object_file(h)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    out = _cli("verify", repo.url)
    assert out.returncode == 1, out.stdout + out.stderr
    corrupt = [line for line in out.stdout.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 1 and "good" in corrupt[0] and str(path) in corrupt[0], out.stdout
    assert any(line.startswith("ok") and "other" in line for line in out.stdout.splitlines()), out.stdout
    assert "1 of 2 checkpoint(s) failed verification" in out.stderr


@pytest.mark.parametrize("change", [-3, -1, 5])
def test_truncated_or_grown_object(repo: Repo, change: int) -> None:
    (h,) = repo.objects_of("model")
    path = repo.object_file(h)
    data = path.read_bytes()
    size = repo.manifest.objects[h].size
    assert len(data) == size
    path.write_bytes(data[:change] if change < 0 else data + b"\0" * change)

    live = Live()
    with pytest.raises(CorruptObjectError) as info:
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    err = info.value
    assert Path(err.path) == path
    assert (err.expected, err.found) == (f"{size} bytes", f"{size + change} bytes")
    assert "size differs" in str(err)
    live.assert_unchanged()
    problems = _problems(repo.url, "good")
    assert len(problems) == 1 and str(path) in problems[0]


def test_deleted_object_is_an_incomplete_checkpoint(repo: Repo) -> None:
    (h,) = repo.objects_of("optimizer")
    path = repo.object_file(h)
    path.unlink()

    live = Live()
    with pytest.raises(IncompleteCheckpointError) as info:
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    assert info.value.name == "good"
    assert [Path(p) for p in info.value.missing] == [path]
    assert str(path) in str(info.value)
    assert isinstance(info.value, OSError)
    live.assert_unchanged()
    assert _problems(repo.url, "good") == [f"object {path} is missing"]

    out = _cli("verify", repo.url, "good")
    assert out.returncode == 1
    assert str(path) in out.stdout and "missing" in out.stdout, out.stdout


# --- manifests ---------------------------------------------------------------------------------------------


def _edit(repo: Repo, change: Any) -> bytes:
    """Rewrite manifest "good" after ``change(data)``; return the original bytes."""
    path = repo.manifest_file()
    raw = path.read_bytes()
    data = json.loads(raw)
    change(data)
    path.write_bytes(canonical_json(data))
    return raw


def _orphan_other(repo: Repo) -> set[str]:
    """Delete checkpoint "other": its objects become orphans, which a gc that runs would delete."""
    m = ckptkit.inspect(repo.url, "other")
    Repository(repo.url).delete("other")
    orphans = set(m.objects) - set(repo.manifest.objects)
    assert orphans and all(repo.object_file(h).exists() for h in orphans)
    return orphans


def _assert_gc_refuses(repo: Repo, orphans: set[str]) -> None:
    before = set(Repository(repo.url).list_objects())
    with pytest.raises(ManifestError) as info:
        gc(repo.url)
    assert "gc refuses" in str(info.value) and "good.json" in str(info.value)
    assert set(Repository(repo.url).list_objects()) == before  # nothing deleted, not even the true orphans
    assert all(repo.object_file(h).exists() for h in orphans)
    assert not (repo.root / "gc.lock").exists(), "a refused gc left its lock behind"


def test_hand_edited_metric_breaks_the_id(repo: Repo, caplog: pytest.LogCaptureFixture) -> None:
    orphans = _orphan_other(repo)
    original = _edit(repo, lambda d: d["metrics"].update(loss=0.25))
    assert json.loads(repo.manifest_file().read_bytes())["id"] == repo.manifest.id

    with pytest.raises(ManifestError) as info:
        ckptkit.inspect(repo.url, "good")
    msg = str(info.value)
    assert repo.manifest.id in msg and "does not match its content" in msg and "edited" in msg
    assert "good.json" in info.value.where
    live = Live()
    with pytest.raises(ManifestError):
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    live.assert_unchanged()
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        assert checkpoints(repo.url) == []  # an unreadable manifest is never listed as a checkpoint
    assert "skipping checkpoint good" in caplog.text
    problems = _problems(repo.url, "good")
    assert len(problems) == 1 and "does not match its content" in problems[0]

    _assert_gc_refuses(repo, orphans)
    # Once the manifest is repaired, gc runs and removes exactly the orphans.
    repo.manifest_file().write_bytes(original)
    report = gc(repo.url)
    assert report.objects_removed == len(orphans)
    assert set(Repository(repo.url).list_objects()) == set(repo.manifest.objects)
    assert all(r.ok for r in ckptkit.verify(repo.url))


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"format_version": 1, "id": "', b"\xff\xfe\x00garbage",
                                 b"[1, 2, 3]", b'{"format_version": 1}', b"null"])  # fmt: skip
def test_manifest_that_is_not_a_manifest(repo: Repo, raw: bytes) -> None:
    orphans = _orphan_other(repo)
    repo.manifest_file().write_bytes(raw)
    with pytest.raises(ManifestError) as info:
        ckptkit.inspect(repo.url, "good")
    assert "good.json" in str(info.value)
    live = Live()
    with pytest.raises(ManifestError):
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    live.assert_unchanged()
    assert len(_problems(repo.url, "good")) == 1
    _assert_gc_refuses(repo, orphans)


def test_manifest_from_a_newer_format_version(repo: Repo) -> None:
    orphans = _orphan_other(repo)
    _edit(repo, lambda d: d.update(format_version=999))

    with pytest.raises(FormatVersionError) as info:
        ckptkit.inspect(repo.url, "good")
    err = info.value
    assert (err.found, err.supported) == (999, FORMAT_VERSION)
    assert isinstance(err, ManifestError)
    assert "upgrade" in str(err) and "999" in str(err) and "good.json" in str(err)
    live = Live()
    with pytest.raises(FormatVersionError):
        ckptkit.restore(repo.url, live.state, "good", rng=False)
    live.assert_unchanged()
    (problem,) = _problems(repo.url, "good")
    assert "upgrade" in problem
    _assert_gc_refuses(repo, orphans)

    out = _cli("show", repo.url, "good")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "upgrade" in out.stderr and "Traceback" not in out.stderr


# --- fuzzing the parsers of untrusted bytes ----------------------------------------------------------------

# CKPTKIT_FUZZ_EXAMPLES=5000 fuzzes deeper locally; CI runs the modest default.
FUZZ = settings(max_examples=int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@functools.cache
def _valid_manifest() -> bytes:
    model, opt = _trained(3, width=4)
    url = "memory://ckptkit-fuzz-manifest"
    m = ckptkit.save(
        url, {"model": model, "optimizer": opt, "epoch_info": {"epoch": 2, "note": "x"}}, "fuzz",
        progress=Progress(epoch=2, global_step=30, samples_seen=960), metrics={"loss": 0.25, "acc": float("nan")},
        hparams={"lr": 0.01, "layers": [4, 4], "name": "fuzz"}, rng=False,
        data=[DataSegment(name="train", uri="s3://b/train", fingerprint="ab" * 8, size=1000, samples_consumed=960)],
        lineage=Lineage(relation="resume", parents=[Parent(id="0" * 64, relation="resume", name="prev")]),
    )  # fmt: skip
    Repository(url).fs.rm(Repository(url).root, recursive=True)
    raw = dump_manifest(m)
    assert parse_manifest(raw, "valid").id == m.id
    return raw


@functools.cache
def _valid_object() -> bytes:
    tensors = [("a.weight", torch.randn(3, 4)), ("a.bias", torch.arange(4, dtype=torch.int64)),
               ("b", torch.tensor([True, False])), ("c", torch.zeros(0, 3, dtype=torch.float16)),
               ("d", torch.tensor(7, dtype=torch.uint8))]  # fmt: skip
    obj = pack(tensors)
    raw = b"".join(bytes(c) for c in obj.chunks())
    assert blake3.blake3(raw).hexdigest() == obj.hash
    got = unpack(bytearray(raw), "valid")
    assert all(torch.equal(got[k], t) for k, t in tensors)
    return raw


# Any code point, lone surrogates included (json.dumps escapes them as \\udXXX, which json.loads accepts).
any_text = st.text(st.characters(codec=None, categories=None), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def byte_mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random byte-level edits: flips, overwrites, insertions, deletions, truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from(b'\x00\xff"{}[],:0-9eE.\\ntf'))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def _locations(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append((node, k))
        _locations(v, out)
    return out


@st.composite
def json_mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` (JSON) with values replaced by random JSON (NaN and infinities included), keys deleted or
    added; with the ``id`` recomputed or not and written canonically or not, so mutations reach validation, the
    stored-bytes check and the id check alike."""
    data = json.loads(base)
    for _ in range(draw(st.integers(1, 3))):
        locs = _locations(data, [])
        parent, key = draw(st.sampled_from(locs))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    if isinstance(data, dict) and draw(st.booleans()):
        with_id = {k: v for k, v in data.items() if k != "id"}
        with contextlib.suppress(ValueError, RecursionError):  # not canonicalisable (inf): keep the old id
            data["id"] = blake3.blake3(canonical_json(with_id)).hexdigest()
    if draw(st.booleans()):  # written as ckptkit writes, so that mutations get past the stored-bytes check too
        with contextlib.suppress(ValueError, RecursionError):
            return canonical_json(data)
    return json.dumps(data).encode()


def _parse_or_typed_error(raw: bytes) -> None:
    try:
        m = parse_manifest(raw, "fuzz.json")
    except CkptkitError as err:
        assert str(err)
        return
    assert isinstance(m, Manifest)


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b"1" * 5000


@pytest.mark.timeout(300)
@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(DEEP_JSON)
@example(b'{"format_version": ' + HUGE_INT + b"}")
@example(b'{"format_version": 1, "hparams": ' + DEEP_JSON + b"}")
def test_fuzz_parse_manifest_random_bytes(raw: bytes) -> None:
    _parse_or_typed_error(raw)


@pytest.mark.timeout(300)
@FUZZ
@given(st.data())
def test_fuzz_parse_manifest_mutated_bytes(data: st.DataObject) -> None:
    _parse_or_typed_error(data.draw(byte_mutations(_valid_manifest())))


@pytest.mark.timeout(300)
@FUZZ
@given(st.data())
def test_fuzz_parse_manifest_mutated_json(data: st.DataObject) -> None:
    _parse_or_typed_error(data.draw(json_mutations(_valid_manifest())))


HOSTILE_JSON = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b'"\\ud800"', b'{"\\udfff": 1}',
                HUGE_INT, b"[" * 5000 + b"]" * 5000, DEEP_JSON]  # fmt: skip


@pytest.mark.parametrize("literal", HOSTILE_JSON, ids=lambda b: b[:12].decode())
@pytest.mark.parametrize("field", ["hparams", "state", "sampler_state", "changes", "metrics"])
def test_parse_manifest_hostile_json_is_a_manifest_error(field: str, literal: bytes) -> None:
    """JSON that parses in Python but cannot be hashed canonically (non-finite floats, lone surrogates), or
    that does not parse at all (too deep, too long a number), in each free-form field: always a typed error."""
    data = json.loads(_valid_manifest())
    marker = "HOSTILE-VALUE-MARKER"
    if field == "hparams":
        data["hparams"]["x"] = marker
    elif field == "state":
        data["components"]["epoch_info"]["state"] = {"x": marker}
    elif field == "sampler_state":
        data["data"][0]["sampler_state"] = {"x": marker}
    elif field == "changes":
        data["lineage"]["parents"][0]["changes"] = {"x": marker}
    else:
        data["metrics"]["loss"] = marker
    raw = json.dumps(data).encode().replace(f'"{marker}"'.encode(), literal)
    with pytest.raises(ManifestError):
        parse_manifest(raw, "hostile.json")


def _unpack_or_typed_error(raw: bytes) -> None:
    buf = bytearray(raw)
    try:
        out = unpack(buf, "fuzz-object")
    except CkptkitError as err:
        assert isinstance(err, CorruptObjectError) and err.path == "fuzz-object"
        return
    assert isinstance(out, dict)
    for t in out.values():
        assert isinstance(t, torch.Tensor)
        assert t.numel() * t.element_size() <= len(raw)


def _object(header: Any, data: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


dtype_codes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "I8", "BOOL", "C64", "F8_E4M3",
                               "U16", "nope", ""])  # fmt: skip
tensor_entries = st.fixed_dictionaries(
    {"dtype": dtype_codes | json_values, "shape": st.lists(st.integers() | st.floats(), max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | st.lists(st.integers()) | json_values},
) | json_values  # fmt: skip
headers = st.dictionaries(st.text(max_size=6), tensor_entries, max_size=4)


@pytest.mark.timeout(300)
@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(_object(DEEP_JSON))
@example(_object(b'{"a": ' + HUGE_INT + b"}"))
@example(_object({"a": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(_object({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}))
@example(_object({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}))
@example(_object({"a": {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}}, b"\0" * 4))
@example(b"\xff" * 8 + b"{}")
def test_fuzz_unpack_random_bytes(raw: bytes) -> None:
    _unpack_or_typed_error(raw)


@pytest.mark.timeout(300)
@FUZZ
@given(st.data())
def test_fuzz_unpack_mutated_object(data: st.DataObject) -> None:
    _unpack_or_typed_error(data.draw(byte_mutations(_valid_object())))


@pytest.mark.timeout(300)
@FUZZ
@given(headers, st.binary(max_size=64))
def test_fuzz_unpack_random_headers(header: dict[str, Any], payload: bytes) -> None:
    _unpack_or_typed_error(_object(header, payload))


def test_fuzz_inputs_are_not_trivially_rejected() -> None:
    """The mutation strategies start from inputs that parse, so they probe past the first check."""
    assert parse_manifest(_valid_manifest(), "valid").name == "fuzz"
    assert len(unpack(bytearray(_valid_object()), "valid")) == 5
    mutated = copy.deepcopy(json.loads(_valid_manifest()))
    mutated["metrics"]["loss"] = 1.0
    with pytest.raises(ManifestError, match="does not match its content"):
        parse_manifest(json.dumps(mutated).encode(), "edited")
