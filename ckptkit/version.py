"""The installed ckptkit's version (floor: imported by the manifest's environment record and the CLI)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
