"""The ``ckptkit`` command line (entry point :func:`run`)."""

import os

# pydantic looks up plugins through importlib.metadata the first time a model is built (about 50 ms at every
# start); the command has no use for them.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from ckptkit.cli.main import main, run

__all__ = ["main", "run"]
