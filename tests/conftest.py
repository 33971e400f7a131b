"""Shared fixtures: every repository-level test runs on each storage backend through the same code path.

Backends: ``local`` (a temporary directory), ``memory`` (fsspec's in-memory filesystem) and ``s3``: a real
S3-compatible server (Ceph's RADOS Gateway on loopback, started once per session by tests/s3server.py). For
``s3`` the fixture yields a plain ``s3://bucket/prefix`` URL; the endpoint and credentials reach s3fs through
fsspec's configuration (``fsspec.config.conf["s3"]``, defaults for every S3 filesystem created in this session),
so tests use the URL exactly as they use a local path.

Without Ceph installed the S3 tests are skipped with the reason; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BACKENDS = ["local", "memory", "s3"]
collect_ignore_glob = ["golden/*"]  # scripts and data, not tests (loaded by test_schema.py)
S3_BUCKET = "ckptkit-tests"


def load_s3server() -> ModuleType:
    """tests/s3server.py, imported by path (the tests directory is not a package)."""
    name = "ckptkit_tests_s3server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("s3server.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class S3Session:
    """The session's S3 server and bucket."""

    server: Any  # s3server.S3Server
    bucket: str
    startup_s: float

    def storage_options(self) -> dict[str, Any]:
        return dict(self.server.storage_options())

    def env(self) -> dict[str, str]:
        return dict(self.server.env())

    def fresh_url(self) -> str:
        return f"s3://{self.bucket}/t-{uuid.uuid4().hex}"


def _unavailable(why: str) -> None:
    if _in_ci():
        pytest.fail(f"S3 server unavailable in CI (CI={os.environ.get('CI')}): {why}", pytrace=False)
    pytest.skip(f"S3 tests need a local Ceph S3 server: {why}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Session]:
    """Start the S3 server once for the session, create the test bucket, and point fsspec's S3 defaults at it.

    A failure is cached by pytest for the session, so a missing or broken server costs its timeout once.
    """
    try:
        import fsspec.config
        import s3fs  # noqa: F401
    except ImportError as err:
        _unavailable(f"s3fs is not installed ({err}): pip install -e '.[s3]'")
    s3server = load_s3server()
    t0 = time.monotonic()
    try:
        server = s3server.start(tmp_path_factory.mktemp("s3server"), timeout=90)
    except s3server.S3ServerUnavailable as err:
        _unavailable(str(err))
    except s3server.S3ServerError as err:
        if _in_ci():
            pytest.fail(str(err), pytrace=False)
        pytest.skip(f"the local Ceph S3 server did not start: {str(err)[:2000]}")
    startup = time.monotonic() - t0
    saved_conf = fsspec.config.conf.get("s3")
    saved_env = {k: os.environ.get(k) for k in ("AWS_EC2_METADATA_DISABLED",)}
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask an instance-metadata service for credentials
    fsspec.config.conf["s3"] = server.storage_options()
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(S3_BUCKET)
        yield S3Session(server, S3_BUCKET, startup)
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(params=BACKENDS)
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty repository URL on each backend."""
    if request.param == "local":
        yield str(tmp_path / "repo")
    elif request.param == "memory":
        url = f"memory://ckptkit-test-{uuid.uuid4().hex}"
        yield url
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory://")):
            fs.rm(url.removeprefix("memory://"), recursive=True)
    else:
        session: S3Session = request.getfixturevalue("s3")
        url = session.fresh_url()
        yield url
        import fsspec

        fs = fsspec.filesystem("s3", use_listings_cache=False)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(url.removeprefix("s3://"), recursive=True)  # the OSD keeps objects in memory
