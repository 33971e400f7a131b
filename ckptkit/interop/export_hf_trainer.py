"""Export a checkpoint as an HF ``Trainer`` ``checkpoint-N`` folder that ``Trainer.train(resume_from_checkpoint=...)``
resumes from: the model (``save_pretrained`` files), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state.pth`` and ``trainer_state.json``, plus ``ckptkit.json`` (which checkpoint it came from).

Every ``.pt`` / ``.pth`` file holds tensors and plain containers only (``torch.load(weights_only=True)`` reads it, as
Trainer does; ``rng_state.pth`` also holds numpy's RNG array, which Trainer allowlists). ``transformers`` is imported
only when a folder is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.engine.manifests import model_name
from ckptkit.engine.tensors import load_tensors
from ckptkit.errors import InvalidArgumentError
from ckptkit.format import decode
from ckptkit.interop.export import PROVENANCE
from ckptkit.schema import Component, Manifest
from ckptkit.state import RNG
from ckptkit.state.adapter import get_adapter
from ckptkit.storage import Repository

__all__ = ["TRAINER_STATE", "export_hf_trainer"]

TRAINER_STATE = "trainer_state"
"""Name of the component that holds Trainer's ``TrainerState`` (what ``CkptkitCallback`` saves): written back as
``trainer_state.json``."""

_WEIGHTS_ONLY = "export the weights alone with format='model' (Trainer then starts a fresh optimizer and schedule)"


def _one(m: Manifest, kind: str, what: str, why: str) -> str | None:
    """The only component of ``kind``, None when there is none; refuses several."""
    found = [n for n, c in m.components.items() if c.kind == kind]
    if len(found) > 1:
        raise InvalidArgumentError(f"checkpoint {m.name} holds {len(found)} {what}s {found}; a Trainer checkpoint "
                                   f"holds one ({why}): save one {what} per checkpoint to export it for Trainer, or "
                                   f"{_WEIGHTS_ONLY}")  # fmt: skip
    return found[0] if found else None


def _model_component(m: Manifest, component: str | None) -> tuple[str, Component]:
    comp = model_name(m, component)
    c = m.components[comp]
    if c.adapter != "hf":
        raise InvalidArgumentError(f"component {comp!r} of checkpoint {m.name} is a {c.type} (adapter {c.adapter!r}), "
                                   "not an HF transformers model: a Trainer checkpoint folder needs a "
                                   "PreTrainedModel's config.json and weights (and Trainer's parameter groups of it); "
                                   "export it with format='model'")  # fmt: skip
    return comp, c


def _trainer_groups(meta: Mapping[str, Any], saved: set[str]) -> tuple[list[list[str]], set[str]]:
    """The parameter groups ``Trainer.create_optimizer`` builds for the model ``meta`` describes (decay, then
    no-decay, each in ``named_parameters`` order), restricted to ``saved`` (frozen parameters are in no group); and
    the model's parameter names."""
    import transformers

    from ckptkit.adapters.hf import HFAdapter

    with torch.device("meta"):  # names and module types only: no memory, no initialisation
        skeleton = HFAdapter().rebuild(dict(meta))
    decay = set(transformers.Trainer.get_decay_parameter_names(None, skeleton))  # type: ignore[arg-type]
    names = [n for n, _ in skeleton.named_parameters()]
    return [[n for n in names if n in decay and n in saved], [n for n in names if n not in decay and n in saved]], set(
        names
    )


def _optimizer_file(m: Manifest, comp: str, c: Component, osd: Any, prefix: str) -> dict[str, Any]:
    """The optimizer state keyed by name as Trainer's ``optimizer.pt``: integer ids, numbered group after group in the
    order of Trainer's own parameter groups (so ``optimizer.load_state_dict`` puts each state on its parameter)."""
    if not (isinstance(osd, dict) and isinstance(osd.get("state"), dict) and isinstance(osd.get("param_groups"), list)):
        raise InvalidArgumentError(f"the optimizer of checkpoint {m.name} is not an optimizer state dict: "
                                   f"{_WEIGHTS_ONLY}")
    groups: list[list[str]] = []
    for g in osd["param_groups"]:
        params = g.get("params") if isinstance(g, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise InvalidArgumentError(f"the optimizer of checkpoint {m.name} has a parameter group without parameter "
                                       f"names: {_WEIGHTS_ONLY}")  # fmt: skip
        groups.append(params)
    flat = [n for g in groups for n in g]
    unnamed = [n for n in flat if n.startswith("param_groups[") or not n.startswith(prefix)]
    if unnamed:
        raise InvalidArgumentError(f"the optimizer of checkpoint {m.name} holds parameters that model {comp!r} does "
                                   f"not name ({unnamed[:3]}), so its state cannot be put on Trainer's parameters; "
                                   f"re-import the source with model= to name them, or {_WEIGHTS_ONLY}")  # fmt: skip
    groups = [[n[len(prefix) :] for n in g] for g in groups]
    expected, known = _trainer_groups(c.meta, {n for g in groups for n in g})
    strangers = sorted({n for g in groups for n in g} - known)
    if strangers or groups != expected:
        why = (f"it names parameters {c.meta.get('class')} does not have: {strangers[:3]}" if strangers else
               f"its groups hold {[len(g) for g in groups]} parameters, Trainer's decay / no-decay groups of "
               f"{c.meta.get('class')} hold {[len(g) for g in expected]}")  # fmt: skip
        raise InvalidArgumentError(
            f"the optimizer of checkpoint {m.name} was not built by Trainer.create_optimizer from {comp!r} ({why}): "
            "Trainer's own optimizer would load its state into other parameters. Resume with the optimizer it was "
            "saved with (ckptkit.restore into Trainer(optimizers=(opt, sched))), or " + _WEIGHTS_ONLY
        )
    ids = {n: i for i, n in enumerate(n for g in groups for n in g)}
    state = {ids[n[len(prefix) :]]: s for n, s in osd["state"].items()}
    pgs = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ids[n] for n in names]}
           for g, names in zip(osd["param_groups"], groups, strict=True)]  # fmt: skip
    return {"state": dict(sorted(state.items())), "param_groups": pgs}


def _rng_file(data: Any, issues: list[str]) -> dict[str, Any]:
    """ckptkit's RNG component as Trainer's ``rng_state.pth`` of one process (python, numpy, cpu, cuda)."""
    out: dict[str, Any] = {"python": data["python"], "numpy": data["numpy"], "cpu": data["torch"]}
    cuda = data.get("cuda") or []
    if cuda:
        out["cuda"] = cuda[0]  # a non-distributed Trainer restores torch.cuda.set_rng_state(state): one device
        if len(cuda) > 1:
            issues.append(f"the checkpoint holds the CUDA RNG state of {len(cuda)} devices; a one-process Trainer "
                          "restores one, so device 0's is written")  # fmt: skip
    return out


def _trainer_state(m: Manifest, saved: Any, issues: list[str]) -> dict[str, Any]:
    """``trainer_state.json``: Trainer's saved ``TrainerState`` when the checkpoint has it, else what an import
    recorded, else built from the progress (``global_step`` is what Trainer skips the consumed batches by)."""
    import transformers

    fields = {f.name for f in dataclasses.fields(transformers.TrainerState)}
    if isinstance(saved, dict):
        state = dict(saved)
    elif isinstance(m.hparams.get("hf_trainer_state"), dict):
        state = dict(m.hparams["hf_trainer_state"])  # type: ignore[arg-type]
        issues.append("the Trainer state comes from an imported trainer_state.json (its log history was not kept)")
    else:
        state = {"epoch": float(m.progress.epoch)}
        issues.append(f"the checkpoint holds no Trainer state: trainer_state.json is built from its progress (global "
                      f"step {m.progress.global_step}, epoch {m.progress.epoch}); log history, best metric and "
                      "callback states start empty")  # fmt: skip
    dropped = sorted(k for k in state if k not in fields)
    if dropped:
        issues.append(f"Trainer state fields this transformers does not know were left out: {dropped}")
    state = {k: v for k, v in state.items() if k in fields}
    state["global_step"] = m.progress.global_step
    return state


def export_hf_trainer(
    repo: Repository, manifest: Manifest, dest: str, component: str | None, issues: list[str] | None = None
) -> list[str]:
    """Write checkpoint ``manifest`` as an HF Trainer ``checkpoint-N`` folder ``dest`` (new or empty); returns the
    files written. Called by :func:`ckptkit.interop.export.export` with ``format="hf-trainer"``.

    Everything is read, hash-verified and checked before the first file is written, so a refusal writes nothing.
    A checkpoint without optimizer or LR scheduler state is refused: Trainer would resume it with a fresh optimizer
    and schedule (it loads ``optimizer.pt`` only beside ``scheduler.pt``), which is not a resume. So is an optimizer
    whose parameter groups are not those ``Trainer.create_optimizer`` builds (decay, then no-decay): Trainer's own
    optimizer would put the saved state on other parameters. A checkpoint without RNG state exports without
    ``rng_state.pth`` (random streams then start anew); ``ckptkit.json``'s ``notes`` and ``issues`` say so.

    Args:
        repo: the open repository.
        manifest: the checkpoint.
        dest: the folder to write.
        component: the model component (None: the only one).
        issues: when given, what the resume will not restore exactly is appended to it.

    Raises:
        InvalidArgumentError: the checkpoint lacks what Trainer needs (the message says what, and what to do).

    Example::

        files = ckptkit.export("s3://bucket/run", "./checkpoint-500", "step-00000500", format="hf-trainer")
        trainer.train(resume_from_checkpoint="./checkpoint-500")
    """
    m = manifest
    notes: list[str] = [] if issues is None else issues
    comp, c = _model_component(m, component)
    opt = _one(m, "optimizer", "optimizer", "Trainer trains with one")
    sched = _one(m, "scheduler", "LR scheduler", "Trainer steps one")
    scaler = _one(m, "grad_scaler", "grad scaler", "Trainer's accelerator has one")
    missing = [what for what, n in (("optimizer", opt), ("LR scheduler", sched)) if n is None]
    if opt is None or sched is None:
        raise InvalidArgumentError(
            f"checkpoint {m.name} has no {' and no '.join(missing)} state (it holds {sorted(m.components)}): "
            "Trainer.train(resume_from_checkpoint=...) would silently start a fresh optimizer and LR schedule, which "
            "is not a resume. Save the Trainer's optimizer and scheduler with it (CkptkitCallback does), or "
            + _WEIGHTS_ONLY
        )
    extra = [n for n in (TRAINER_STATE, RNG) if n in m.components]
    wanted = [comp, opt, sched, *([scaler] if scaler else []), *extra]
    tensors = load_tensors(repo, m, wanted)  # reads and hash-verifies every object before anything is written

    def value(n: str) -> Any:
        return decode(m.components[n].state, tensors[n], f"component {n!r} of checkpoint {m.name!r}")

    n_models = sum(1 for x in m.components.values() if x.kind == "model")
    prefix = f"{comp}." if n_models > 1 else ""  # optimizer names are prefixed when a checkpoint has several models
    files: dict[str, Any] = {"optimizer.pt": _optimizer_file(m, comp, c, value(opt), prefix)}
    files["scheduler.pt"] = value(sched)
    if scaler:
        files["scaler.pt"] = value(scaler)
    if RNG in m.components:
        files["rng_state.pth"] = _rng_file(value(RNG), notes)
    else:
        notes.append("the checkpoint holds no RNG state: no rng_state.pth, so dropout and other random streams start "
                     "anew")  # fmt: skip
    state = _trainer_state(m, value(TRAINER_STATE) if TRAINER_STATE in m.components else None, notes)
    written = get_adapter("hf").export(tensors[comp], dict(c.meta), dest)  # save_pretrained, by transformers
    for n, other in m.components.items():
        if other.type == "ckptkit.adapters.hf.Tokenizer":  # saved with the model: Trainer's processing_class files
            from ckptkit.adapters.hf import write_files

            written += write_files(decode(other.state, load_tensors(repo, m, [n])[n], n), dest)
    for fname, data in files.items():
        path = os.path.join(dest, fname)
        torch.save(data, path)
        written.append(path)
    path = os.path.join(dest, "trainer_state.json")
    with open(path, "w") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")  # as TrainerState.save_to_json writes it
    written.append(path)
    prov = os.path.join(dest, PROVENANCE)
    with open(prov, "w") as f:
        json.dump({"checkpoint": m.id, "name": m.name, "url": repo.url, "component": comp, "adapter": c.adapter,
                   "format": "hf-trainer", "notes": notes}, f, indent=2)  # fmt: skip
    return [*written, prov]
