"""Sweep report: the page that compares the methods of one sweep, read back from MLflow.

Test accuracy vs compression, vs MACs reduction and vs measured CPU latency (``report_figure``), the best method at
each requested ratio, and the table of cells (dataset, model, method, requested compression): mean ± std over seeds
with their count, collapsed and failed runs marked. Logged on the sweep's parent run under ``report/``; the parent
run's description names the best method per ratio and links the report, and so does the experiment's description
(the latest sweep). ``prunelab-report`` rebuilds it for the latest sweep or ``--sweep-id ID``, into
``outputs/reports/<sweep id>/``.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from prunelab.collapse import TAG as COLLAPSED_TAG
from prunelab.tracking.server import ui
from prunelab.tracking.sweeps import report_figure
from prunelab.tracking.sweeps.sweep import KIND_TAG

CELL = ["dataset", "model", "method", "compression_target"]
_METRICS = (
    "test_acc",
    "dense_test_acc",
    "acc_drop",
    "compression",
    "compression_compacted",
    "macs_reduction",
    "latency_cpu_b1_ms",
    "latency_cpu_b1_iqr_ms",
    "speedup_cpu_b1",
)


@dataclass
class Report:
    table: pd.DataFrame
    markdown: str
    failed: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def load_runs(uri: str, experiment: str, sweep_id: str | None = None) -> pd.DataFrame:
    """Child runs (finished and failed) as one row each, with the params, metrics and tags the report needs."""
    mlflow.set_tracking_uri(uri)
    filter_string = f"tags.sweep_id = '{sweep_id}'" if sweep_id else ""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="pandas")
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "status", *CELL, "seed", "collapsed", *_METRICS])
    kind = runs.get(f"tags.{KIND_TAG}", pd.Series(index=runs.index, dtype=object))
    runs = runs[kind.ne("sweep")]
    out = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"]})
    for key in ("dataset", "model", "method", "granularity", "seed", "compression_target"):
        out[key] = runs.get(f"params.{key}")
    out["compression_target"] = pd.to_numeric(out["compression_target"], errors="coerce")
    granular = out["granularity"].fillna("weight")
    # a method's line in the report: its name, plus the granularity when structured, plus "macs" when the ratio is one
    # of MACs (pruning.target=macs: another question than the same ratio of weights)
    macs = runs.get("params.pruning.target", pd.Series(index=runs.index, dtype=object)).eq("macs")
    kind = granular.where(~macs, granular + ", macs")
    out["method"] = out["method"].where(granular.isin(["weight", "none"]) & ~macs, out["method"] + " (" + kind + ")")
    for name in _METRICS:
        out[name] = runs.get(f"metrics.{name}", np.nan)
    out["collapsed"] = runs.get(f"tags.{COLLAPSED_TAG}", pd.Series(index=runs.index, dtype=object)).eq("true")
    out["failure_reason"] = runs.get("tags.failure_reason")
    return out.reset_index(drop=True)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (dataset, model, method, requested compression): mean ± std over finished seeds (``seeds``
    of them, ``collapsed`` of which collapsed), counts of failed runs. Cells of each dataset's method × ratio grid
    without a finished run are kept, with status ``FAILED`` or ``missing``."""
    finished = runs[runs["status"] == "FINISHED"]
    agg = finished.groupby(CELL).agg(
        test_acc=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        seeds=("test_acc", "size"),
        collapsed=("collapsed", "sum"),
        compression=("compression", "mean"),
        macs_reduction=("macs_reduction", "mean"),
        latency_cpu_b1_ms=("latency_cpu_b1_ms", "median"),
        latency_cpu_b1_iqr_ms=("latency_cpu_b1_iqr_ms", "median"),  # a run's spread over its timing blocks
    )
    failed = runs[runs["status"] != "FINISHED"].groupby(CELL).size().rename("failed")
    grid = []
    for (dataset, model), group in runs.groupby(["dataset", "model"]):
        for method in group["method"].dropna().unique():
            for ratio in group["compression_target"].dropna().unique():
                grid.append((dataset, model, method, ratio))
    index = pd.MultiIndex.from_tuples(sorted(set(grid)), names=CELL)
    table = agg.reindex(index).join(failed).reset_index()
    for count in ("seeds", "failed", "collapsed"):
        table[count] = table[count].fillna(0).astype(int)
    table["test_acc_std"] = table["test_acc_std"].where(table["seeds"] > 1)  # no spread from one seed
    table["status"] = np.select(
        [table["collapsed"] > 0, table["seeds"] > 0, table["failed"] > 0], ["collapsed", "ok", "FAILED"], "missing"
    )
    return table.sort_values(CELL).reset_index(drop=True)


def dense_baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """Dense test accuracy per (dataset, model): mean and std over seeds (one dense model per seed) and their count."""
    finished = runs[(runs["status"] == "FINISHED") & runs["dense_test_acc"].notna()]
    per_seed = finished.groupby(["dataset", "model", "seed"])["dense_test_acc"].first()
    return per_seed.groupby(["dataset", "model"]).agg(dense="mean", dense_std="std", dense_seeds="size").reset_index()


def pareto(x: np.ndarray, y: np.ndarray, x_larger_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats on both x and accuracy y."""
    sign = 1.0 if x_larger_better else -1.0
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        better = (sign * x >= sign * x[i]) & (y >= y[i]) & ((sign * x > sign * x[i]) | (y > y[i]))
        keep[i] = not better.any()
    return keep & np.isfinite(x) & np.isfinite(y)


def best_per_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """The best method at each (dataset, model, requested ratio) by mean test accuracy, the runner-up and the margin;
    cells with a collapsed run are left out. ``clear`` says whether the margin exceeds the noise, ``sqrt(std₁² +
    std₂²)`` of the two cells (unknown, so not clear, with one seed)."""
    ok = table[(table["seeds"] > 0) & (table["collapsed"] == 0) & table["test_acc"].notna()]
    rows = []
    for (dataset, model, ratio), cells in ok.groupby(["dataset", "model", "compression_target"]):
        ranked = cells.sort_values(["test_acc", "method"], ascending=[False, True])
        best = ranked.iloc[0]
        row = {
            "dataset": dataset,
            "model": model,
            "compression_target": ratio,
            "best": best["method"],
            "test_acc": best["test_acc"],
            "test_acc_std": best["test_acc_std"],
            "seeds": best["seeds"],
            "runner_up": np.nan,
            "margin": np.nan,
            "clear": False,
        }
        if len(ranked) > 1:
            second = ranked.iloc[1]
            noise = np.hypot(best["test_acc_std"], second["test_acc_std"])
            row.update(
                runner_up=second["method"],
                margin=best["test_acc"] - second["test_acc"],
                clear=bool(np.isfinite(noise) and best["test_acc"] - second["test_acc"] > noise),
            )
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "model",
            "compression_target",
            "best",
            "test_acc",
            "test_acc_std",
            "seeds",
            "runner_up",
            "margin",
            "clear",
        ],
    )


def display_best(best: pd.DataFrame) -> pd.DataFrame:
    """:func:`best_per_ratio` as a person reads it."""
    rows = []
    for r in best.itertuples():
        alone = pd.isna(r.runner_up)
        margin = "—" if alone else f"{r.margin:+.2f}" + ("" if r.clear else " (within noise)")
        rows.append(
            [
                f"{r.dataset} / {r.model}",
                f"{r.compression_target:g}×",
                r.best,
                _accuracy(r),
                "—" if alone else r.runner_up,
                margin,
            ]
        )
    return pd.DataFrame(
        rows, columns=["data / model", "ratio", "best method", "test acc (%)", "runner-up", "margin (pts)"]
    )


def best_line(best: pd.DataFrame) -> str:
    """:func:`best_per_ratio` in one line: ``digits/lenet300: 2× magnitude · 4× admm (within noise)``."""
    parts = []
    for (dataset, model), cells in best.groupby(["dataset", "model"], sort=True):
        picks = [
            f"{r.compression_target:g}× {r.best}" + ("" if r.clear or pd.isna(r.runner_up) else " (within noise)")
            for r in cells.sort_values("compression_target").itertuples()
        ]
        parts.append(f"{dataset}/{model}: " + " · ".join(picks))
    return "; ".join(parts)


def parent_description(best: pd.DataFrame, experiment_id: str, parent_run_id: str) -> str:
    """The sweep's parent-run description: the best method per ratio in one line of plain text (what the run list's
    Description column and the folded description show), a link to the report, then the table of the best methods
    with the runner-up and the margin."""
    link = (
        f"[test accuracy vs compression, MACs and latency, per method]"
        f"({ui.report_path(experiment_id, parent_run_id)}) (artifact `report/accuracy.html`)"
    )
    if best.empty:
        return f"No finished run without a collapse yet. Report: {link}"
    return "\n".join(
        [
            f"Best method per ratio — {best_line(best)}",
            "",
            f"**Report:** {link}",
            "",
            "Mean test accuracy over seeds; cells with a collapsed run left out:",
            "",
            _markdown(display_best(best)),
        ]
    )


def _markdown(shown: pd.DataFrame) -> str:
    left = ("dataset", "model", "method", "status", "data / model", "best method", "runner-up")
    align = ["---" if c in left else "---:" for c in shown.columns]
    lines = ["| " + " | ".join(shown.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def _accuracy(r) -> str:
    if not r.seeds:
        return "—"
    return f"{r.test_acc:.2f} ± {r.test_acc_std:.2f}" if r.seeds > 1 else f"{r.test_acc:.2f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as a person reads it (formatted strings), for the markdown and the HTML page."""
    num = lambda v, f: format(v, f) if np.isfinite(v) else "—"  # noqa: E731
    rows = []
    for r in table.itertuples():
        notes = [f"{r.collapsed} of {r.seeds} collapsed"] if r.collapsed else []
        notes += [f"{r.failed} failed"] if r.failed else []
        rows.append(
            [
                r.dataset,
                r.model,
                r.method,
                f"{r.compression_target:g}",
                _accuracy(r),
                num(r.compression, ".2f"),
                num(r.macs_reduction, ".2f"),
                num(r.latency_cpu_b1_ms, ".3f"),
                str(r.seeds),
                r.status + (f" ({', '.join(notes)})" if notes else ""),
            ]
        )
    return pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "model",
            "method",
            "compression",
            "test acc (%)",
            "achieved",
            "MACs red.",
            "CPU b1 (ms)",
            "seeds",
            "status",
        ],
    )


def to_markdown(table: pd.DataFrame) -> str:
    return _markdown(display_table(table))


def build(
    uri: str,
    experiment: str,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    out_dir: str | Path | None = None,
) -> Report:
    """Read the runs, write the report files (to ``out_dir`` or a temporary folder) and log them to
    ``parent_run_id`` when given."""
    runs = load_runs(uri, experiment, sweep_id)
    table = summarize(runs)
    markdown = to_markdown(table)
    failed = [
        f"{r.method}@{r.compression_target:g}×/{r.dataset}/seed {r.seed}"
        for r in runs.itertuples()
        if r.status != "FINISHED"
    ]
    title = f"prunelab sweep {sweep_id}" if sweep_id else f"prunelab experiment {experiment}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        panels = report_figure.panels(table, dense_baselines(runs), pareto)
        png = report_figure.to_matplotlib(panels, title)
        png.savefig(folder / "accuracy.png", dpi=report_figure.PNG_DPI)
        best = best_per_ratio(table)
        report_figure.write_html(panels, title, display_table(table), folder / "accuracy.html", display_best(best))
        (folder / "table.md").write_text(markdown + "\n")
        table.to_json(folder / "table.json", orient="split", index=False)
        if parent_run_id:
            client = mlflow.MlflowClient(tracking_uri=uri)
            client.log_figure(parent_run_id, png, "report/accuracy.png", save_kwargs={"dpi": report_figure.PNG_DPI})
            logged = {a.path for a in client.list_artifacts(parent_run_id, "report")}
            if "report/table.json" not in logged:  # log_table appends to an existing table: rebuilds replace it
                client.log_table(parent_run_id, table, "report/table.json")
            for name in ("accuracy.html", "table.md") + (("table.json",) if "report/table.json" in logged else ()):
                client.log_artifact(parent_run_id, str(folder / name), "report")
            client.log_metric(parent_run_id, "sweep_runs_finished", int((runs["status"] == "FINISHED").sum()))
            client.log_metric(parent_run_id, "sweep_runs_failed", len(failed))
            client.log_metric(parent_run_id, "sweep_runs_collapsed", int(runs["collapsed"].sum()))
            _describe(client, parent_run_id, sweep_id, best)
        report_figure.close(png)
        files = sorted(folder.iterdir()) if out_dir else []
        return Report(table, markdown, failed, files)


def _describe(client: mlflow.MlflowClient, parent_run_id: str, sweep_id: str | None, best: pd.DataFrame) -> None:
    """Where the eye lands: the parent run's description links the report and names the best method per ratio;
    the experiment's description links the latest sweep's report while it is prunelab's own (a person's is kept)."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    client.set_tag(parent_run_id, ui.DESCRIPTION_TAG, parent_description(best, experiment_id, parent_run_id))
    if ui.is_own_description(client.get_experiment(experiment_id).tags.get(ui.DESCRIPTION_TAG)):
        description = ui.experiment_description(
            experiment_id,
            sweep_id or parent_run_id,
            parent_run_id,
            f"best per ratio: {best_line(best)}" if not best.empty else "",
        )
        client.set_experiment_tag(experiment_id, ui.DESCRIPTION_TAG, description)


def find_sweep(uri: str, experiment: str, sweep_id: str | None) -> tuple[str, str]:
    """(sweep id, parent run id) of ``sweep_id``, or of the latest sweep of the experiment when ``None``."""
    mlflow.set_tracking_uri(uri)
    condition = f"tags.`{KIND_TAG}` = 'sweep'" + (f" and tags.sweep_id = '{sweep_id}'" if sweep_id else "")
    parents = mlflow.search_runs(
        experiment_names=[experiment],
        output_format="list",
        filter_string=condition,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        which = f"sweep_id={sweep_id!r}" if sweep_id else "sweep"
        raise SystemExit(f"no {which} in experiment {experiment!r} at {uri}")
    return parents[0].data.tags["sweep_id"], parents[0].info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prunelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-id", help="the sweep to report on (default: the latest sweep of the experiment)")
    parser.add_argument("--experiment", default="prunelab", help="MLflow experiment name (default: prunelab)")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db"
    )
    parser.add_argument("--out", default=None, help="folder for the files (default: outputs/reports/<sweep id>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the files to the sweep's parent run")
    args = parser.parse_args(argv)
    from prunelab.tracking.server.store import tracking_uri

    uri = tracking_uri(args.tracking_uri, "outputs")
    sweep_id, parent = find_sweep(uri, args.experiment, args.sweep_id)
    out = Path(args.out or Path("outputs") / "reports" / sweep_id)
    report = build(uri, args.experiment, sweep_id, None if args.no_log else parent, out)
    print(report.markdown)
    print(f"\nsweep {sweep_id} (parent run {parent}); files in {out}: {', '.join(f.name for f in report.files)}")


if __name__ == "__main__":
    main()
