"""History: lineage walks across repositories, rendering, chain verification, diff, copy and the audit report.

``ckptkit.history.graph`` and ``ckptkit.history.render`` import no torch (``ckptkit log`` and ``lineage`` use
them alone); importing this package imports nothing else.
"""

__all__: list[str] = []
