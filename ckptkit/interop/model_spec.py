"""Models named on the command line: ``--model timm:resnet18``, ``--model hf:./config-dir``,
``--model torchvision:fasterrcnn_resnet50_fpn``, ``--model pkg.module:factory``, each optionally followed by
``,key=value`` arguments (values read as JSON, else as strings). The model is built with fresh weights (no
download): it only names parameters and checks shapes; its weights are neither read nor changed.

Example:
    >>> model = build_model("torchvision:resnet18,num_classes=3")
    >>> model.fc.out_features
    3
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

from ckptkit.errors import ArgumentTypeError, InvalidArgumentError, MissingDependencyError

__all__ = ["KINDS", "build_model", "parse_spec"]

KINDS = ("timm", "hf", "torchvision", "module")
"""What a spec's prefix may be; ``pkg.module:factory`` (any dotted module path) calls ``factory(**kwargs)``."""

_USAGE = ("use timm:NAME, hf:CONFIG_DIR, torchvision:NAME or pkg.module:factory, each optionally followed by "
          ",key=value arguments (e.g. timm:resnet18,num_classes=10)")  # fmt: skip


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``spec`` as (kind, target, keyword arguments).

    Example:
        >>> parse_spec("timm:resnet18,num_classes=10,drop_rate=0.1")
        ('timm', 'resnet18', {'num_classes': 10, 'drop_rate': 0.1})
    """
    if not isinstance(spec, str):
        raise ArgumentTypeError(f"a model spec is a string ({_USAGE}), got {type(spec).__name__}")
    head, _, rest = spec.partition(",")
    prefix, sep, target = head.partition(":")
    if not sep or not prefix or not target:
        raise InvalidArgumentError(f"model spec {spec!r}: {_USAGE}")
    kind = prefix if prefix in ("timm", "hf", "torchvision") else "module"
    if kind == "module" and not all(part.isidentifier() for part in prefix.split(".")):
        raise InvalidArgumentError(f"model spec {spec!r}: {prefix!r} is neither timm, hf, torchvision nor a dotted "
                                   f"module path; {_USAGE}")  # fmt: skip
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise InvalidArgumentError(f"model spec {spec!r}: argument {item!r} is not key=value")
        try:
            kwargs[key.strip()] = json.loads(raw)
        except ValueError:
            kwargs[key.strip()] = raw
    return kind, target if kind != "module" else f"{prefix}:{target}", kwargs


def build_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names, with fresh weights (nothing is downloaded).

    Raises:
        InvalidArgumentError: the spec is malformed, or names no model.
        MissingDependencyError: the library it names (timm, transformers, torchvision) is not installed.
    """
    kind, target, kwargs = parse_spec(spec)
    try:
        if kind == "timm":
            timm = _need("timm", spec)
            if not timm.is_model(target):
                raise InvalidArgumentError(f"model spec {spec!r}: timm has no model {target!r} "
                                           "(timm.list_models() lists them)")  # fmt: skip
            model = timm.create_model(target, pretrained=False, **kwargs)
        elif kind == "torchvision":
            models = _need("torchvision", spec).models
            if target not in models.list_models():
                raise InvalidArgumentError(f"model spec {spec!r}: torchvision has no model {target!r} "
                                           "(torchvision.models.list_models() lists them)")  # fmt: skip
            builder = models.get_model_builder(target)
            extra = {"weights_backbone": None} if "weights_backbone" in _params(builder) else {}
            model = models.get_model(target, weights=None, **extra, **kwargs)
        elif kind == "hf":
            model = _hf(target, spec, kwargs)
        else:
            module, _, name = target.partition(":")
            factory = getattr(importlib.import_module(module), name, None)
            if not callable(factory):
                raise InvalidArgumentError(f"model spec {spec!r}: {module} has no callable {name!r}")
            model = factory(**kwargs)
    except TypeError as err:  # an argument the builder does not take
        raise InvalidArgumentError(f"model spec {spec!r}: {err}") from err
    except ModuleNotFoundError as err:
        raise InvalidArgumentError(f"model spec {spec!r}: cannot import {err.name!r}") from err
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model spec {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _need(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependencyError(f"model spec {spec!r} needs {name}: pip install {name}") from err


def _params(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _hf(folder: str, spec: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    transformers = _need("transformers", spec)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InvalidArgumentError(f"model spec {spec!r}: {folder} holds no config.json (hf: takes a folder with "
                                   "the model's config, as save_pretrained writes it)")  # fmt: skip
    config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise InvalidArgumentError(f"model spec {spec!r}: the config names no model class transformers has "
                                   f"(architectures={names})")  # fmt: skip
    model: torch.nn.Module = cls(config)
    return model
