"""Transfer weights to a new task with a per-tensor plan: what was loaded, re-initialised, missing or unused.

Example:
    >>> import torch, ckptkit
    >>> src = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))   # 3 classes
    >>> _ = ckptkit.save("memory://doc-transfer", {"model": src}, "base")
    >>> dst = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))   # regression
    >>> plan = ckptkit.transfer("memory://doc-transfer", dst, name="base")
    >>> plan.counts()
    {'loaded': 2, 'reinit_shape': 2}
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ckptkit.engine.manifests import RepoLike, latest_manifest, model_name, open_repository
from ckptkit.engine.provenance import Origin, add_origin
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import AdapterError, InvalidArgumentError, SourceFormatError, StateMismatchError
from ckptkit.schema import Manifest, Parent
from ckptkit.state.adapter import ModelAdapter, find_adapter, get_adapter
from ckptkit.state.files import read_tensor_file

__all__ = ["Action", "Source", "TensorPlan", "TransferPlan", "fresh_model", "map_key", "read_source", "transfer"]

log = logging.getLogger("ckptkit")

Action = Literal["loaded", "reinit_shape", "reinit_head", "missing", "excluded"]


@dataclass(frozen=True)
class TensorPlan:
    """What happened to one tensor of the target model."""

    action: Action
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] = ()


@dataclass
class TransferPlan:
    """The per-tensor outcome of a transfer, recorded in the lineage of the next checkpoint.

    Attributes:
        tensors: target key -> :class:`TensorPlan`.
        unused: source keys no target tensor took.
        source: where the weights came from (repository URL and checkpoint, or a path).
        source_id: the source checkpoint's id (None for a folder or file).
        warnings: what the caller should know (e.g. forgetting of the old task).
    """

    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    source: str = ""
    source_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    source_name: str | None = None
    source_url: str | None = None

    def keys(self, action: Action) -> list[str]:
        """Target keys with this action."""
        return [k for k, p in self.tensors.items() if p.action == action]

    def counts(self) -> dict[str, int]:
        """How many tensors took each action."""
        out: dict[str, int] = {}
        for p in self.tensors.values():
            out[p.action] = out.get(p.action, 0) + 1
        if self.unused:
            out["unused"] = len(self.unused)
        return out

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON for the lineage: counts plus every tensor that was not simply loaded."""
        return {
            "source": self.source, "counts": self.counts(),
            "tensors": {k: {"action": p.action, "source": p.source,
                            "source_shape": list(p.source_shape) if p.source_shape else None,
                            "target_shape": list(p.target_shape)}
                        for k, p in self.tensors.items()},
            "unused": self.unused,
        }  # fmt: skip

    def __str__(self) -> str:
        parts = [f"{n} {a}" for a, n in self.counts().items()]
        lines = [f"transfer from {self.source}: " + ", ".join(parts)]
        for action in ("reinit_shape", "reinit_head", "missing"):
            keys = self.keys(action)
            if keys:
                lines.append(f"  {action}: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = pattern.split("{}")
    return re.compile("(.+?)".join(re.escape(p) for p in parts))


def map_key(key: str, key_map: Mapping[str, str]) -> str | None:
    """The source key for target ``key`` under a declarative map (``{"text.{}": "bert.{}"}``; ``{}``
    captures any text, filled into the source pattern in order). None when no pattern matches."""
    for target_pat, source_pat in key_map.items():
        m = _compile(target_pat).fullmatch(key)
        if m:
            if source_pat.count("{}") != len(m.groups()):
                raise InvalidArgumentError(f"key_map {target_pat!r} -> {source_pat!r}: both sides need the same number "
                                           "of {}")
            out = source_pat
            for g in m.groups():
                out = out.replace("{}", g, 1)
            return out
    return None


@dataclass
class Source:
    """Weights to transfer from: tensors plus, when known, the adapter and metadata that produced them."""

    tensors: dict[str, torch.Tensor]
    label: str
    adapter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
    url: str | None = None
    checkpoint_id: str | None = None  # the checkpoint an exported folder came from (its ckptkit.json)


def read_source(
    source: RepoLike,
    name: str | None = None,
    component: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Source:
    """Load weights from a checkpoint repository (``name``, default latest: a URL, a local path or an open
    :class:`~ckptkit.storage.Repository`), an exported folder (HF ``save_pretrained``, timm or ckptkit export) or a
    weights file (a path, ``str`` or ``os.PathLike``).

    Raises:
        ArgumentTypeError: ``source`` is none of those types.
    """
    path = os.fspath(source) if isinstance(source, os.PathLike) else source  # an open Repository stays one
    if isinstance(path, str) and os.path.isfile(path):
        return Source(read_tensor_file(path), path)
    if isinstance(path, str) and os.path.isdir(path) and not os.path.isdir(os.path.join(path, "checkpoints")):
        return _read_folder(path)
    r = open_repository(path, storage_options, param="source")
    m = latest_manifest(r, name)
    comp = model_name(m, component)
    tensors = dict(load_tensors(r, m, [comp])[comp])
    c = m.components[comp]
    for alias, target in c.aliases.items():
        tensors[alias] = tensors[target]
    return Source(tensors, f"{r.url} {m.name}:{comp}", c.adapter, dict(c.meta), m, r.url)


def _read_folder(folder: str) -> Source:
    checkpoint_id = None
    prov = os.path.join(folder, "ckptkit.json")
    if os.path.isfile(prov):
        try:
            with open(prov) as fh:
                found = json.load(fh).get("checkpoint")
            checkpoint_id = found if isinstance(found, str) and re.fullmatch(r"[0-9a-f]{64}", found) else None
        except (OSError, ValueError, AttributeError):
            checkpoint_id = None  # unreadable provenance: the folder is still a valid source, just unlinked
    for f in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        path = os.path.join(folder, f)
        if os.path.isfile(path):
            return Source(read_tensor_file(path), folder, checkpoint_id=checkpoint_id)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if shards:
        tensors: dict[str, torch.Tensor] = {}
        for f in shards:
            tensors.update(read_tensor_file(os.path.join(folder, f)))
        return Source(tensors, folder, checkpoint_id=checkpoint_id)
    raise SourceFormatError(f"{folder} holds no weights file (model.safetensors, pytorch_model.bin, model.pth, or "
                            "*.safetensors shards): point at the folder save_pretrained or ckptkit export wrote")


def transfer(
    source: RepoLike,
    model: torch.nn.Module,
    *,
    name: str | None = None,
    component: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    key_map: Mapping[str, str] | None = None,
    reset_heads: bool = False,
    strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> TransferPlan:
    """Load what fits from ``source`` into ``model``; leave the rest as the model initialised it.

    Args:
        source: a repository: URL, local path or open Repository (with ``name``, default the latest, and
            ``component`` when it holds several models); or an exported folder or a weights file (a local path).
        include, exclude: globs on target keys (``"encoder.*"``); excluded tensors keep their fresh values.
        key_map: declarative target -> source key patterns, ``{}`` capturing (``{"text.{}": "{}"}``).
        reset_heads: re-initialise the task heads the model's adapter names (timm's classifier, an HF
            classifier, a detector's class predictor) even where shapes match.
        strict: raise :class:`StateMismatchError` unless every included target tensor is loaded.

    Returns:
        The per-tensor :class:`TransferPlan`. The next save of ``model`` (into any repository, by any API, also
        one created after this call) records lineage ``transfer`` with this plan and the source's data segments;
        several transfers into one model before a save (the branches of a fusion model) become several parents.
    """
    src = read_source(source, name, component, storage_options)
    adapter: ModelAdapter = find_adapter(model)
    live, _ = adapter.capture(model)
    heads = adapter.heads(model) if reset_heads else []
    plan = TransferPlan(source=src.label, source_id=src.manifest.id if src.manifest else src.checkpoint_id)
    plan.source_name = src.manifest.name if src.manifest else None
    plan.source_url = src.url
    used: set[str] = set()
    load: dict[str, torch.Tensor] = {}
    for key, t in live.items():
        shape = tuple(t.shape)
        if (include and not any(fnmatch.fnmatchcase(key, g) for g in include)) or (
            exclude and any(fnmatch.fnmatchcase(key, g) for g in exclude)
        ):
            plan.tensors[key] = TensorPlan("excluded", target_shape=shape)
            continue
        skey = map_key(key, key_map) if key_map else key
        if skey is None or skey not in src.tensors:
            plan.tensors[key] = TensorPlan("missing", skey, target_shape=shape)
            continue
        used.add(skey)
        sshape = tuple(src.tensors[skey].shape)
        if any(key == h or key.startswith(h + ".") for h in heads):
            plan.tensors[key] = TensorPlan("reinit_head", skey, sshape, shape)
        elif sshape != shape:
            plan.tensors[key] = TensorPlan("reinit_shape", skey, sshape, shape)
        else:
            plan.tensors[key] = TensorPlan("loaded", skey, sshape, shape)
            load[key] = src.tensors[skey]
    plan.unused = sorted(k for k in src.tensors if k not in used)
    not_loaded = [k for k, p in plan.tensors.items() if p.action in ("missing", "reinit_shape", "reinit_head")]
    if strict and not_loaded:
        raise StateMismatchError("transfer", plan, "pass strict=False to keep fresh values where nothing fits")
    if not load:
        raise StateMismatchError("transfer", plan, "no tensor matched: check key_map, include/exclude and component")
    adapter.restore(model, load)
    reinit = [k for k in not_loaded if plan.tensors[k].action != "missing"]
    if reinit or heads:
        plan.warnings.append(
            f"{len(load)} tensors reused from {src.label} will now be trained on a new task: what they learned for "
            "the old task will be partly forgotten (catastrophic forgetting); keep the source checkpoint, and "
            "evaluate on the old task if it still matters"
        )
    log.info("%s", plan)
    _record(model, plan, src)
    return plan


def _record(model: torch.nn.Module, plan: TransferPlan, src: Source) -> None:
    """The next save of ``model`` records this transfer: a ``transfer`` parent with the plan (or, for files and
    folders that are no checkpoint, the plan as its source), and the data the loaded tensors were trained on."""
    changes: dict[str, Any] = {"plan": plan.to_json(), "warnings": list(plan.warnings)}
    if src.manifest is not None:
        changes["source_data"] = [seg.model_dump(mode="json") for seg in src.manifest.data]
    if plan.source_id is not None:
        parent = Parent(id=plan.source_id, relation="transfer", name=plan.source_name, changes=changes)
        add_origin(model, Origin("transfer", (parent,), plan.source_url))
    else:
        add_origin(model, Origin("transfer", source={"transfers": [{"path": plan.source, **changes}]}))


def fresh_model(manifest: Manifest, component: str = "model") -> torch.nn.Module:
    """A model rebuilt from a checkpoint's recorded metadata (HF models), for export without training code."""
    c = manifest.components[component]
    adapter: Any = get_adapter(c.adapter or "plain")
    if not hasattr(adapter, "rebuild"):
        raise AdapterError(f"the {adapter.name} adapter cannot rebuild a model from metadata alone: build the model "
                           "in code and pass it")
    model: torch.nn.Module = adapter.rebuild(c.meta)
    return model
