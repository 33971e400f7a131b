"""The internal engine: manifest scan, commit, tensor load, object checks, restore, verify and gc.

Every feature module (the manager, interop, history, the CLI) goes through these functions; the public facade
over them is :mod:`ckptkit.api`. Not public API: names here may change between releases.

:mod:`ckptkit.engine.manifests` imports no torch (the CLI's listing verbs use it alone); importing this package
imports nothing else.
"""

__all__: list[str] = []
