"""Shared fixtures: every repository-level test runs on each storage backend through the same code path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BACKENDS = ["local", "memory"]
collect_ignore_glob = ["golden/*"]  # scripts and data, not tests (loaded by test_schema.py)


@pytest.fixture(params=BACKENDS)
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty repository URL on each backend (the S3 suite adds its own backend)."""
    if request.param == "local":
        yield str(tmp_path / "repo")
    else:
        url = f"memory://ckptkit-test-{uuid.uuid4().hex}"
        yield url
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory://")):
            fs.rm(url.removeprefix("memory://"), recursive=True)
