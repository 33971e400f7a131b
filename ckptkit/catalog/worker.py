"""``python -m ckptkit.catalog.worker``: a worker process of :func:`ckptkit.catalog.pool.index_many`."""

from ckptkit.catalog.pool import serve

__all__: list[str] = []

if __name__ == "__main__":
    serve()
