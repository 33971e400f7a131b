"""The manifest schema: validation on write and read, versioning, golden checkpoints, the published schema."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ckptkit
from ckptkit.errors import FormatVersionError, ManifestError
from ckptkit.schema import FORMAT_VERSION, canonical_json, dump_manifest, json_schema, manifest_id, parse_manifest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from golden_model import build, fill  # noqa: E402


@pytest.mark.parametrize("version", sorted(p.name for p in GOLDEN.glob("v*") if p.is_dir()))
def test_golden_checkpoint_of_every_format_version_still_loads(version: str, tmp_path: Path) -> None:
    url = str(tmp_path / version)
    shutil.copytree(GOLDEN / version, url)  # never write into the checked-in folder
    assert all(r.ok for r in ckptkit.verify(url))
    expected = build()
    fill(*expected)
    model, opt, sched, scaler = build()
    result = ckptkit.restore(url, {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}, "golden")
    for k, v in expected[0].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.head.weight is model.embed.weight
    assert str(opt.state_dict()) == str(expected[1].state_dict())
    assert sched.state_dict() == expected[2].state_dict() and scaler.get_scale() == 128.0
    extras = result.values["extras"]
    assert extras["tuple"] == (1, 2.5) and math.isnan(extras["nan"]) and extras["ints"] == {3: "three"}
    m = result.manifest
    assert m.progress.global_step == 40 and m.metrics["diverged"] == float("inf") and m.data[0].name == "toy"


def test_manifest_round_trips_and_its_id_is_its_content_hash(tmp_path: Path) -> None:
    m = ckptkit.save(str(tmp_path), {"model": torch.nn.Linear(2, 2)}, "a", metrics={"loss": float("nan")})
    raw = dump_manifest(m)
    again = parse_manifest(raw, "test")
    assert again.id == m.id and dump_manifest(again) == raw
    data = json.loads(raw)
    assert data["metrics"]["loss"] == "nan"  # standard JSON: no NaN literal
    data["progress"]["global_step"] = 99
    with pytest.raises(ManifestError, match="does not match its content"):
        parse_manifest(json.dumps(data).encode(), "edited")
    with pytest.raises(ManifestError, match="NaN is not standard JSON"):
        parse_manifest(raw.replace(b'"nan"', b"NaN"), "nonstandard")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(format_version=FORMAT_VERSION + 1), "upgrade ckptkit"),
        (lambda d: d.update(format_version="1"), "positive integer"),
        (lambda d: d.update(name="../../etc"), "name"),
        (lambda d: d["objects"].update({"../x": {"size": 1}}), "objects"),
        (lambda d: d.update(unknown_field=1), "unknown_field"),
        (lambda d: d["progress"].update(global_step=-1), "global_step"),
    ],
)
def test_invalid_manifests_are_refused_with_a_clear_error(tmp_path: Path, mutate: object, match: str) -> None:
    m = ckptkit.save(str(tmp_path), {"model": torch.nn.Linear(2, 2)}, "a")
    data = json.loads(dump_manifest(m))
    mutate(data)  # type: ignore[operator]
    data["id"] = manifest_id({k: v for k, v in data.items() if k != "id"})  # a consistent forgery: validation must catch it
    with pytest.raises(ManifestError, match=match) as err:
        parse_manifest(canonical_json(data), "x.json")  # canonical, as ckptkit writes: else the stored-bytes check refuses it first
    if "upgrade" in match:
        assert isinstance(err.value, FormatVersionError) and err.value.found == FORMAT_VERSION + 1


def test_published_json_schema_is_up_to_date() -> None:
    published = json.loads((Path(__file__).parents[1] / "docs" / "manifest.schema.json").read_text())
    assert published == json_schema(), "regenerate: ckptkit schema > docs/manifest.schema.json"
