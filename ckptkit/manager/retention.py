"""Retention: which checkpoints of a run to keep. Rules compose; the manager applies them after each save."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ckptkit.errors import InvalidArgumentError
from ckptkit.schema import Manifest

__all__ = ["Retention"]


@dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep. Rules compose: a checkpoint survives if any rule keeps it.

    The newest checkpoint and the one the run restored from are always kept.

    Args:
        keep_last: the N most recent checkpoints.
        keep_best: the K best by ``metric`` (``mode="min"`` for a loss, ``"max"`` for an accuracy).
        keep_every: checkpoints whose global step is a multiple of N (milestones).

    Example:
        >>> Retention(keep_last=3, keep_best=2, metric="val_loss", mode="min", keep_every=1000)
        Retention(keep_last=3, keep_best=2, metric='val_loss', mode='min', keep_every=1000)
    """

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for field_name in ("keep_last", "keep_best", "keep_every"):
            v = getattr(self, field_name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InvalidArgumentError(f"Retention({field_name}={v!r}): must be a positive integer or None")
        if self.keep_best is not None and not self.metric:
            raise InvalidArgumentError("Retention(keep_best=...) needs metric='<name of a metric passed to save()>'")
        if self.metric is not None and self.keep_best is None:
            raise InvalidArgumentError(f"Retention(metric={self.metric!r}) has no effect without keep_best=K")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"Retention(mode={self.mode!r}): use 'min' (lower is better) or 'max'")
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            raise InvalidArgumentError("Retention() keeps nothing extra: set keep_last, keep_best or keep_every")

    def keep(self, manifests: list[Manifest]) -> set[str]:
        """Names of the checkpoints these rules keep (``manifests`` oldest first)."""
        kept: set[str] = set()
        if self.keep_last:
            kept.update(m.name for m in manifests[-self.keep_last :])
        if self.keep_every:
            kept.update(m.name for m in manifests if m.progress.global_step % self.keep_every == 0)
        if self.keep_best and self.metric:
            scored = [m for m in manifests if _score(m, self.metric) is not None]
            sign = 1.0 if self.mode == "min" else -1.0
            scored.sort(key=lambda m: (sign * (_score(m, self.metric) or 0.0), -m.progress.global_step))
            kept.update(m.name for m in scored[: self.keep_best])
        return kept

    def best(self, manifests: list[Manifest]) -> Manifest | None:
        """The best checkpoint by ``metric`` (None without a metric rule or any scored checkpoint)."""
        if not self.metric:
            return None
        scored = [m for m in manifests if _score(m, self.metric) is not None]
        if not scored:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(scored, key=lambda m: (sign * (_score(m, self.metric) or 0.0), -m.progress.global_step))


def _score(m: Manifest, metric: str | None) -> float | None:
    v = m.metrics.get(metric or "")
    return None if v is None or math.isnan(v) else v
