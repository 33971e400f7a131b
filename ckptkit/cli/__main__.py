"""``python -m ckptkit.cli``: the same as the ``ckptkit`` command."""

from ckptkit.cli.main import run

run()
