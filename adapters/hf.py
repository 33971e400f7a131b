"""HF transformers models (text models, and the DETR / RT-DETR / YOLOS object-detection families).

Records the config and model class, so a checkpoint can be exported as a folder that
``AutoModel*.from_pretrained(folder)`` loads, without the training code.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from pydantic import JsonValue

from ckptkit.errors import AdapterError, InvalidArgumentError, ManifestError, StateMismatchError

__all__ = ["HFAdapter", "Tokenizer", "write_files"]

_HEAD_NAMES = ("classifier", "score", "qa_outputs", "class_labels_classifier")


def _is_hf(model: torch.nn.Module) -> bool:
    mro = type(model).__mro__
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in mro)


class HFAdapter:
    """``transformers.PreTrainedModel``: the state dict plus the config and the model class."""

    name = "hf"

    def can_handle(self, model: torch.nn.Module) -> bool:
        return _is_hf(model)  # checks the class hierarchy by name: transformers is not imported here

    def capture(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, JsonValue]]:
        config: Any = getattr(model, "config")  # noqa: B009 - PreTrainedModel always has one
        import transformers

        meta: dict[str, JsonValue] = {
            "framework": "transformers",
            "transformers_version": transformers.__version__,
            "class": type(model).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)),
        }
        if getattr(config, "id2label", None):
            meta["labels"] = {str(k): str(v) for k, v in config.id2label.items()}
        return dict(model.state_dict()), meta

    def restore(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=False)

    def heads(self, model: torch.nn.Module) -> list[str]:
        """Task heads: the usual head modules, and any layer whose output size is the label count (a detection
        model's class heads), never the box regression heads."""
        config: Any = getattr(model, "config", None)
        labels = int(getattr(config, "num_labels", 0) or 0)
        sizes = {labels, labels + 1} if labels else set()
        found: list[str] = []
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            by_name = leaf in _HEAD_NAMES and type(model).__name__ != type(mod).__name__
            by_size = (isinstance(mod, torch.nn.Linear) and mod.out_features in sizes) or (
                isinstance(mod, torch.nn.Embedding) and mod.num_embeddings in sizes and "class" in leaf
            )  # an embedding counts only as a class embedding (RT-DETR's denoising_class_embed), not token types
            is_box = "bbox" in name or "box" in leaf  # box regression: 4 outputs whatever the labels
            head = name and not is_box and (by_name or (by_size and "For" in type(model).__name__))
            if head and not any(name.startswith(f + ".") for f in found):
                found.append(name)
        return found

    def rebuild(self, meta: dict[str, JsonValue]) -> torch.nn.Module:
        """The model class built from the recorded config, with fresh weights (to load a checkpoint into)."""
        import transformers

        cfg: dict[str, Any] = dict(meta["config"])  # type: ignore[arg-type]
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        cls = getattr(transformers, str(meta["class"]), None)
        if cls is None:
            raise AdapterError(f"transformers {transformers.__version__} has no class {meta['class']!r}: install the "
                               "transformers version the checkpoint was saved with")
        return cls(config)  # type: ignore[no-any-return]

    def export(self, tensors: dict[str, torch.Tensor], meta: dict[str, JsonValue], dest: str) -> list[str]:
        """A ``save_pretrained`` folder written by transformers itself (config.json + model.safetensors)."""
        model: Any = self.rebuild(meta)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        really_missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
        if really_missing or unexpected:
            raise StateMismatchError(
                str(meta["class"]), f"missing {really_missing[:5]}, unexpected {list(unexpected)[:5]}",
                "export the component the checkpoint saved with this model class",
            )
        os.makedirs(dest, exist_ok=True)
        model.save_pretrained(dest)
        return sorted(os.path.join(dest, f) for f in os.listdir(dest))


class Tokenizer:
    """A tokenizer or processor saved with the checkpoint, as the files its ``save_pretrained`` writes.

    Pass it as a component: ``{"model": model, "tokenizer": Tokenizer(tok)}``. A restore loads it back with
    ``AutoTokenizer`` (or ``AutoProcessor`` for a processor) into ``.tokenizer``; ``ckptkit.interop.export`` writes the
    files beside the exported model, so ``from_pretrained(folder)`` finds both.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def state_dict(self) -> dict[str, Any]:
        if self.tokenizer is None:
            raise InvalidArgumentError("Tokenizer() holds no tokenizer to save: pass one, Tokenizer(tok)")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            files = {}
            for f in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, f), "rb") as fh:
                    files[f] = fh.read()
        kind = "processor" if "Processor" in type(self.tokenizer).__name__ else "tokenizer"
        return {"kind": kind, "class": type(self.tokenizer).__name__, "files": files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import tempfile

        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            write_files(state, tmp)
            auto = transformers.AutoProcessor if state.get("kind") == "processor" else transformers.AutoTokenizer
            self.tokenizer = auto.from_pretrained(tmp)


def write_files(state: dict[str, Any], dest: str) -> list[str]:
    """Write a saved tokenizer's files into ``dest``; names come from storage, so only plain file names pass."""
    files = state.get("files")
    if not isinstance(files, dict):
        raise ManifestError("tokenizer", "its state holds no files")
    written = []
    os.makedirs(dest, exist_ok=True)
    for name, data in files.items():
        if not isinstance(name, str) or name != os.path.basename(name) or name.startswith(".") or not name:
            raise ManifestError("tokenizer", f"refusing file name {str(name)[:80]!r} from the checkpoint (not a plain "
                                "file name)")
        if not isinstance(data, bytes):
            raise ManifestError("tokenizer", f"file {name!r} holds {type(data).__name__}, not bytes")
        path = os.path.join(dest, name)
        with open(path, "wb") as fh:
            fh.write(data)
        written.append(path)
    return written
