"""Data fingerprints: stable for the same data, different for any change that matters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptkit.errors import CkptkitError
from ckptkit.training import fingerprint, segment


def test_sample_ids_depend_on_content_and_order() -> None:
    assert fingerprint([1, 2, 3]) == fingerprint([1, 2, 3])
    assert fingerprint([1, 2, 3]) != fingerprint([3, 2, 1])
    assert fingerprint(["a"]) != fingerprint(["b"])


def test_files_by_content_or_by_mtime(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes([i]) * 100)
        files.append(str(p))
    a = fingerprint(files)
    fast = fingerprint(files, content=False)
    assert a.startswith("files:") and a == fingerprint(files)
    Path(files[1]).write_bytes(b"\x09" * 100)  # same size, new content
    os.utime(files[1], ns=(1, 1))
    assert fingerprint(files) != a
    assert fingerprint(files, content=False) != fast


def test_tensors_and_tensor_datasets() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(3))
    assert fingerprint(ds) == fingerprint(torch.utils.data.TensorDataset(x.clone(), torch.zeros(3)))
    y = x.clone()
    y[0, 0] = 99
    assert fingerprint(torch.utils.data.TensorDataset(y, torch.zeros(3))) != fingerprint(ds)
    assert fingerprint(x) != fingerprint(x.double())


def test_pandas_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    assert fingerprint(df) == fingerprint(df.copy())
    assert fingerprint(df) != fingerprint(df.assign(label=[1, 0]))
    assert fingerprint(df) != fingerprint(df.astype({"label": "float64"}))


def test_hf_datasets_fingerprint() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    assert fingerprint(ds).startswith("hf-datasets:")
    assert fingerprint(ds) != fingerprint(ds.map(lambda r: {"label": 1 - r["label"]}))
    seg = segment(ds, "train-part-1", split="train")
    assert seg.size == 2 and seg.fingerprint == fingerprint(ds)


def test_a_fingerprint_hook_and_a_clear_error() -> None:
    class MyData:
        def fingerprint(self) -> str:
            return "v3-2026-11"

    assert fingerprint(MyData()) == fingerprint(MyData())
    with pytest.raises(CkptkitError, match="fingerprint\\(\\) method"):
        fingerprint(object())
