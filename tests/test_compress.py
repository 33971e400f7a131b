"""Lossless compression of stored objects (codec "byteplane-zstd"): bit-exact round trips of every dtype, object
names shared with raw repositories, raw storage of what does not shrink, the caller's tensors untouched, bounded
and typed failures on hostile or damaged objects, verify, and old repositories still loading."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

import ckptkit
from ckptkit import codecs
from ckptkit.errors import CorruptObjectError, InvalidArgumentError
from ckptkit.format import pack, unpack
from ckptkit.schema import parse_manifest
from ckptkit.storage import Repository

CODEC = "byteplane-zstd"
GOLDEN = Path(__file__).parent / "golden"


def _dtypes() -> list[torch.dtype]:
    out = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
           torch.int64, torch.uint8, torch.bool, torch.complex64]  # fmt: skip
    out += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
            if hasattr(torch, n)]  # fmt: skip
    return out


def _tensor(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Trained-like values (small normals) for float types, a narrow range for integers."""
    if dtype.is_floating_point or dtype.is_complex:
        base = torch.randn(n, generator=g, dtype=torch.complex64 if dtype.is_complex else torch.float32) * 0.02
        return base.to(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.7
    return torch.randint(0, 100, (n,), generator=g).to(dtype)


def _extras(g: torch.Generator) -> dict[str, Any]:
    ts: dict[str, Any] = {}
    for dt in _dtypes():
        name = str(dt).removeprefix("torch.")
        ts[name] = _tensor(dt, 3001, g)  # an odd count: planes of uneven chunks
        ts[f"{name}_0dim"] = _tensor(dt, 1, g).reshape(())
        ts[f"{name}_empty"] = torch.empty((0, 3), dtype=dt)
    ts["noncontiguous"] = torch.randn(64, 32, generator=g).t()
    return ts


def _state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(16, 64, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, _extras(g)


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, exactly (NaN payloads and -0.0 included)."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _repo(path: Path, codec: str | None = CODEC) -> str:
    url = str(path)
    if codec is not None:
        Repository(url).configure(codec=codec)
    return url


def _stored(url: str) -> dict[str, int]:
    return Repository(url).list_objects()


def test_every_dtype_round_trips_bit_exact_with_the_names_of_a_raw_repository(tmp_path: Path) -> None:
    model, opt, extras = _state()
    snapshot = {k: v.clone() for k, v in extras.items()}
    zipped, raw = _repo(tmp_path / "zipped"), _repo(tmp_path / "raw", None)
    mz = ckptkit.save(zipped, {"model": model, "optimizer": opt, "extras": extras}, "a")
    mr = ckptkit.save(raw, {"model": model, "optimizer": opt, "extras": extras}, "a")
    assert sorted(mz.objects) == sorted(mr.objects)  # names: the hash of the uncompressed bytes
    assert sorted(_stored(zipped)) == sorted(_stored(raw))
    assert mz.format_version == 2 and mr.format_version == 1
    assert any(o.codec == CODEC for o in mz.objects.values())
    assert sum(_stored(zipped).values()) < sum(_stored(raw).values())
    assert all(o.codec is None for o in mr.objects.values())
    assert b'"codec"' not in Repository(raw).read_manifest("a")  # raw manifests keep the version 1 bytes

    model2, opt2, _ = _state(seed=1)
    result = ckptkit.restore(zipped, {"model": model2, "optimizer": opt2}, "a")
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert str(opt.state_dict()) == str(opt2.state_dict())
    back = result.values["extras"]
    for k, v in snapshot.items():
        got = back[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert _bytes(got) == _bytes(v), k
    assert all(r.ok for r in ckptkit.verify(zipped))


def test_objects_of_many_chunks_round_trip_with_their_frames_decoded_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codecs, "CHUNK", 1 << 14)  # many frames per object, as a 64 MiB object has at 16 MiB
    g = torch.Generator().manual_seed(5)
    ts = {"bf16": _tensor(torch.bfloat16, 300_001, g), "f32": _tensor(torch.float32, 100_003, g),
          "i64": _tensor(torch.int64, 20_001, g), "u8": _tensor(torch.uint8, 70_001, g)}  # fmt: skip
    url = _repo(tmp_path / "z")
    m = ckptkit.save(url, {"x": ts}, "a")
    assert {o.codec for h, o in m.objects.items() if h in {r.object for r in m.components["x"].tensors.values()}} \
        == {CODEC}  # fmt: skip
    back = ckptkit.restore(url, {}, "a").values["x"]
    assert all(_bytes(back[k]) == _bytes(v) for k, v in ts.items())


def test_the_callers_tensors_are_not_modified(tmp_path: Path) -> None:
    model, opt, extras = _state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_x = {k: v.clone() for k, v in extras.items()}
    ckptkit.save(_repo(tmp_path / "z"), {"model": model, "optimizer": opt, "extras": extras}, "a")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in extras.items():
        assert v.dtype == before_x[k].dtype and _bytes(v) == _bytes(before_x[k]), k


def test_an_incompressible_object_is_stored_raw_and_recorded_so(tmp_path: Path) -> None:
    url = _repo(tmp_path / "z")
    noise = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    smooth = torch.zeros(1 << 18, dtype=torch.bfloat16)
    m = ckptkit.save(url, {"noise": {"x": noise}, "smooth": {"y": smooth}}, "a")
    by_tensor = {c: next(iter(m.components[c].tensors.values())).object for c in ("noise", "smooth")}
    stored = _stored(url)
    assert m.objects[by_tensor["noise"]].codec is None
    assert stored[by_tensor["noise"]] == m.objects[by_tensor["noise"]].size  # stored as it is
    assert m.objects[by_tensor["smooth"]].codec == CODEC
    assert stored[by_tensor["smooth"]] < m.objects[by_tensor["smooth"]].size // 50
    assert torch.equal(ckptkit.restore(url, {}, "a").values["noise"]["x"], noise)


def test_turning_compression_on_later_deduplicates_and_records_the_stored_form(tmp_path: Path) -> None:
    url = _repo(tmp_path / "r", None)
    model, opt, _ = _state()
    first = ckptkit.save(url, {"model": model}, "a")
    Repository(url).configure(codec=CODEC)
    second = ckptkit.save(url, {"model": model}, "b")
    assert sorted(first.objects) == sorted(second.objects)  # nothing written twice
    assert all(o.codec is None for o in second.objects.values())  # found stored raw, and said so
    ckptkit.save(url, {"model": model, "optimizer": opt}, "c")
    Repository(url).configure(codec=None)
    third = ckptkit.save(url, {"model": model, "optimizer": opt}, "d")
    model2, opt2, _ = _state(seed=1)
    ckptkit.restore(url, {"model": model2, "optimizer": opt2}, "d")  # reads compressed objects from a raw config
    assert str(opt2.state_dict()) == str(opt.state_dict())
    assert third.format_version == 1 and all(r.ok for r in ckptkit.verify(url))


def test_a_compressed_object_copied_into_a_raw_repository_loads_there(tmp_path: Path) -> None:
    zipped, raw = _repo(tmp_path / "z"), _repo(tmp_path / "r", None)
    model, opt, _ = _state()
    m = ckptkit.save(zipped, {"model": model, "optimizer": opt}, "a")
    for h in m.objects:  # the files as stored (compressed), under the same names
        dst = Path(Repository(raw).object_path(h))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Repository(zipped).object_path(h), dst)
    Path(raw, "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(Repository(zipped).manifest_path("a"), Repository(raw).manifest_path("a"))
    assert all(r.ok for r in ckptkit.verify(raw))
    ckptkit.restore(raw, {"model": _state(seed=1)[0]}, "a")


def test_unknown_codecs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="codec name"):
        Repository(str(tmp_path / "a")).configure(codec="Not A Name")
    url = _repo(tmp_path / "b", "lz-nothing")
    with pytest.raises(InvalidArgumentError, match=r"lz-nothing.*byteplane-zstd"):
        ckptkit.save(url, {"model": torch.nn.Linear(2, 2)}, "a")
    assert _stored(url) == {}


# --- hostile and damaged objects -----------------------------------------------------------------------------


def _one_object(tmp_path: Path) -> tuple[str, str, int, Path]:
    url = _repo(tmp_path / "z")
    w = (torch.randn(1 << 17, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    m = ckptkit.save(url, {"w": {"w": w}}, "a")
    h = next(iter(m.components["w"].tensors.values())).object
    info = m.objects[h]
    assert info.codec == CODEC
    return url, h, info.size, Path(Repository(url).object_path(h))


def _frame_table(raw: bytes) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]], int]:
    """(payload start, segments, frames, first frame offset) of a stored byteplane-zstd object."""
    at = len(codecs.MAGIC) + 1 + raw[len(codecs.MAGIC)]
    _, _, nseg, nfr = struct.unpack_from("<QQII", raw, at)
    segs = [struct.unpack_from("<BQ", raw, at + 24 + 9 * i) for i in range(nseg)]
    frames = [struct.unpack_from("<BQ", raw, at + 24 + 9 * nseg + 9 * i) for i in range(nfr)]
    return at, segs, frames, at + 24 + 9 * (nseg + nfr)


def _expect_corrupt(url: str, path: Path, size: int) -> CorruptObjectError:
    tracemalloc.start()
    try:
        with pytest.raises(CorruptObjectError) as err:
            ckptkit.restore(url, {}, "a")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path) and str(path) in str(err.value)
    assert peak < 2 * size + (4 << 20), peak  # never what the hostile object claims
    reports = ckptkit.verify(url)
    assert not reports[0].ok and reports[0].files == [str(path)]
    return err.value


@pytest.mark.parametrize("content_size", [True, False], ids=["declares-huge", "declares-nothing"])
def test_a_frame_that_expands_beyond_its_plane_is_refused_unexpanded(tmp_path: Path, content_size: bool) -> None:
    url, _, size, path = _one_object(tmp_path)
    raw = path.read_bytes()
    at, segs, frames, first = _frame_table(raw)
    # A zip bomb in the place of the object's last frame: 2 GiB of zeros in ~70 KiB.
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    out = bomb.compressobj(size=(2 << 30) if content_size else -1)
    zero = bytes(1 << 20)
    data = b"".join(out.compress(zero) for _ in range(2048)) + out.flush()
    offsets = [first]
    for _, n in frames:
        offsets.append(offsets[-1] + n)
    table_at = at + 24 + 9 * len(segs) + 9 * (len(frames) - 1)
    head = bytearray(raw[: offsets[-2]])
    struct.pack_into("<BQ", head, table_at, 1, len(data))
    path.write_bytes(bytes(head) + data)
    err = _expect_corrupt(url, path, size)
    assert "zstd frame" in err.expected


def test_a_truncated_compressed_object_names_the_object(tmp_path: Path) -> None:
    url, _, size, path = _one_object(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    err = _expect_corrupt(url, path, size)
    assert "truncated" in str(err)


def test_a_bit_flipped_compressed_object_names_the_object(tmp_path: Path) -> None:
    url, h, size, path = _one_object(tmp_path)
    raw = bytearray(path.read_bytes())
    _, _, frames, first = _frame_table(bytes(raw))
    zstd_at = first + sum(n for k, n in frames[: [k for k, _ in frames].index(1)])  # inside a compressed frame
    raw[zstd_at + 500] ^= 0x10
    path.write_bytes(bytes(raw))
    err = _expect_corrupt(url, path, size)
    assert err.expected in (h,) or "zstd" in err.expected


def test_a_container_declaring_more_than_the_manifest_is_refused_before_allocating(tmp_path: Path) -> None:
    url, _, size, path = _one_object(tmp_path)
    raw = bytearray(path.read_bytes())
    at = len(codecs.MAGIC) + 1 + raw[len(codecs.MAGIC)]
    struct.pack_into("<Q", raw, at, 1 << 40)  # "1 TiB, trust me"
    path.write_bytes(bytes(raw))
    err = _expect_corrupt(url, path, size)
    assert err.found == f"a container declaring {1 << 40} bytes"


def test_planes_that_disagree_with_the_header_dtypes_are_refused() -> None:
    f32 = pack([("w", torch.arange(4096, dtype=torch.float32))])
    bf16 = pack([("w", torch.arange(8192, dtype=torch.bfloat16))])  # the same number of bytes in 2-byte planes
    assert len(f32.buffers[0]) == len(bf16.buffers[0]) and f32.size == bf16.size
    stored = bytearray(b"".join(codecs.encode(CODEC, bf16.buffers, bf16.size) or []))
    _, segs, frames, first = _frame_table(bytes(stored))
    assert segs[0] == (1, len(bf16.buffers[0])) and frames[0] == (0, len(bf16.buffers[0]))  # the header, as it is
    stored[first : first + len(f32.buffers[0])] = bytes(f32.buffers[0])  # ... now saying F32
    with pytest.raises(CorruptObjectError, match="element sizes") as err:
        codecs.decode(stored, f32.size, "objects/xx/yy")
    assert err.value.path == "objects/xx/yy"
    good = b"".join(codecs.encode(CODEC, f32.buffers, f32.size) or [])
    assert torch.equal(unpack(codecs.decode(good, f32.size, "x"), "x")["w"], torch.arange(4096, dtype=torch.float32))


# --- old repositories ----------------------------------------------------------------------------------------


def test_a_golden_repository_still_loads_after_compression_is_turned_on(tmp_path: Path) -> None:
    url = str(tmp_path / "v1")
    shutil.copytree(GOLDEN / "v1", url)
    Repository(url).configure(codec=CODEC)
    old = ckptkit.restore(url, {}, "golden")
    model = torch.nn.Linear(4, 4)
    new = ckptkit.save(url, {"model": model}, "after")
    assert old.manifest.format_version == 1 and new.format_version == 2
    assert all(r.ok for r in ckptkit.verify(url))
    raw = Repository(url).read_manifest("after")
    assert parse_manifest(raw, "after").objects == new.objects
    assert json.loads(raw)["format_version"] == 2


def test_the_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "compress.py"
    cmd = [sys.executable, str(bench), "--size-mib", "4", "--runs", "1", "--warmup", "0", "--json", "--dir", str(tmp_path), "--no-s3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    for key in ("bf16_ratio", "fp32_ratio", "compress_gbps_per_core", "decompress_gbps"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["bf16_ratio"] > 1.2 and result["s3_save_compressed_vs_raw"] == "n/a (no S3 server)"
    assert list(tmp_path.iterdir()) == []
