"""The catalog at scale: indexing 100,000 manifests of 1,000 repositories, the lineage queries on the full index,
and a sync that finds nothing new.

The manifests are real ckptkit manifests (``schema.build_manifest``, written with ``schema.dump_manifest``, so the
indexer verifies each one's id as it would a saved one), generated in this process and written straight into the
repository layout (``checkpoints/<name>.json``; the pruned ones as ``lineage/<id>.json``). They have no stored
objects, so the figures are about indexing manifests, not hashing tensors. The repositories come in families of
10: a base run (init, train, a crash and ``resume``, a ``continue`` on added data) and 9 fine-tunes, each a
``transfer`` from a base checkpoint in another repository followed by its own train, resume and continue edges; a
fifth of each chain is pruned to ``lineage/``.

* ``catalog_index_per_s``: manifests indexed per second by ``Catalog.add_all`` of every repository into a fresh
  SQLite catalog (``hash_tensors=False``), from local disk, with its default worker processes (one per CPU, at
  most 8; ``--workers N``). The rows below it: the CPU time it took, and the same indexing in one process
  (``Catalog.add`` of each repository in turn, into another fresh catalog; ``--no-serial`` skips it).
* ``catalog_query_ms``: the slower median of ``where_data`` (a fine-tune's dataset: its repository's checkpoints)
  and ``descendants`` (of a base checkpoint 60% along its chain: the rest of the chain and the fine-tunes
  transferred from there on) on the full index. The rows also show the wide queries: ``where_data`` of a base
  dataset and ``descendants`` of a base's first checkpoint (its whole family, 1,000 checkpoints).
* ``catalog_query_ms_pg``: the same on PostgreSQL, with the SQLite rows copied over (``COPY``) when
  tests/pgserver.py can start a server here; else n/a, with why.
* ``catalog_sync_noop_s``: ``Catalog.sync()`` over every repository with nothing new (the same workers).

Targets: index >= 2,000 manifests/s; queries <= 50 ms on SQLite, <= 100 ms on PostgreSQL.

Run: ``.venv/bin/python bench/catalog.py`` (``--json`` for one JSON object; ``--manifests N --repos R`` for
another size; R a multiple of 10 is not needed, families just get smaller).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, check_common, emit, format_table, load_note, log, machine, parser, scratch_dir, verdict

TARGETS: Targets = {"catalog_index_per_s": (">=", 2000.0), "catalog_query_ms": ("<=", 50.0),
                    "catalog_query_ms_pg": ("<=", 100.0)}  # fmt: skip
FAMILY = 10  # repositories per family: a base run and its fine-tunes
ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path, manifests: int, repos: int) -> dict[str, Any]:
    """Write ``manifests`` manifests into ``repos`` repositories under ``root``; what the queries ask about."""
    from ckptkit.schema import DataSegment, Environment, Lineage, Parent, Progress, build_manifest, dump_manifest

    env = Environment(ckptkit="0.bench", torch="2.0", python="3.12", platform="linux", host="bench")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    clock = 0
    per_repo = [manifests // repos + (1 if i < manifests % repos else 0) for i in range(repos)]
    bases: dict[int, list[tuple[str, str]]] = {}  # family -> [(id, name)] of the base's checkpoints
    probe: dict[str, Any] = {}
    for i in range(repos):
        fam, member = divmod(i, FAMILY)
        path = root / f"repo-{i:04d}"
        (path / "checkpoints").mkdir(parents=True)
        (path / "lineage").mkdir()
        (path / "objects").mkdir()
        n = per_repo[i]
        base = member == 0 or fam not in bases
        data = [DataSegment(name=f"pretrain-{fam}", fingerprint=f"fp-pretrain-{fam}", samples_consumed=0)]
        if not base:
            data.append(DataSegment(name=f"task-{i}", fingerprint=f"fp-task-{i}", samples_consumed=0))
        chain: list[tuple[str, str]] = []
        prev: tuple[str, str] | None = None
        run = f"run-{i}-0"
        resume_at, continue_at = max(1, int(n * 0.4)), max(2, int(n * 0.7))
        for k in range(n):
            step = k + 1
            if k == 0 and not base:
                src_id, src_name = bases[fam][min(len(bases[fam]) - 1, member * 7 % max(1, len(bases[fam])))]
                lineage = Lineage(relation="transfer", run=run, parents=[Parent(
                    id=src_id, relation="transfer", name=src_name, url=str(root / f"repo-{fam * FAMILY:04d}"))])
            elif prev is None:
                lineage = Lineage(relation="init", run=run)
            elif k == resume_at:
                run = f"run-{i}-1"
                lineage = Lineage(relation="resume", run=run, parents=[Parent(id=prev[0], relation="resume",
                                                                              name=prev[1])])
            elif k == continue_at:
                run = f"run-{i}-2"
                data = [*data, DataSegment(name=f"extra-{i}", samples_consumed=0)]
                lineage = Lineage(relation="continue", run=run, parents=[Parent(id=prev[0], relation="continue",
                                                                                name=prev[1])])
            else:
                lineage = Lineage(relation="train", run=run, parents=[Parent(id=prev[0], relation="train",
                                                                             name=prev[1])])
            clock += 1
            name = f"step-{step:08d}"
            m = build_manifest(name=name, created_at=t0 + timedelta(seconds=clock), environment=env,
                               progress=Progress(epoch=step // 10, global_step=step, samples_seen=step * 256),
                               data=[d.model_copy(update={"samples_consumed": step * 256}) for d in data],
                               hparams={"lr": 1e-3 if base else 1e-4, "batch_size": 256, "repo": i},
                               metrics={"loss": 1.0 / step, "val_loss": 1.2 / step}, lineage=lineage)  # fmt: skip
            raw = dump_manifest(m)
            pruned = k < n - 3 and step % 5 == 0
            target = path / "lineage" / f"{m.id}.json" if pruned else path / "checkpoints" / f"{name}.json"
            target.write_bytes(raw)
            chain.append((m.id, name))
            prev = (m.id, name)
        if base:
            bases[fam] = chain
            probe.setdefault("base_checkpoint", chain[int(len(chain) * 0.6)][0])
            probe.setdefault("base_root", chain[0][0])
            probe.setdefault("base_data", f"pretrain-{fam}")
        else:
            probe.setdefault("task_data", f"task-{i}")
    return probe


def median_ms(fn: Any, runs: int) -> tuple[float, int]:
    fn()  # warm: the first call compiles the statements
    times, n = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        n = len(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, n


def queries(cat: Any, probe: dict[str, Any], runs: int) -> dict[str, tuple[float, int]]:
    task = probe.get("task_data", probe["base_data"])  # one repository: no fine-tune
    return {"where_data": median_ms(lambda: cat.where_data(task), runs),
            "descendants": median_ms(lambda: cat.descendants(probe["base_checkpoint"]), runs),
            "where_data_wide": median_ms(lambda: cat.where_data(probe["base_data"]), runs),
            "descendants_wide": median_ms(lambda: cat.descendants(probe["base_root"]), runs)}  # fmt: skip


def load_pgserver() -> Any:
    spec = importlib.util.spec_from_file_location("ckptkit_bench_pgserver", ROOT / "tests" / "pgserver.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_to_postgres(sqlite_url: str, pg_url: str) -> None:
    """Every row of the SQLite catalog into a fresh PostgreSQL catalog, with COPY (the schema by the migrations)."""
    from sqlalchemy import select

    from ckptkit.catalog import Catalog
    from ckptkit.catalog import tables as t

    src, dst = Catalog(sqlite_url), Catalog(pg_url)
    try:
        raw = dst.engine.raw_connection()
        try:
            cur = raw.cursor()
            with src.engine.connect() as conn:
                for table in t.metadata.sorted_tables:
                    cols = [c.name for c in table.columns]
                    with cur.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as cp:  # type: ignore[attr-defined]
                        for row in conn.execute(select(table)):
                            cp.write_row(tuple(row))
            cur.execute("SELECT setval('repositories_id_seq', (SELECT max(id) FROM repositories))")
            raw.commit()
            cur.execute("ANALYZE")
            raw.commit()
        finally:
            raw.close()
    finally:
        src.close()
        dst.close()


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(runs=20)
    p.add_argument("--manifests", type=int, default=100_000, help="manifests in all (default 100,000)")
    p.add_argument("--repos", type=int, default=1000, help="repositories (default 1,000)")
    p.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL part")
    p.add_argument("--workers", type=int, default=None, help="worker processes of add_all and sync (default: one per "
                   "CPU, at most 8)")
    p.add_argument("--no-serial", action="store_true", help="skip indexing again in one process (Catalog.add)")
    args = p.parse_args()
    check_common(p, args)
    if args.repos < 1 or args.manifests < args.repos:
        p.error("--repos must be positive and --manifests at least --repos")
    from ckptkit.catalog import Catalog
    from ckptkit.catalog.pool import default_workers

    load_before = os.getloadavg()
    result: dict[str, Any] = {"manifests": args.manifests, "repos": args.repos, "runs": args.runs}
    with scratch_dir(args.dir, "catalog-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        probe = generate(root / "repos", args.manifests, args.repos)
        result["generate_s"] = time.perf_counter() - start
        log(f"generated {args.manifests} manifests in {result['generate_s']:.1f} s")
        db = str(root / "catalog.db")
        repos = sorted((root / "repos").iterdir())
        if not args.no_serial:  # one process, one repository after another: what Catalog.add does
            with Catalog(str(root / "serial.db")) as one:
                start, cpu = time.perf_counter(), time.process_time()
                indexed = 0
                for r in repos:
                    report = one.add(r, hash_tensors=False)
                    if report.rejected:
                        raise SystemExit(f"bench/catalog.py: {r}: not indexed: {report.rejected[:3]}")
                    indexed += len(report.indexed)
                serial_s = time.perf_counter() - start
                result["catalog_index_serial_cpu_per_s"] = args.manifests / (time.process_time() - cpu)
            if indexed != args.manifests:
                raise SystemExit(f"bench/catalog.py: indexed {indexed} of {args.manifests} manifests in one process")
            result["catalog_index_serial_s"] = serial_s
            result["catalog_index_serial_per_s"] = args.manifests / serial_s
            log(f"indexed in one process in {serial_s:.1f} s")
        with Catalog(db) as cat:
            before = os.times()
            start = time.perf_counter()
            reports = cat.add_all(repos, hash_tensors=False, workers=args.workers)
            index_s = time.perf_counter() - start
            after = os.times()
            bad = [r for r in reports if r.rejected]
            if bad:
                raise SystemExit(f"bench/catalog.py: {bad[0].repo}: not indexed: {bad[0].rejected[:3]}")
            indexed = sum(len(r.indexed) for r in reports)
            cpu_s = sum(getattr(after, k) - getattr(before, k)
                        for k in ("user", "system", "children_user", "children_system"))  # fmt: skip
            result["catalog_index_cpu_per_s"] = args.manifests / cpu_s
            result["workers"] = args.workers if args.workers is not None else default_workers(len(repos))
            if indexed != args.manifests:
                raise SystemExit(f"bench/catalog.py: indexed {indexed} of {args.manifests} manifests")
            result["catalog_index_s"] = index_s
            result["catalog_index_per_s"] = args.manifests / index_s
            log(f"indexed by add_all ({result['workers']} workers) in {index_s:.1f} s")
            q = queries(cat, probe, args.runs)
            result["queries"] = {k: {"ms": ms, "results": n} for k, (ms, n) in q.items()}
            result["catalog_query_ms"] = max(q["where_data"][0], q["descendants"][0])
            syncs = []
            for _ in range(max(1, min(args.runs, 3))):
                start = time.perf_counter()
                reports = cat.sync(hash_tensors=False, workers=args.workers)
                syncs.append(time.perf_counter() - start)
                if any(r.indexed or r.rejected for r in reports):
                    raise SystemExit("bench/catalog.py: a sync with nothing new indexed or rejected something")
            result["catalog_sync_noop_s"] = statistics.median(syncs)
            log(f"no-op sync {result['catalog_sync_noop_s']:.2f} s")
        result["postgresql"] = "n/a"
        if args.no_postgres:
            result["postgresql_why"] = "--no-postgres"
        else:
            try:
                pgserver = load_pgserver()
                server = pgserver.PgServer.start()
            except Exception as err:  # PgUnavailable, or no psycopg: the SQLite part stands on its own
                result["postgresql_why"] = f"{type(err).__name__}: {str(err)[:300]}"
            else:
                try:
                    url = server.create_database("bench")
                    start = time.perf_counter()
                    copy_to_postgres(db, url)
                    result["pg_copy_s"] = time.perf_counter() - start
                    with Catalog(url) as pg:
                        qpg = queries(pg, probe, args.runs)
                    result["postgresql"] = "measured"
                    result["queries_pg"] = {k: {"ms": ms, "results": n} for k, (ms, n) in qpg.items()}
                    result["catalog_query_ms_pg"] = max(qpg["where_data"][0], qpg["descendants"][0])
                finally:
                    server.stop()
    measured = {k: v for k, v in TARGETS.items() if k in result}
    result["targets"] = {k: list(v) for k, v in measured.items()}
    result["pass"] = {k: verdict(measured, k, result[k])[1] == "PASS" for k in measured}
    result["machine"] = machine(load_before)

    def table() -> str:
        rows = []
        t, ok = verdict(measured, "catalog_index_per_s", result["catalog_index_per_s"])
        rate = f"{result['catalog_index_per_s']:.0f}"
        rows.append((f"catalog_index_per_s ({args.manifests} manifests / s by add_all, {result['workers']} "
                     "workers; total s)",
                     f"{result['catalog_index_s']:.3f}", "-", rate, t, ok))  # fmt: skip
        rows.append(("  per second of CPU time (this process and its workers)", "-", "-",
                     f"{result['catalog_index_cpu_per_s']:.0f}", "-", "-"))  # fmt: skip
        if "catalog_index_serial_per_s" in result:
            rows.append(("  in one process (Catalog.add of each in turn)", f"{result['catalog_index_serial_s']:.3f}",
                         "-", f"{result['catalog_index_serial_per_s']:.0f}", "-", "-"))  # fmt: skip
            rows.append(("    per second of its CPU time", "-", "-",
                         f"{result['catalog_index_serial_cpu_per_s']:.0f}", "-", "-"))  # fmt: skip
        for suffix, key in (("", "queries"), (" pg", "queries_pg")):
            for name, v in result.get(key, {}).items():
                rows.append((f"  {name}{suffix} ({v['results']} results, ms)", f"{v['ms'] / 1000:.4f}", "-",
                             f"{v['ms']:.1f}", "-", "-"))  # fmt: skip
            total = "catalog_query_ms" + ("_pg" if suffix else "")
            if total in result:
                t, ok = verdict(measured, total, result[total])
                rows.append((f"{total} (slower of where_data, descendants)", f"{result[total] / 1000:.4f}", "-",
                             f"{result[total]:.1f}", t, ok))  # fmt: skip
        rows.append((f"catalog_sync_noop_s ({args.repos} repositories)", f"{result['catalog_sync_noop_s']:.3f}", "-",
                     "-", "-", "-"))  # fmt: skip
        pg_note = "" if result["postgresql"] == "measured" else f"; PostgreSQL n/a: {result['postgresql_why']}"
        note = (f"catalog: {args.manifests} manifests in {args.repos} repositories (generated in "
                f"{result['generate_s']:.1f} s), SQLite on local disk, query medians of {args.runs}; "
                f"{load_note(load_before)}{pg_note}")  # fmt: skip
        return format_table(note, rows)

    emit(result, args.json, table)


if __name__ == "__main__":
    main()
