"""``prunelab-runs``: look after the tracking store.

    prunelab-runs reconcile [--dry-run]   end as KILLED the RUNNING runs whose process on this host is gone
    prunelab-runs check-store             say whether the store is sound (exit 1 if not)
    prunelab-runs repair-store            rebuild a SQLite store left half-migrated (keeps a copy first)

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``$PRUNELAB_ROOT/outputs/mlflow.db``
(``PRUNELAB_ROOT`` defaults to the current folder), as for ``prunelab-train``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from prunelab.tracking.runs.lifecycle import reconcile
from prunelab.tracking.server.repair import repair_store
from prunelab.tracking.server.store import StoreBrokenError, check_server, check_store, tracking_uri


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunelab-runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds a server may take to answer")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("reconcile", help="end as KILLED the RUNNING runs whose process is gone")
    rec.add_argument("--experiment", action="append", help="experiment name (repeatable; default: all)")
    rec.add_argument("--dry-run", action="store_true", help="list them without changing anything")
    commands.add_parser("check-store", help="exit 1 when the store is half-migrated")
    commands.add_parser("repair-store", help="rebuild a half-migrated SQLite store (a copy is kept)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    uri = tracking_uri(args.tracking_uri, Path(os.environ.get("PRUNELAB_ROOT", ".")) / "outputs")
    check_server(uri, args.connect_timeout)
    if args.command == "repair-store":
        result = repair_store(uri)
        if not result.problems:
            print(f"{uri}: sound, nothing to repair")
        else:
            print(
                f"{uri}: repaired ({'; '.join(result.problems)})\n  copy of the broken file: {result.backup}\n"
                f"  rows kept: {sum(result.rows.values())} ({result.rows.get('runs', 0)} runs, "
                f"{result.rows.get('experiments', 0)} experiments)"
            )
        return 0
    try:
        check_store(uri)
    except StoreBrokenError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "check-store":
        print(f"{uri}: sound")
        return 0
    ids = None
    if args.experiment:
        client = MlflowClient(tracking_uri=uri)
        ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in args.experiment) if e]
    orphans = reconcile(uri, ids, dry_run=args.dry_run)
    verb = "would be marked" if args.dry_run else "marked"
    for o in orphans:
        print(f"{o.run_id}  {o.run_name}  (pid {o.pid} gone)  {verb} KILLED")
    print(f"{len(orphans)} run(s) {verb} KILLED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
