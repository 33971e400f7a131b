"""A real S3-compatible server for the tests: a single-node Ceph (monitor + memstore OSD + RADOS Gateway) on loopback.

Everything binds to 127.0.0.1 on free ports, runs as the current user, and keeps its state (config, monitor
store, logs, sockets) in one directory; the OSD keeps objects in memory (``memstore``). Startup takes ~2 s.

As a module::

    server = start()              # S3Server: .endpoint, .access_key, .secret_key, .storage_options()
    ...
    server.stop()                 # kills the daemons and removes the directory

As a script (the daemons outlive the script; ``DIR/server.json`` records them)::

    python tests/s3server.py start DIR     # prints the endpoint and keys as shell exports
    python tests/s3server.py stop DIR

Needs Debian's ``radosgw``, ``ceph-mon`` and ``ceph-osd`` packages (``apt-get install --no-install-recommends
radosgw ceph-mon ceph-osd``); :func:`start` raises :class:`S3ServerUnavailable` at once when they are missing and
:class:`S3ServerError` (with the daemons' log tails) when the cluster does not come up within ``timeout``.

Notes on the configuration (Ceph 16, "pacific"), found by trial:

- ``auth ... required = none`` everywhere, so no keyrings have to be distributed.
- ``ms mon client mode = crc`` / ``ms client mode = crc`` (msgr2 without its "secure" mode, which needs cephx):
  without them radosgw never finishes starting and hangs until ``rgw init timeout`` (300 s by default; lowered
  here to 60 s so a broken setup fails fast).
- ``osd pool default size = 1`` + ``mon allow pool size one``: one OSD holds the only replica; small PG counts
  and no autoscaler, so the gateway's pools become active at once.
- ``paxos propose interval`` lowered from 1 s: every pool the gateway creates at startup is a monitor proposal,
  and this takes startup from ~13 s to ~2 s.
- ``tcp_nodelay=1`` on the beast frontend: without it every GET, LIST or 404 HEAD waits ~40 ms for a delayed
  ACK (Nagle), which made the S3 test suite 5x slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "CKPTKITTESTACCESSKEY"
SECRET_KEY = "ckptkit-test-secret-7f3a9c1e5b2d4680aa11"
USER = "ckptkit"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "ceph", "monmaptool", "radosgw-admin")
INSTALL_HINT = "apt-get install --no-install-recommends radosgw ceph-mon ceph-osd"


class S3ServerUnavailable(RuntimeError):
    """The Ceph binaries are not installed."""


class S3ServerError(RuntimeError):
    """The cluster did not come up (the message carries the daemons' log tails)."""


@dataclass
class S3Server:
    """A running single-node Ceph with an S3 gateway."""

    directory: str
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    pids: dict[str, int] = field(default_factory=dict)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (no region: a local server needs none)."""
        return {"key": self.access_key, "secret": self.secret_key, "client_kwargs": {"endpoint_url": self.endpoint}}

    def env(self) -> dict[str, str]:
        """Environment variables that point botocore (and the tests' workers) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "CKPTKIT_S3_ENDPOINT": self.endpoint}  # fmt: skip

    def stop(self) -> None:
        """Kill the daemons and remove the directory."""
        _kill(self.pids)
        shutil.rmtree(self.directory, ignore_errors=True)


def missing_binaries() -> list[str]:
    """The Ceph programs that are not on PATH."""
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(d: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
ms mon client mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms cluster mode = crc
ms service mode = crc
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
rgw rados pool pg num min = 8
paxos propose interval = 0.05
paxos min wait = 0.01

[mon]
mon data = {d}/mon

[osd]
osd data = {d}/osd
osd objectstore = memstore
memstore device bytes = 4294967296
osd memory target = 1073741824
osd max object name len = 256
osd max object namespace len = 64

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
rgw init timeout = 60
rgw enable usage log = false
rgw dns name = 127.0.0.1
"""


try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not dlopen
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have the kernel kill this daemon when the process that started it dies (fixture mode), so a test session
    that is itself killed leaves no Ceph running."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Starter:
    def __init__(self, directory: Path, timeout: float, detach: bool) -> None:
        self.d = directory
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.detach = detach
        self.conf = str(directory / "ceph.conf")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def fail(self, why: str) -> S3ServerError:
        tails = []
        for log in sorted((self.d / "log").glob("*")) + sorted(self.d.glob("*.out")):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace").strip().splitlines()
                tails.append(f"--- {log.name} (last lines)\n" + "\n".join(text[-15:]))
        return S3ServerError(f"Ceph S3 server in {self.d}: {why}\n" + "\n".join(tails))

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> str:
        cmd = [args[0], "-c", self.conf, *args[1:]]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout or 30, self.left()),
                                 check=False, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise self.fail(f"`{' '.join(cmd)}` did not finish in time") from err
        if check and out.returncode != 0:
            raise self.fail(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def daemon(self, name: str, *args: str) -> None:
        out = open(self.d / f"{name}.out", "wb")  # noqa: SIM115 - the daemon holds it
        self.procs[name] = subprocess.Popen(
            [args[0], "-f", "-c", self.conf, *args[1:]], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, preexec_fn=None if self.detach else _pdeathsig,  # noqa: PLW1509 - prctl only
        )  # fmt: skip
        out.close()

    def wait(self, what: str, ready: Any, interval: float = 0.25) -> None:
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise self.fail(f"{name} exited ({p.returncode}) while waiting for {what}")
            if ready():
                return
            if time.monotonic() > self.deadline:
                raise self.fail(f"timed out after {self.timeout:g}s waiting for {what}")
            time.sleep(interval)

    def ceph_json(self, *args: str) -> Any:
        out = subprocess.run(["ceph", "-c", self.conf, "--connect-timeout", "5", *args, "-f", "json"],
                             capture_output=True, text=True, timeout=min(15, self.left()), check=False,
                             stdin=subprocess.DEVNULL)  # fmt: skip
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except ValueError:
            return None


def _http_ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as r:
            return bool(r.status)
    except urllib.error.HTTPError:
        return True  # an S3 error response (403 for anonymous) is an answer
    except (OSError, ValueError):
        return False


def start(directory: str | os.PathLike[str] | None = None, timeout: float = 90.0, detach: bool = False) -> S3Server:
    """Start mon + memstore OSD + radosgw on 127.0.0.1, create the S3 user, and return the running server.

    Args:
        directory: where all state goes (created; a fresh temporary directory when ``None``).
        timeout: seconds for the whole startup before :class:`S3ServerError`.
        detach: let the daemons outlive this process (the script's ``start``); otherwise the kernel kills them
            when it exits, so a crashed test session leaves nothing running.

    Raises:
        S3ServerUnavailable: the Ceph binaries are not installed.
        S3ServerError: the cluster did not come up in time (with the daemons' log tails).
    """
    missing = missing_binaries()
    if missing:
        raise S3ServerUnavailable(f"Ceph is not installed (missing {', '.join(missing)}): {INSTALL_HINT}")
    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="ckptkit-s3-"))
    d.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "log", "mon", "osd", "rgw"):
        (d / sub).mkdir(exist_ok=True)
    fsid = str(uuid.uuid4())
    mon_port, rgw_port = _free_port(), _free_port()
    endpoint = f"http://127.0.0.1:{rgw_port}"
    (d / "ceph.conf").write_text(_config(d, fsid, mon_port, rgw_port))
    s = _Starter(d, timeout, detach)
    server = S3Server(str(d), endpoint)
    try:
        s.run("monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
              str(d / "monmap"))  # fmt: skip
        s.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        s.daemon("mon", "ceph-mon", "-i", "a")
        s.wait("the monitor", lambda: s.ceph_json("mon", "stat") is not None)
        osd_uuid = str(uuid.uuid4())
        osd_id = s.run("ceph", "--connect-timeout", "10", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise s.fail(f"expected OSD id 0, got {osd_id!r}")
        s.run("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid)
        s.daemon("osd", "ceph-osd", "-i", "0")
        s.wait("the OSD to be up", lambda: (s.ceph_json("osd", "stat") or {}).get("num_up_osds") == 1)
        s.daemon("rgw", "radosgw", "-n", "client.rgw.a")
        s.wait("the S3 endpoint", lambda: _http_ready(endpoint))
        s.run("radosgw-admin", "user", "create", f"--uid={USER}", f"--display-name={USER}",
              f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}")  # fmt: skip
    except BaseException:
        _kill({n: p.pid for n, p in s.procs.items()})
        if directory is None:
            shutil.rmtree(d, ignore_errors=True)
        raise
    server.pids = {n: p.pid for n, p in s.procs.items()}
    (d / "server.json").write_text(json.dumps(asdict(server)))
    return server


def _kill(pids: dict[str, int], grace: float = 3.0) -> None:
    """Stop the daemons one by one, gateway first, then OSD, then monitor (each exits within a second of SIGTERM
    while the ones it talks to are still up); SIGKILL what is still there after ``grace`` seconds."""
    first = [n for n in ("rgw", "osd", "mon") if n in pids]
    for name in first + [n for n in pids if n not in first]:
        pid = pids[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _running(pid) and time.monotonic() < deadline:  # reaps it: no zombie is left behind
                time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether ``pid`` is still alive; reaps it when it is a child of this process that has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return not done  # our child: 0 while it runs, its pid once reaped
    except ChildProcessError:
        pass  # not our child (``stop`` of a server that ``start DIR`` left running)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"  # a zombie some other process has to reap
    except (OSError, IndexError):
        return True


def stop(directory: str | os.PathLike[str]) -> None:
    """Stop the server a ``start`` left running in ``directory``, and remove the directory."""
    d = Path(directory)
    try:
        info = json.loads((d / "server.json").read_text())
    except (OSError, ValueError):
        info = {"pids": {}}
    pids = dict(info.get("pids") or {})
    for pidfile in (d / "run").glob("*.pid") if (d / "run").is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            pids.setdefault(pidfile.stem, int(pidfile.read_text().strip()))
    _kill(pids)
    shutil.rmtree(d, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/s3server.py start|stop DIR", file=sys.stderr)
        return 2
    cmd, directory = argv
    if cmd == "stop":
        stop(directory)
        return 0
    t0 = time.monotonic()
    try:
        server = start(directory, detach=True)
    except (S3ServerUnavailable, S3ServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"# S3 server up in {time.monotonic() - t0:.1f}s; state in {directory}; stop: python {sys.argv[0]} stop "
          f"{directory}")  # fmt: skip
    for k, v in server.env().items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
