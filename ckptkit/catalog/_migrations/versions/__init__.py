"""One module per schema revision, named ``vNNNN_*.py``; ``revision`` is ``NNNN``."""
