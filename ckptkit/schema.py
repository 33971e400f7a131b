"""Pydantic models of the manifest: the single source of truth for what a checkpoint contains.

A manifest is plain JSON. Everything read from storage is untrusted, so every field is validated here: names
and hashes that become storage paths are restricted to safe characters, and a manifest from a newer format
version is refused with :class:`~ckptkit.errors.FormatVersionError` before anything else is parsed.

Regenerate the published JSON schema with ``ckptkit schema > docs/manifest.schema.json``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

import blake3
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    ValidationError,
)

from ckptkit.errors import FormatVersionError, ManifestError
from ckptkit.hashing import HASH_RE, NAME_RE

__all__ = [
    "FORMAT_VERSION",
    "Component",
    "ComponentKind",
    "DataSegment",
    "Dtype",
    "Environment",
    "Hash",
    "Lineage",
    "Manifest",
    "Name",
    "Number",
    "ObjectInfo",
    "Parent",
    "Progress",
    "Relation",
    "TensorRef",
    "build_manifest",
    "canonical_json",
    "dump_manifest",
    "json_schema",
    "manifest_id",
    "parse_manifest",
    "resolve_aliases",
]

FORMAT_VERSION = 2
"""The newest manifest format this version of ckptkit writes. Every older version is read (migrated) too.

A manifest is written in the oldest version that can hold it: version 1 unless an object is recorded with a codec
(version 2 added ``objects.<hash>.codec``), so repositories without compression stay readable by older ckptkit."""


Hash = Annotated[str, Field(pattern=HASH_RE, description="blake3 hex digest (64 characters)")]
Name = Annotated[str, Field(pattern=NAME_RE)]


def _finite_or_str(value: float) -> float | str:
    # JSON has no NaN/Infinity; a diverged loss is still a metric worth keeping, so store it as a string.
    return value if math.isfinite(value) else str(value)


Number = Annotated[float, PlainSerializer(_finite_or_str, when_used="json")]
"""A float that may be NaN or infinite (written to JSON as "nan", "inf", "-inf")."""

Dtype = Literal[
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
    "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "C64",
]  # fmt: skip
Relation = Literal["init", "train", "resume", "continue", "transfer", "import"]
ComponentKind = Literal["model", "optimizer", "scheduler", "grad_scaler", "rng", "stateful", "value"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorRef(_Strict):
    """Where one tensor of a component lives: a key inside a safetensors object."""

    object: Hash
    key: str = Field(min_length=1, max_length=4096)
    dtype: Dtype
    shape: list[Annotated[int, Field(ge=0)]]


class Component(_Strict):
    """One piece of training state: a model, an optimizer, a scheduler, RNG, any Stateful object or value.

    ``state`` holds the non-tensor part as typed JSON (see :mod:`ckptkit.format`); tensors are listed in
    ``tensors`` and stored in objects. ``aliases`` maps a tied tensor's name to the name it is stored under.
    """

    kind: ComponentKind
    adapter: str | None = None
    type: str | None = Field(default=None, description="qualified class name of the saved object")
    tensors: dict[str, TensorRef] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    state: JsonValue = None
    meta: dict[str, JsonValue] = Field(default_factory=dict)


class Progress(_Strict):
    """How far training got. Counted in samples as well as steps, so a changed batch size keeps accounting."""

    epoch: int = Field(default=0, ge=0)
    global_step: int = Field(default=0, ge=0)
    step_in_epoch: int = Field(default=0, ge=0)
    samples_seen: int = Field(default=0, ge=0)


class DataSegment(_Strict):
    """One dataset a training segment read, and how much of it."""

    name: str = Field(min_length=1)
    uri: str | None = None
    fingerprint: str | None = None
    size: int | None = Field(default=None, ge=0)
    split: str | None = None
    samples_consumed: int = Field(default=0, ge=0)
    sampler_state: JsonValue = None


class Environment(_Strict):
    """Where the checkpoint was written."""

    ckptkit: str
    torch: str
    python: str
    platform: str
    host: str | None = None
    code_revision: str | None = None


class Parent(_Strict):
    """An edge of the lineage graph: this checkpoint came from ``id`` by ``relation``."""

    id: Hash
    relation: Relation
    name: str | None = None
    url: str | None = None
    changes: dict[str, JsonValue] = Field(default_factory=dict)


class Lineage(_Strict):
    """Parents by id: since an id is the hash of the parent's manifest, the history is a hash chain."""

    relation: Relation = "init"
    parents: list[Parent] = Field(default_factory=list)
    run: str | None = Field(default=None, description="id of the training run (one process lifetime)")
    source: dict[str, JsonValue] | None = Field(
        default=None, description="for relation 'import': the files or foreign checkpoint it came from"
    )


class ObjectInfo(_Strict):
    """An object the checkpoint references: its hash (also its name in the repository) and size.

    ``size`` and the hash are those of the object's bytes (uncompressed), whatever form it is stored in. ``codec``
    (format version 2) records the codec it was stored with when this manifest was written (absent: raw, or not
    known); a reader never relies on it: a stored object says its own form in its first bytes.
    """

    size: int = Field(ge=0)
    codec: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                              description="codec the object is stored with (format version 2); absent: raw")


class Manifest(_Strict):
    """A checkpoint. Stored as ``<repo>/checkpoints/<name>.json``; its presence is the commit."""

    format_version: int = Field(ge=1)
    id: Hash = Field(description="blake3 of the canonical manifest without this field")
    name: Name
    created_at: AwareDatetime  # with its UTC offset: naive and aware datetimes do not sort together
    hash_algorithm: Literal["blake3"] = "blake3"
    environment: Environment
    progress: Progress = Field(default_factory=Progress)
    components: dict[Name, Component] = Field(default_factory=dict)
    objects: dict[Hash, ObjectInfo] = Field(default_factory=dict)
    data: list[DataSegment] = Field(default_factory=list)
    hparams: dict[str, JsonValue] = Field(default_factory=dict)
    metrics: dict[str, Number] = Field(default_factory=dict)
    lineage: Lineage = Field(default_factory=Lineage)

    def payload(self) -> dict[str, Any]:
        """The manifest as JSON-ready data, without ``id`` (what the id is the hash of)."""
        data = _as_written(self)
        data.pop("id")
        return data


def resolve_aliases(stored: Collection[str], aliases: Mapping[str, str], where: str) -> dict[str, str]:
    """Each alias of a component (a tied tensor's name) -> the stored tensor it names, following chains.

    Raises:
        ManifestError: an alias is also a stored tensor, an alias chain loops, or it ends at a name that is not stored.

    Example:
        >>> resolve_aliases({"w"}, {"tied": "w", "tied2": "tied"}, "component 'model'")
        {'tied': 'w', 'tied2': 'w'}
    """
    out: dict[str, str] = {}
    for alias, first in aliases.items():
        if alias in stored:
            raise ManifestError(where, f"aliases.{alias}: {alias!r} is both a stored tensor and an alias")
        chain, seen, target = [alias], {alias}, first
        while target not in stored and target not in out and target in aliases:
            if target in seen:
                shown = " -> ".join([*chain[:5], "...", target] if len(chain) > 5 else [*chain, target])
                raise ManifestError(where, f"aliases.{alias}: the aliases loop ({shown})")
            chain.append(target)
            seen.add(target)
            target = aliases[target]
        end = out.get(target, target)
        if end not in stored:
            raise ManifestError(where, f"aliases.{alias}: points at {end!r}, which is not one of the stored tensors")
        for a in chain:
            out[a] = end
    return out


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON bytes: no whitespace, UTF-8, keys in order. Same data, same bytes, same hash.

    Keys keep their order rather than being sorted: the schema fixes the order of its own fields, and the
    order of a user's dict (optimizer state, an EMA's parameters) is information a restore must keep.
    Parsing and re-dumping gives back the same bytes, which is what the id check relies on.
    """
    return _ENCODER.encode(data).encode()


# json.dumps with these options builds an encoder at every call; this one is stateless and shared (threads too)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def manifest_id(payload: dict[str, Any]) -> str:
    """The id of a manifest: blake3 of its canonical JSON without the ``id`` field."""
    return blake3.blake3(canonical_json(payload)).hexdigest()


def build_manifest(**fields: Any) -> Manifest:
    """Validate ``fields`` into a manifest of the current format version and compute its id."""
    fields = {"format_version": 1, **fields, "id": "0" * 64}
    try:
        draft = Manifest.model_validate(fields)
    except ValidationError as err:
        raise ManifestError(f"for {fields.get('name')!r}", _short(err)) from err
    if any(o.codec is not None for o in draft.objects.values()):  # the oldest version that holds it
        draft = draft.model_copy(update={"format_version": max(draft.format_version, 2)})
    try:
        return draft.model_copy(update={"id": manifest_id(draft.payload())})
    except (ValueError, UnicodeEncodeError) as err:  # inf in hparams, a lone surrogate in a string, ...
        raise ManifestError(
            f"for {fields.get('name')!r}",
            f"a value cannot be written as standard JSON ({err}); hparams and data entries must be JSON-able "
            "(write inf or nan as a string)",
        ) from err


def dump_manifest(manifest: Manifest) -> bytes:
    """The bytes written to storage: canonical JSON of the whole manifest, id included."""
    return canonical_json(_as_written(manifest))


def _as_written(manifest: Manifest) -> dict[str, Any]:
    """The manifest as JSON-ready data. A raw object is written as before version 2 (``{"size": n}``, no codec),
    so manifests without compression keep their bytes and stay readable by older ckptkit."""
    data = manifest.model_dump(mode="json")
    for info in data["objects"].values():
        if info.get("codec") is None:
            info.pop("codec", None)
    return data


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # Version 2 only added objects.<hash>.codec (absent: raw): a version 1 manifest is a version 2 one as it is.
    return data


# Migrations from older format versions: version -> function turning that version's JSON into the next one's.
# They leave format_version as stored (the id covers it, and it says which ckptkit can read the manifest).
_MIGRATIONS: dict[int, Any] = {1: _v1_to_v2}
# Versions whose top-level fields are in the order Manifest declares them (checked on read).
_ORDERED_VERSIONS = frozenset({1, 2})


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate untrusted manifest bytes; check they are the bytes ckptkit committed.

    ckptkit writes a manifest as :func:`canonical_json` of the whole manifest (:func:`dump_manifest`) and never
    rewrites it, so what is verified is the bytes as stored: they must be exactly the canonical JSON of what they
    parse to (no whitespace, no ``\\u`` escapes, no other spelling of a number, no trailing newline), with the
    manifest's fields in the order ckptkit writes them, and the id must be the blake3 of that JSON without the id.

    Raises:
        FormatVersionError: written by a newer ckptkit.
        ManifestError: not JSON, not the canonical bytes ckptkit committed (edited after the commit), fails
            validation, or its id does not match its content.

    Example:
        >>> m = build_manifest(name="a", created_at="2024-01-01T00:00:00Z", hparams={"lr": 1e-08},
        ...                    environment={"ckptkit": "0", "torch": "2", "python": "3", "platform": "linux"})
        >>> parse_manifest(dump_manifest(m), "a.json").id == m.id
        True
        >>> parse_manifest(dump_manifest(m).replace(b"1e-08", b"1E-08"), "a.json")
        Traceback (most recent call last):
        ...
        ckptkit.errors.ManifestError: invalid manifest a.json: the stored bytes are not the form ckptkit committed ...
    """
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ManifestError(where, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ManifestError(where, f"expected a JSON object, found {type(data).__name__}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(where, f"format_version must be a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(where, version, FORMAT_VERSION)
    # What is verified is the bytes as stored: every ckptkit wrote canonical_json(whole manifest), older format
    # versions included, so the stored bytes must be that form of what they parse to, byte for byte (json.loads
    # alone accepts 1E-08 for 1e-08, whitespace, \\u escapes, a trailing newline, UTF-16). Both this check and the
    # id are taken on the parsed JSON, not on the validated model re-dumped, so a later ckptkit that adds a field
    # with a default still verifies manifests written before the field existed.
    try:
        canonical = canonical_json(data)
        actual = _stored_payload_id(canonical, bytes(raw), data, version)
        if actual is None:
            actual = manifest_id({k: v for k, v in data.items() if k != "id"})
    except (ValueError, RecursionError) as err:  # 1e400 parses as inf; "\ud800" parses but cannot be UTF-8
        raise ManifestError(where, f"not canonical JSON ({err})") from err
    stored_id = data.get("id")
    if actual != stored_id:  # first: an edit of the content says so, whatever else it changed
        raise ManifestError(
            where,
            f"id {stored_id} does not match its content (hash {actual}): the manifest was edited after it was "
            "committed",
        )
    if canonical != bytes(raw):
        raise ManifestError(where, _not_as_committed(bytes(raw), canonical))
    if version in _ORDERED_VERSIONS:  # the id is outside what it hashes: its place is checked here
        fields = [k for k in data if k in Manifest.model_fields]
        expected = [k for k in Manifest.model_fields if k in data]
        if fields != expected:
            found, moved = next((a, b) for a, b in zip(fields, expected, strict=True) if a != b)
            raise ManifestError(
                where,
                f"the stored bytes are not the form ckptkit committed: field {moved!r} is not where ckptkit writes "
                f"it (found {found!r} in its place; the order is {', '.join(expected)}); the manifest was edited "
                "after it was committed",
            )
    while version < FORMAT_VERSION:
        data = _MIGRATIONS[version](data)
        version += 1
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(where, _short(err)) from err
    return manifest


def _stored_payload_id(canonical: bytes, raw: bytes, data: dict[str, Any], version: int) -> str | None:
    """The id of a manifest stored as ckptkit writes it, hashed from its bytes instead of a second dump: when the
    stored bytes are the canonical JSON and ``id`` is the second field, the canonical JSON without ``id`` is those
    bytes less ``"id":"...",`` (each value's JSON does not depend on its neighbours). None when the bytes are
    not in that form: the caller then dumps the payload and reports what differs."""
    if canonical != raw or list(itertools.islice(data, 3)) != ["format_version", "id", "name"]:
        return None
    head = b'{"format_version":%d,' % version
    prefix = head + b'"id":' + canonical_json(data["id"]) + b","
    if not canonical.startswith(prefix):
        return None
    h = blake3.blake3(head)
    h.update(memoryview(canonical)[len(prefix):])
    return str(h.hexdigest())


_VISIBLE = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _not_as_committed(raw: bytes, canonical: bytes) -> str:
    """Where stored manifest bytes first differ from the canonical JSON ckptkit wrote, with both excerpts."""
    pairs = enumerate(zip(raw, canonical, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(raw), len(canonical)))
    lo, hi = max(0, at - 24), at + 24

    def excerpt(b: bytes) -> str:  # as text, control characters visible (a trailing newline shows as \\n)
        text = b[lo:hi].decode("utf-8", "backslashreplace").translate(_VISIBLE)
        return "`" + ("..." if lo else "") + text + ("..." if len(b) > hi else "") + "`"

    return (f"the stored bytes are not the form ckptkit committed (canonical JSON: no whitespace, UTF-8 without \\u "
            f"escapes, each number in one spelling, no trailing newline): they differ at "
            f"byte {at}, stored {excerpt(raw)}, committed form {excerpt(canonical)}; the manifest was edited after it "
            "was committed")  # fmt: skip


def _reject_constant(name: str) -> Any:
    raise ManifestError("manifest", f"{name} is not standard JSON: store NaN and infinity as strings")


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (and {err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "; ".join(parts) + more


def json_schema() -> dict[str, Any]:
    """The JSON schema of the manifest (published as ``docs/manifest.schema.json``)."""
    return Manifest.model_json_schema(mode="serialization")

