"""Repair a SQLite MLflow store left half-migrated (leftover ``_alembic_tmp_*`` tables, a schema version between
two revisions), as parallel first use of a fresh file did before :func:`store.store_lock` existed.

A half-applied migration cannot be resumed reliably (SQLite runs most DDL outside the transaction), so the store is
rebuilt: a copy of the file is kept, a fresh store is created at MLflow's current schema, and every row of every
table is copied into it (columns matched by name; a table whose rename was interrupted is read from its
``_alembic_tmp_`` copy). The rebuilt file replaces the old one only when every row arrived.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from prunelab.tracking.server.store import TMP_TABLE_PREFIX, schema_problems, sqlite_path, store_lock

log = logging.getLogger(__name__)


@dataclass
class Repair:
    path: Path
    problems: list[str]
    backup: Path | None = None
    rows: dict[str, int] = field(default_factory=dict)  # rows copied per table


def _tables(con: sqlite3.Connection, schema: str = "main") -> set[str]:
    return {r[0] for r in con.execute(f"SELECT name FROM {schema}.sqlite_master WHERE type='table'")}


def _columns(con: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [r[1] for r in con.execute(f'PRAGMA {schema}.table_info("{table}")')]


def _create_fresh(path: Path) -> None:
    """An empty store at MLflow's current schema (tables and migrations, no rows)."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(f"sqlite:///{path}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()


def _copy_rows(fresh: Path, old: Path) -> dict[str, int]:
    """Copy every row of ``old`` into the empty tables of ``fresh``; returns rows per table."""
    con = sqlite3.connect(fresh)
    try:
        con.execute("ATTACH DATABASE ? AS old", (str(old),))
        old_tables = _tables(con, "old")
        copied = {}
        for table in sorted(_tables(con) - {"alembic_version"}):
            source = table if table in old_tables else TMP_TABLE_PREFIX + table
            if source not in old_tables:
                continue  # added by a migration the old file never reached: stays empty
            cols = [c for c in _columns(con, "main", table) if c in set(_columns(con, "old", source))]
            names = ", ".join(f'"{c}"' for c in cols)
            con.execute(f'DELETE FROM main."{table}"')
            con.execute(f'INSERT INTO main."{table}" ({names}) SELECT {names} FROM old."{source}"')
            copied[table] = con.execute(f'SELECT count(*) FROM main."{table}"').fetchone()[0]
            expected = con.execute(f'SELECT count(*) FROM old."{source}"').fetchone()[0]
            if copied[table] != expected:
                raise RuntimeError(f"table {table}: {copied[table]} of {expected} rows copied")
        con.commit()
        return copied
    finally:
        con.close()


def repair_store(uri: str) -> Repair:
    """Rebuild the SQLite store of ``uri`` if it is broken (see the module docstring); no-op on a sound store."""
    path = sqlite_path(uri)
    if path is None:
        raise ValueError(
            f"--tracking-uri {uri}: only SQLite stores are repaired here; a PostgreSQL or MySQL "
            "database migrates in transactions: back it up and run `mlflow db upgrade <uri>`"
        )
    with store_lock(uri):
        problems = schema_problems(path)
        if not problems:
            return Repair(path, [])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.broken-{stamp}")
        shutil.copy2(path, backup)
        fresh = path.with_name(f"{path.name}.repair-{stamp}")
        try:
            _create_fresh(fresh)
            rows = _copy_rows(fresh, backup)
            if schema_problems(fresh):
                raise RuntimeError(f"rebuilt store still has problems: {schema_problems(fresh)}")
            os.replace(fresh, path)
        finally:
            fresh.unlink(missing_ok=True)
        log.info("repaired %s (copy of the broken file: %s)", path, backup)
        return Repair(path, problems, backup, rows)
