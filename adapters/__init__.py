"""Model adapters, imported as ``ckptkit.adapters`` (never as a top-level ``adapters`` package).

Each adapter module imports its framework only when it is used; see :mod:`ckptkit.state.adapter` for the protocol.
"""

__all__: list[str] = []
