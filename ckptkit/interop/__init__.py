"""Interop with other tools: import foreign checkpoints, export to frameworks' formats, transfer weights."""

__all__: list[str] = []
