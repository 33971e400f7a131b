"""Fuzzing restore with hostile manifests that pass the id check.

A real checkpoint (model with tied weights, AdamW, StepLR, a plain value, process RNG) is saved once; each example
rewrites its manifest with a few random edits to the components (values replaced by random typed JSON, keys deleted
or added, values swapped, aliases and tensor references pointed elsewhere), recomputes the id so the hostile content
reaches restore, and restores it into live objects. Whatever the edit, only ckptkit errors may escape, and when
restore fails the live model, optimizer, scheduler and process RNG must be bit-identical to before.

``CKPTKIT_FUZZ_EXAMPLES=2000`` fuzzes deeper locally; the default keeps the test well under a minute.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tied_model import Tied, same_bits, trained

import ckptkit
from ckptkit.errors import CkptkitError
from ckptkit.schema import canonical_json, manifest_id


def _trained(seed: int, lr: float) -> tuple[Tied, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    return trained(seed, lr, with_buffer=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz-restore") / "repo"
    model, opt, sched = _trained(0, 1e-2)
    info = {"tag": np.float32(0.5), "pair": (1, 2), 3: "three", "ids": {4, 5}, "raw": b"\x00\x01",
            "dtype": torch.float16}  # fmt: skip
    ckptkit.save(str(root), {"model": model, "optimizer": opt, "scheduler": sched, "info": info}, "base")
    return root, json.loads((root / "checkpoints" / "base.json").read_bytes())


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "scheduler": copy.deepcopy(sched.state_dict()),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


# --- hostile edits ------------------------------------------------------------------------------------------

NP_TYPES = ["<f4", "<f2", "<f8", "|i1", "<i8", "<u8", "|b1", "<U3", "|S2", "V100000000", "|O", "<c8", "<M8[s]",
            "(1000000000,)i4", "i4,i4", "<f16", "", "nope"]  # fmt: skip
NUMBERS = st.sampled_from([0, 1, -1, 3, 624, 2**31, 2**63, 2**64, 2**80, -(2**70), 10**30, 0.5, 1e300, -1e-300])


def _typed(inner: st.SearchStrategy[Any], keys: list[str]) -> st.SearchStrategy[Any]:
    """Typed-JSON tags (well formed or not) wrapped around ``inner`` values."""
    return st.one_of(
        st.builds(lambda k, np_: {"$tensor": k, "numpy": np_} if np_ is not None else {"$tensor": k},
                  st.sampled_from(keys) | inner, st.none() | st.booleans() | inner),
        st.builds(lambda t, v: {"$np": t, "value": v}, st.sampled_from(NP_TYPES) | inner, NUMBERS | inner),
        st.builds(lambda b: {"$dict": b}, st.lists(st.lists(inner, min_size=1, max_size=3), max_size=3) | inner),
        st.builds(lambda b: {"$tuple": b}, st.lists(inner, max_size=4) | inner),
        st.builds(lambda b: {"$set": b}, st.lists(inner, max_size=3) | inner),
        st.builds(lambda b: {"$float": b}, st.sampled_from(["nan", "inf", "-inf", "1.5", ""]) | inner),
        st.builds(lambda b: {"$bytes": b}, st.sampled_from(["AAE=", "!!", ""]) | inner),
        st.builds(lambda b: {"$dtype": b}, st.sampled_from(["float32", "onnx", "manual_seed", "qint8"]) | inner),
    )


def _values(keys: list[str]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | NUMBERS | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
        | st.text(max_size=8) | st.sampled_from(keys)  # fmt: skip
    nested = st.integers(1, 250).map(_deep)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6) | st.sampled_from(keys), inner, max_size=4) | _typed(inner, keys), max_leaves=10) | nested


def _deep(n: int) -> Any:
    v: Any = 0
    for _ in range(n):
        v = [v]
    return v


def _locations(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    items = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
    for k, v in items:
        out.append((node, k))
        _locations(v, out)
    return out


@st.composite
def hostile(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    comps = data["components"]
    keys = sorted({k for c in comps.values() for k in c["tensors"]}) + sorted(
        {ref["key"] for c in comps.values() for ref in c["tensors"].values()})  # fmt: skip
    values = _values(keys)
    for _ in range(draw(st.integers(1, 3))):
        comp = comps[draw(st.sampled_from(sorted(comps)))]
        locs = _locations(comp, [])
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "swap", "alias", "retarget"]))
        if op == "alias":
            names = [*sorted(comp["tensors"]), "nope", "x"]
            comp["aliases"][draw(st.sampled_from(names))] = draw(st.sampled_from(names))
        elif op == "retarget" and comp["tensors"]:  # a tensor reference to another key or object of the repository
            ref = comp["tensors"][draw(st.sampled_from(sorted(comp["tensors"])))]
            other = draw(st.sampled_from([r for c in comps.values() for r in c["tensors"].values()]))
            field = draw(st.sampled_from(["key", "object", "dtype", "shape"]))
            ref[field] = other[field] if field != "dtype" else draw(st.sampled_from(["F32", "F16", "I64", "U8"]))
        elif not locs:
            continue
        else:
            parent, key = draw(st.sampled_from(locs))
            if op == "replace":
                parent[key] = draw(values)
            elif op == "delete":
                del parent[key]
            elif op == "swap":
                other_parent, other_key = draw(st.sampled_from(locs))
                with_value = other_parent[other_key]
                parent[key] = copy.deepcopy(with_value)
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=6) | st.sampled_from(keys))] = draw(values)
            else:
                parent.append(draw(values))
    return data


FUZZ = settings(max_examples=int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fmt: skip
_names = (f"fuzz-{i}" for i in itertools.count())


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.data(), strict=st.booleans())
def test_fuzzed_manifest_restores_or_fails_typed_and_changes_nothing(
    saved: tuple[Path, dict[str, Any]], data: st.DataObject, strict: bool
) -> None:
    root, base = saved
    forged = data.draw(hostile(base))
    name = next(_names)
    forged["name"] = name
    try:
        forged["id"] = manifest_id({k: v for k, v in forged.items() if k != "id"})
        raw = canonical_json(forged)
    except (ValueError, RecursionError):  # not canonical JSON (a lone surrogate ...): cannot even be committed
        return
    (root / "checkpoints" / f"{name}.json").write_bytes(raw)
    model, opt, sched = _trained(7, 3e-3)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = _snapshot(model, opt, sched)
    try:
        result = ckptkit.restore(str(root), {"model": model, "optimizer": opt, "scheduler": sched}, name,
                                 strict=strict)  # fmt: skip
    except CkptkitError as err:
        event(f"refused: {type(err).__name__}" + (" (reading the manifest)" if f"{name}.json" in str(err) else ""))
        assert str(err)
        after = _snapshot(model, opt, sched)
        assert same_bits(after, before), f"a restore that failed ({type(err).__name__}: {err}) changed the live objects"
        assert model.dec.weight is model.enc.weight
        return
    except Exception as err:
        pytest.fail(f"restore raised an untyped {type(err).__name__}: {err}")
    event("restored")
    assert result.manifest.name == name


def test_fuzz_base_restores(saved: tuple[Path, dict[str, Any]]) -> None:
    """The fuzzed manifests start from one that restores exactly."""
    root, _ = saved
    model, opt, sched = _trained(7, 3e-3)
    result = ckptkit.restore(str(root), {"model": model, "optimizer": opt, "scheduler": sched}, "base")
    expected, _, _ = _trained(0, 1e-2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert result.values["info"]["pair"] == (1, 2)
