"""The run's lineage: which edge the next checkpoint records.

Decided on the caller's thread, when ``save`` is called: a restore, continue, transfer or import sets the edge;
each save records it and moves the run on to ``train``, whose parent is the checkpoint that save commits. With
async save the parent's id is known only once the background commit is done, so it is taken from the last
committed manifest when the *next* save is called (which waits for the one in flight first). The background
writer never touches lineage: a ``transfer_from`` called while a save is being written keeps its edge.
"""

from __future__ import annotations

from typing import Any

from ckptkit.schema import Lineage, Manifest, Parent, Relation

__all__ = ["RunLineage", "jsonable"]


class RunLineage:
    """The lineage edge of a run's next checkpoint.

    Example:
        >>> run = RunLineage("0" * 32)
        >>> run.edge(None).relation
        'init'
        >>> run.saved()
        >>> run.relation
        'train'
    """

    def __init__(self, run: str) -> None:
        self.run = run
        self.relation: Relation = "init"
        self.parents: list[Parent] = []
        self.source: dict[str, Any] | None = None
        self._follows_last = False  # True after a save: the next edge is `train` from the last committed one

    def set(self, relation: Relation, parents: list[Parent], source: dict[str, Any] | None = None) -> None:
        """The next checkpoint starts from these parents (a restore, continue, transfer or import)."""
        self.relation, self.parents, self.source = relation, list(parents), source
        self._follows_last = False

    def saved(self) -> None:
        """A save was made (or submitted): the next checkpoint continues this run's training from it."""
        self.relation, self.parents, self.source = "train", [], None
        self._follows_last = True

    def edge(self, last: Manifest | None) -> Lineage:
        """The lineage the next checkpoint records; ``last`` is the run's last committed manifest."""
        if self._follows_last:
            parents = [Parent(id=last.id, relation="train", name=last.name)] if last is not None else []
            return Lineage(relation="train", parents=parents, run=self.run)
        return Lineage(relation=self.relation, parents=self.parents, run=self.run, source=self.source)


def jsonable(value: Any) -> Any:
    """``value`` as JSON-able data for a lineage edge's ``changes`` (anything else becomes its ``repr``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
