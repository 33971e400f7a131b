"""Publishing checkpoints to MLflow 3: each checkpoint becomes a *logged model* of an experiment, whose weights
stay where they are (an external model: MLflow holds a reference to the checkpoint, not a copy).

What a checkpoint's logged model carries (``TAG_*`` below name the tags):

- its **name** (the checkpoint's, ``.`` made ``_``: MLflow refuses dots in model names) and ``model_type``
  ``"ckptkit-checkpoint"``;
- **tags**: the checkpoint id (``ckptkit.checkpoint_id``: how a second publish finds it), repository, name,
  location (the manifest's URL), status, relation, step, epoch, samples seen, creation time and run; the parents
  (``ckptkit.parent_ids``, ``ckptkit.parents`` as JSON, and ``ckptkit.parent_model_id``: the first parent's MLflow
  model id when that parent is published); the data segments (``ckptkit.data``: JSON with names, URIs,
  fingerprints, splits, samples consumed); ``mlflow.model.isExternal = "true"``;
- **params**: the checkpoint's hyperparameters (strings as they are, other values as JSON);
- **metrics**: the checkpoint's metrics at its global step. They are logged in an MLflow *run* that stands for the
  ckptkit run that wrote the checkpoint (one per training process; ``ckptkit.run`` tag), so the run shows each
  metric's curve over its checkpoints and lists the checkpoints as its logged models. NaN and infinite values go to
  the run only: MLflow's logged-model metrics cannot hold them.

Publishing is idempotent: a checkpoint already published (found by its ``ckptkit.checkpoint_id`` tag) is not
created again; its tags that can change (status, location, the parent's model id once the parent is published) are
brought up to date. Two publishers that meet on one new checkpoint at the same instant can both create it: MLflow
has no unique key for tags.

:class:`MlflowPublisher` publishes now (``ckptkit catalog publish --mlflow URI``); :class:`MlflowCommitPublisher`
publishes each checkpoint a :class:`~ckptkit.CheckpointManager` commits, in the background
(``CheckpointManager(..., mlflow=URI)``). Needs ``pip install 'ckptkit[mlflow]'`` (``mlflow-skinny``, the client).
This module imports neither torch nor SQLAlchemy; MLflow is imported when a publisher first talks to the server.

Example::

    from ckptkit.catalog import Catalog
    from ckptkit.catalog.mlflow import MlflowPublisher

    with Catalog() as cat:
        report = MlflowPublisher("http://127.0.0.1:5000").publish_catalog(cat)
    print(report.created, report.existing)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptkit.catalog.background import CommitQueue
from ckptkit.engine.manifests import RepoLike, open_repository
from ckptkit.errors import CkptkitError, InvalidArgumentError, MissingDependencyError, StorageError
from ckptkit.hashing import hash_bytes
from ckptkit.schema import Manifest, canonical_json

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel

    from ckptkit.catalog.catalog import Catalog

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MODEL_TYPE",
    "TAG_CHECKPOINT_ID",
    "TAG_DATA",
    "TAG_LOCATION",
    "TAG_PARENTS",
    "TAG_PARENT_IDS",
    "TAG_PARENT_MODEL_ID",
    "TAG_RUN",
    "MlflowCommitPublisher",
    "MlflowPublisher",
    "PublishReport",
    "Published",
    "location_of",
]

log = logging.getLogger("ckptkit")

DEFAULT_EXPERIMENT = "ckptkit"
"""The experiment checkpoints are published to unless another is named (created when missing)."""
MODEL_TYPE = "ckptkit-checkpoint"
"""The ``model_type`` of every logged model ckptkit publishes."""
TAG_CHECKPOINT_ID = "ckptkit.checkpoint_id"
"""The checkpoint's id (the hash of its manifest): how a published checkpoint is found again."""
TAG_LOCATION = "ckptkit.location"
"""The URL of the checkpoint's manifest in its repository: the reference to the weights, which are not copied."""
TAG_PARENT_IDS = "ckptkit.parent_ids"
"""The parents' checkpoint ids, comma-separated, in the manifest's order."""
TAG_PARENT_MODEL_ID = "ckptkit.parent_model_id"
"""The MLflow model id of the first parent (the one the weights came from), once that parent is published."""
TAG_PARENTS = "ckptkit.parents"
"""JSON: each parent's id, relation, name, URL and MLflow model id (when published)."""
TAG_DATA = "ckptkit.data"
"""JSON: the data segments the weights saw (name, URI, fingerprint, size, split, samples consumed)."""
TAG_RUN = "ckptkit.run"
"""On MLflow runs: the ckptkit run they stand for (the manifest's ``lineage.run``, or ``repo-<hash>`` for
checkpoints saved outside a run)."""
_EXTERNAL = "mlflow.model.isExternal"
_STATUSES = ("committed", "incomplete", "archived", "removed")  # as the catalog's tables.STATUSES
_MUTABLE = ("ckptkit.status", "ckptkit.repo", TAG_LOCATION, TAG_PARENT_MODEL_ID, TAG_PARENTS)
_MAX_TAG = 8000  # MLflow's limits on a tag's and a param's value, and its entities per request
_MAX_PARAM = 6000
_PER_REQUEST = 100
_INSTALL = "pip install 'ckptkit[mlflow]'"
_START = "start it (`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`)"


def _require_mlflow() -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise MissingDependencyError(f"publishing to MLflow needs the MLflow client (mlflow-skinny 3): {_INSTALL}")


def _check_uri(tracking_uri: object) -> str:
    if not isinstance(tracking_uri, str) or not tracking_uri.strip():
        raise InvalidArgumentError(f"mlflow={tracking_uri!r}: give the tracking server's URI, e.g. "
                                   "'http://127.0.0.1:5000'")  # fmt: skip
    uri = tracking_uri.strip()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else uri


def _repo_key(repo: str) -> str:
    """A repository URL as the catalog keys it: local paths absolute, URLs without a trailing slash."""
    return repo.rstrip("/") if "://" in repo else os.path.abspath(os.path.expanduser(repo))


def _ms(manifest: Manifest) -> int:
    return int(manifest.created_at.timestamp() * 1000)


_BAD_KEY = re.compile(r"[^\w.\- ]")


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ . - space``; at most 250 characters)."""
    return _BAD_KEY.sub("_", name)[:250] or "_"


def _json_list(items: Sequence[dict[str, Any]]) -> str:
    """JSON of as many of ``items`` as fit in one tag value (all of them, unless thousands)."""
    for n in range(len(items), -1, -1):
        text = canonical_json(list(items[:n])).decode()
        if len(text) <= _MAX_TAG:
            return text
    return "[]"  # pragma: no cover  (n=0 always fits)


def location_of(repo: str, manifest: Manifest, status: str = "committed") -> str:
    """The URL of a checkpoint's manifest: ``REPO/checkpoints/NAME.json``, or ``REPO/lineage/ID.json`` once
    retention archived it.

    Example:
        >>> from ckptkit.schema import Environment, build_manifest
        >>> m = build_manifest(name="step-1", created_at="2026-01-01T00:00:00+00:00",
        ...                    environment=Environment(ckptkit="0", torch="0", python="3", platform="x"))
        >>> location_of("s3://bucket/run", m)
        's3://bucket/run/checkpoints/step-1.json'
    """
    base = repo.rstrip("/")
    return f"{base}/lineage/{manifest.id}.json" if status == "archived" else f"{base}/checkpoints/{manifest.name}.json"


@dataclass(frozen=True)
class Published:
    """One checkpoint's logged model: ``created`` by this publish, or found there already (``updated``: the tags
    that were brought up to date)."""

    checkpoint_id: str
    name: str
    repo: str
    model_id: str
    created: bool
    updated: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (``--json`` output)."""
        return {"checkpoint_id": self.checkpoint_id, "name": self.name, "repo": self.repo,
                "model_id": self.model_id, "created": self.created, "updated": list(self.updated)}  # fmt: skip


@dataclass
class PublishReport:
    """What one :meth:`MlflowPublisher.publish_catalog` did."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    published: list[Published] = field(default_factory=list)

    @property
    def created(self) -> int:
        """Checkpoints published for the first time."""
        return sum(p.created for p in self.published)

    @property
    def existing(self) -> int:
        """Checkpoints that were published already (nothing created for them)."""
        return len(self.published) - self.created

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (``ckptkit catalog publish --json``)."""
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "experiment_id": self.experiment_id, "created": self.created, "existing": self.existing,
                "published": [p.to_json() for p in self.published]}  # fmt: skip


class MlflowPublisher:
    """Publishes checkpoints to an MLflow 3 tracking server as logged models (see the module's docstring for what
    each carries).

    Args:
        tracking_uri: the tracking server (``http://host:5000``; any URI ``MlflowClient`` takes). Credentials come
            from MLflow's environment variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME`` and
            ``..._PASSWORD``), never from ckptkit.
        experiment: the experiment's name; created when missing.
        timeout: seconds to wait for the server's first answer (an ``http(s)`` server is asked once, without
            retries, before anything is logged, so that a server that is down is reported at once and not after
            the MLflow client's minutes of retries).

    Nothing is sent until the first publish.

    Raises:
        InvalidArgumentError: ``tracking_uri`` or ``experiment`` is empty, ``timeout`` not positive.
        MissingDependencyError: the MLflow client is not installed.

    Example::

        pub = MlflowPublisher("http://127.0.0.1:5000", experiment="fine-tunes")
        pub.publish(manifest, "s3://bucket/runs/fine").model_id
    """

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, *, timeout: float = 10.0) -> None:
        self.tracking_uri = _check_uri(tracking_uri)
        if not isinstance(experiment, str) or not experiment.strip():
            raise InvalidArgumentError(f"experiment={experiment!r}: give the MLflow experiment's name")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InvalidArgumentError(f"timeout={timeout!r}: must be a positive number of seconds")
        _require_mlflow()
        self.experiment = experiment
        self.timeout = float(timeout)
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # run key -> MLflow run id
        self._models: dict[str, LoggedModel] = {}  # checkpoint id -> its logged model

    def __repr__(self) -> str:
        return f"MlflowPublisher({self.tracking_uri!r}, experiment={self.experiment!r})"

    # --- the server ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Ask an ``http(s)`` server once, without retries, whether it answers as an MLflow tracking server.

        Raises:
            StorageError: it cannot be reached in ``timeout`` seconds, answers with a server error, or is not an
                MLflow tracking server; the message says which, and how to fix it.
        """
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        query = urllib.parse.urlencode({"experiment_name": self.experiment})
        url = f"{self.tracking_uri}/api/2.0/mlflow/experiments/get-by-name?{query}"
        action = "reaching the MLflow tracking server"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:  # http(s) only, checked above
                resp.read()
            return
        except urllib.error.HTTPError as err:
            code, body = err.code, err.read(2000)
        except (urllib.error.URLError, OSError) as err:
            why = getattr(err, "reason", err)
            raise StorageError(self.tracking_uri, action, None, f"no answer ({why})",
                               f"{_START}, or pass the URI of a running one, and check the network") from err
        if code in (401, 403):
            return  # it answers; the client's own request brings the credentials (or says they are wrong)
        if code >= 500:
            raise StorageError(self.tracking_uri, action, None, f"it answered HTTP {code}",
                               "the server is failing: see its log, then retry")  # fmt: skip
        try:
            mlflow_answer = "error_code" in json.loads(body)
        except ValueError:
            mlflow_answer = False
        if code != 404 or not mlflow_answer:
            raise StorageError(self.tracking_uri, action, None,
                               f"HTTP {code} for {url}: this is not an MLflow tracking server's REST API",
                               "pass the tracking server's base URL (e.g. http://127.0.0.1:5000, without a path)")

    def _failure(self, action: str, err: Exception) -> StorageError:
        """An MLflow client error as ckptkit's typed error: what was being done, where, why, and the fix."""
        status = getattr(err, "get_http_status_code", lambda: None)()
        text = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
        if "Max retries exceeded" in text or ("Connection" in text and status == 500):
            hint = f"the server went away: {_START}, or check the network, then publish again"
        elif status in (401, 403):
            hint = ("the server refused the credentials: set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD, to an account that may write to the experiment")  # fmt: skip
        elif status is not None and status >= 500:
            hint = "the server is failing: see its log, then publish again (what was published stays)"
        else:
            hint = "the server refused the request: see the reason; publishing again resumes where this stopped"
        return StorageError(self.tracking_uri, action, None, text, hint)

    def _connect(self) -> tuple[MlflowClient, str]:
        if self._client is not None and self._experiment_id is not None:
            return self._client, self._experiment_id
        self.check()
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    eid = str(client.create_experiment(self.experiment, tags={"ckptkit": "checkpoints"}))
                except MlflowException as err:  # another publisher created it meanwhile
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    eid = str(exp.experiment_id)
            elif exp.lifecycle_stage == "deleted":
                raise InvalidArgumentError(
                    f"experiment {self.experiment!r} is deleted on the MLflow server {self.tracking_uri}: restore it "
                    f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or name another "
                    "(--experiment NAME, mlflow_experiment=...)")  # fmt: skip
            else:
                eid = str(exp.experiment_id)
        except MlflowException as err:
            raise self._failure(f"opening the experiment {self.experiment!r} on", err) from err
        self._client, self._experiment_id = client, eid
        return client, eid

    def reset(self) -> None:
        """Forget the connection (the next publish asks the server again); what is known to be published stays."""
        self._client = None
        self._experiment_id = None

    # --- publishing ------------------------------------------------------------------------------------

    def publish(self, manifest: Manifest, repo: str, *, status: str = "committed") -> Published:
        """Publish one checkpoint of the repository ``repo`` as a logged model, or find it published already and
        bring its changing tags (``status``, location, the parent's model id) up to date.

        Args:
            manifest: the checkpoint's manifest.
            repo: the URL of the repository it is in (a local path is made absolute).
            status: its status there (``committed``, ``incomplete``, ``archived``, ``removed``).

        Raises:
            StorageError: the server cannot be reached or refused a request (the message says which and how to
                fix it).
            InvalidArgumentError: the experiment is deleted on the server.
        """
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        if status not in _STATUSES:
            raise InvalidArgumentError(f"status={status!r}: use one of {', '.join(_STATUSES)}")
        client, eid = self._connect()
        repo = _repo_key(repo)
        try:
            parents = self._lookup([p.id for p in manifest.lineage.parents])
            tags = self._tags(manifest, repo, status, parents)
            model = self._lookup([manifest.id]).get(manifest.id)
            if model is None:
                model = self._create(client, eid, manifest, repo, tags)
                self._models[manifest.id] = model
                return Published(manifest.id, manifest.name, repo, model.model_id, created=True)
            ready = model.status == LoggedModelStatus.READY
            changed = {k: v for k, v in tags.items() if (k in _MUTABLE or not ready) and model.tags.get(k) != v}
            if changed:
                client.set_logged_model_tags(model.model_id, changed)
                model.tags.update(changed)
            if not ready:  # a publish cut short after the model was created: params, metrics, run link, READY
                missing = {k: v for k, v in self._params(manifest).items() if k not in model.params}
                for k in range(0, len(missing), _PER_REQUEST):
                    client.log_model_params(model.model_id, dict(list(missing.items())[k : k + _PER_REQUEST]))
                self._models[manifest.id] = self._finish(client, eid, manifest, repo, model)
            return Published(manifest.id, manifest.name, repo, model.model_id, created=False,
                             updated=tuple(sorted(changed)))  # fmt: skip
        except MlflowException as err:
            raise self._failure(f"publishing {manifest.name} ({manifest.id[:12]}) of {repo} to", err) from err

    def publish_catalog(self, catalog: Catalog, repo: str | os.PathLike[str] | None = None) -> PublishReport:
        """Publish every checkpoint of the catalog (or of one of its repositories), oldest first, so that parents
        are published before their children and each child's ``ckptkit.parent_model_id`` is set. Checkpoints
        published already cost no request beyond one listing of the experiment's published checkpoints, unless a
        tag of theirs changed.

        Raises:
            StorageError: the server cannot be reached or refused a request; what was published before it stays
                published, and publishing again resumes.
            InvalidArgumentError: ``repo`` is not in the catalog, or the experiment is deleted on the server.

        Example::

            with Catalog() as cat:
                report = MlflowPublisher("http://127.0.0.1:5000").publish_catalog(cat, "./runs/base")
        """
        from sqlalchemy import select

        from ckptkit.catalog import tables as t
        from ckptkit.schema import parse_manifest

        records = catalog.ls(repo)
        _, eid = self._connect()
        self._prefetch()
        report = PublishReport(self.tracking_uri, self.experiment, eid)
        raw: dict[str, str] = {}
        ids = [r.id for r in records]
        with catalog.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                batch = ids[i : i + 500]
                for row in conn.execute(select(t.checkpoints.c.id, t.checkpoints.c.manifest)
                                        .where(t.checkpoints.c.id.in_(batch))):  # fmt: skip
                    raw[row.id] = row.manifest
        for r in records:
            m = parse_manifest(raw[r.id].encode(), f"catalog {catalog.url}, checkpoint {r.id}")
            report.published.append(self.publish(m, r.repo, status=r.status))
        return report

    # --- helpers ---------------------------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Every published checkpoint of the experiment, in one paged listing (instead of a search for each)."""
        from mlflow.exceptions import MlflowException

        client, eid = self._connect()
        token: str | None = None
        try:
            while True:
                page = client.search_logged_models([eid], filter_string=f"tags.`{TAG_CHECKPOINT_ID}` != ''",
                                                   max_results=_PER_REQUEST, page_token=token)  # fmt: skip
                for model in page:
                    self._remember(model)
                token = page.token
                if not token:
                    break
        except MlflowException as err:
            raise self._failure("listing the published checkpoints on", err) from err

    def _remember(self, model: LoggedModel) -> None:
        """Cache a published checkpoint's model; of two (publishers that met), the first created wins."""
        cid = model.tags[TAG_CHECKPOINT_ID]
        known = self._models.get(cid)
        if known is None or model.creation_timestamp < known.creation_timestamp:
            self._models[cid] = model

    def _lookup(self, ids: Sequence[str]) -> dict[str, LoggedModel]:
        """The logged models of these checkpoints that are published (from the cache, else one search)."""
        client, eid = self._connect()
        todo = [i for i in dict.fromkeys(ids) if i not in self._models]
        for k in range(0, len(todo), _PER_REQUEST):
            quoted = ", ".join(f"'{i}'" for i in todo[k : k + _PER_REQUEST])  # ids are hex: nothing to escape
            page = client.search_logged_models([eid], filter_string=f"tags.`{TAG_CHECKPOINT_ID}` IN ({quoted})",
                                               max_results=_PER_REQUEST)  # fmt: skip
            for model in page:
                self._remember(model)
        return {i: self._models[i] for i in ids if i in self._models}

    def _tags(self, m: Manifest, repo: str, status: str, parents: dict[str, LoggedModel]) -> dict[str, str]:
        ps = m.lineage.parents
        tags = {
            TAG_CHECKPOINT_ID: m.id,
            "ckptkit.name": m.name,
            "ckptkit.repo": repo,
            TAG_LOCATION: location_of(repo, m, status),
            "ckptkit.status": status,
            "ckptkit.relation": m.lineage.relation,
            "ckptkit.step": str(m.progress.global_step),
            "ckptkit.epoch": str(m.progress.epoch),
            "ckptkit.samples_seen": str(m.progress.samples_seen),
            "ckptkit.created_at": m.created_at.isoformat(),
            "ckptkit.format_version": str(m.format_version),
            TAG_RUN: m.lineage.run or "",
            TAG_PARENT_IDS: ",".join(p.id for p in ps),
            TAG_PARENTS: _json_list([{"id": p.id, "relation": p.relation, "name": p.name, "url": p.url,
                                      "model_id": parents[p.id].model_id if p.id in parents else None}
                                     for p in ps]),
            TAG_DATA: _json_list([{"name": d.name, "uri": d.uri, "fingerprint": d.fingerprint, "size": d.size,
                                   "split": d.split, "samples_consumed": d.samples_consumed} for d in m.data]),
            _EXTERNAL: "true",
        }
        if ps and ps[0].id in parents:
            tags[TAG_PARENT_MODEL_ID] = parents[ps[0].id].model_id
        return {k: v[:_MAX_TAG] for k, v in tags.items()}

    def _run_id(self, client: MlflowClient, eid: str, m: Manifest, repo: str) -> str:
        """The MLflow run that stands for the ckptkit run that wrote ``m`` (found by its tag, else created)."""
        key = m.lineage.run or f"repo-{hash_bytes(repo.encode())[:32]}"
        if key in self._runs:
            return self._runs[key]
        found = client.search_runs([eid], filter_string=f"tags.`{TAG_RUN}` = '{key}'", max_results=1)
        if found:
            run_id = str(found[0].info.run_id)
        else:
            label = os.path.basename(repo.rstrip("/")) or repo
            run = client.create_run(eid, start_time=_ms(m), run_name=f"{label} {key[:8]}",
                                    tags={TAG_RUN: key, "ckptkit.repo": repo})  # fmt: skip
            run_id = str(run.info.run_id)
            client.update_run(run_id, status="FINISHED")  # a record of checkpoints, not a process to watch
        self._runs[key] = run_id
        return run_id

    def _create(self, client: MlflowClient, eid: str, m: Manifest, repo: str, tags: dict[str, str]) -> LoggedModel:
        run_id = self._run_id(client, eid, m, repo)
        items = list(self._params(m).items())
        model = client.create_logged_model(eid, name=m.name.replace(".", "_"), source_run_id=run_id, tags=tags,
                                           params=dict(items[:_PER_REQUEST]), model_type=MODEL_TYPE)  # fmt: skip
        for k in range(_PER_REQUEST, len(items), _PER_REQUEST):
            client.log_model_params(model.model_id, dict(items[k : k + _PER_REQUEST]))
        return self._finish(client, eid, m, repo, model)

    @staticmethod
    def _params(m: Manifest) -> dict[str, str]:
        return {_key(k): (v if isinstance(v, str) else canonical_json(v).decode())[:_MAX_PARAM]
                for k, v in sorted(m.hparams.items())}  # fmt: skip

    def _finish(self, client: MlflowClient, eid: str, m: Manifest, repo: str, model: LoggedModel) -> LoggedModel:
        """Log the metrics at the checkpoint's step, link the model to its run as an output, mark it READY."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

        run_id = model.source_run_id or self._run_id(client, eid, m, repo)
        when, step = _ms(m), m.progress.global_step
        metrics = [Metric(_key(k), float(v), when, step, model_id=model.model_id if math.isfinite(v) else None)
                   for k, v in sorted(m.metrics.items())]  # fmt: skip
        for k in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[k : k + 1000])
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


class MlflowCommitPublisher(CommitQueue):
    """Publishes the manifests committed to one repository to MLflow, in a background thread, so that a save never
    waits for the server nor fails because of it (``CheckpointManager(..., mlflow=URI)``).

    While the server is unreachable (or refuses the credentials), checkpoints wait in a bounded queue and the
    thread retries (0.25 s, doubling, at most 30 s), with one warning per outage. What is left when the queue
    overflows or :meth:`close` gives up is logged, with the commands that publish it later (``ckptkit catalog add
    REPO``, then ``ckptkit catalog publish --mlflow URI --repo REPO``).

    Args:
        tracking_uri: the tracking server (see :class:`MlflowPublisher`). Not contacted here: a server that is
            down when the run starts does not stop it.
        repo: the repository the manifests are committed to (URL, path or open ``Repository``).
        storage_options: for fsspec, with a URL ``repo``.
        experiment: the MLflow experiment's name (created when missing).
        max_queue: manifests kept while the server is unreachable; beyond it the oldest are dropped.
        timeout: seconds one attempt waits for the server's first answer before it counts as an outage.

    Attributes ``published``, ``rejected`` (refused by the server for a reason retrying cannot mend, logged) and
    ``dropped`` count what happened to the submitted manifests.

    Raises:
        InvalidArgumentError: an option is out of range.
        MissingDependencyError: the MLflow client is not installed.

    Example::

        pub = MlflowCommitPublisher("http://127.0.0.1:5000", "./runs/base")
        pub.submit(manifest)
        pub.flush(30)
        pub.close()
    """

    NOUN = "publisher"
    DONE = "published"
    DOING = "publishing"
    SERVICE = "MLflow server"

    def __init__(self, tracking_uri: str, repo: RepoLike, storage_options: dict[str, Any] | None = None, *,
                 experiment: str = DEFAULT_EXPERIMENT, max_queue: int = 1000,
                 timeout: float = 5.0) -> None:  # fmt: skip
        self.publisher = MlflowPublisher(tracking_uri, experiment, timeout=timeout)
        super().__init__(open_repository(repo, storage_options), max_queue=max_queue, thread_name="ckptkit-mlflow")
        self.url = self.publisher.tracking_uri
        self._repo_url = _repo_key(self.repo.url)

    def __repr__(self) -> str:
        return f"MlflowCommitPublisher({self.url!r}, {self.repo.url!r})"

    @property
    def published(self) -> int:
        """Manifests published (or found published already) so far."""
        return self.delivered

    def _target(self) -> str:
        return f"MLflow {self.url}"

    def _remedy(self) -> str:
        return (f"`ckptkit catalog add {self._repo_url}` then `ckptkit catalog publish --mlflow {self.url} "
                f"--repo {self._repo_url}` publishes")  # fmt: skip

    def _deliver(self, manifest: Manifest, retired: tuple[str, ...]) -> str | None:
        """Publish one manifest (the names ``retired`` are the catalog's business: MLflow's status tag of a pruned
        checkpoint is updated by the next ``catalog publish``)."""
        try:
            self.publisher.check()  # one quick question first: an outage is found in `timeout`, not after retries
            self.publisher.publish(manifest, self._repo_url)
        except StorageError as err:
            self.publisher.reset()  # the next attempt asks the server and looks the experiment up again
            status = getattr(err.__cause__, "get_http_status_code", lambda: None)()
            if status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429):
                self._refused(manifest, str(err))  # this checkpoint's request is refused: retrying gives the same
                return None
            return err.problem
        except CkptkitError as err:  # the experiment is deleted: logged, like a refused request
            self._refused(manifest, str(err))
        except Exception as err:  # a bug must not stop the thread (nor ever reach the save): logged, with its trace
            self._failed(manifest, err)
        else:
            self._done()
        return None

