"""Sweep report: accuracy vs compression, vs MACs reduction and vs measured CPU latency, read back from MLflow.

One line per method (mean ± std across seeds), one column of panels per dataset/model, the Pareto front marked; as
PNG, as an interactive HTML page, and as CSV/markdown tables. ``prunelab-report --sweep-id ID`` (logs the files to
the sweep's parent run) or ``--experiment NAME`` (every run of the experiment).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from prunelab.tracking.sweep import KIND_TAG

# x-axis metric, label, whether larger x is better
AXES = (
    ("compression", "compression (×)", True),
    ("macs_reduction", "MACs reduction (×)", True),
    ("latency_cpu_b1_ms", "CPU latency, batch 1 (ms)", False),
)
CELL = ["dataset", "model", "method", "compression_target"]


@dataclass
class Report:
    table: pd.DataFrame
    markdown: str
    failed: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def load_runs(uri: str, experiment: str, sweep_id: str | None = None) -> pd.DataFrame:
    """Child runs (finished and failed) as one row each, with the params and metrics the report needs."""
    mlflow.set_tracking_uri(uri)
    filter_string = f"tags.sweep_id = '{sweep_id}'" if sweep_id else ""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="pandas")
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "status", *CELL, "seed", "test_acc"])
    kind = runs.get(f"tags.{KIND_TAG}", pd.Series(index=runs.index, dtype=object))
    runs = runs[kind.ne("sweep")]
    out = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"]})
    for key in ("dataset", "model", "method", "granularity", "seed", "compression_target"):
        out[key] = runs.get(f"params.{key}")
    out["compression_target"] = pd.to_numeric(out["compression_target"], errors="coerce")
    granular = out["granularity"].fillna("weight")
    # a method's line in the report: its name, plus the granularity when structured
    out["method"] = out["method"].where(granular.isin(["weight", "none"]), out["method"] + " (" + granular + ")")
    for name in ("test_acc", "acc_drop", "compression", "macs_reduction", "latency_cpu_b1_ms", "speedup_cpu_b1"):
        out[name] = runs.get(f"metrics.{name}", np.nan)
    out["failure_reason"] = runs.get("tags.failure_reason")
    return out.reset_index(drop=True)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (dataset, model, method, requested compression): mean ± std over finished seeds, counts of
    finished and failed runs. Cells of the dataset's method × ratio grid that have no finished run are kept, marked."""
    finished = runs[runs["status"] == "FINISHED"]
    agg = finished.groupby(CELL).agg(
        test_acc=("test_acc", "mean"), test_acc_std=("test_acc", "std"), seeds=("test_acc", "size"),
        compression=("compression", "mean"), macs_reduction=("macs_reduction", "mean"),
        latency_cpu_b1_ms=("latency_cpu_b1_ms", "mean"),
    )
    failed = runs[runs["status"] != "FINISHED"].groupby(CELL).size().rename("failed")
    grid = []
    for (dataset, model), group in runs.groupby(["dataset", "model"]):
        for method in group["method"].dropna().unique():
            for ratio in group["compression_target"].dropna().unique():
                grid.append((dataset, model, method, ratio))
    index = pd.MultiIndex.from_tuples(sorted(set(grid)), names=CELL)
    table = agg.reindex(index).join(failed).reset_index()
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    table["failed"] = table["failed"].fillna(0).astype(int)
    table["test_acc_std"] = table["test_acc_std"].fillna(0.0).where(table["seeds"] > 0)
    table["status"] = np.where(table["seeds"] > 0, "ok", np.where(table["failed"] > 0, "FAILED", "missing"))
    return table.sort_values(CELL).reset_index(drop=True)


def pareto(x: np.ndarray, y: np.ndarray, x_larger_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats on both x and accuracy y."""
    sign = 1.0 if x_larger_better else -1.0
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        better = (sign * x >= sign * x[i]) & (y >= y[i]) & ((sign * x > sign * x[i]) | (y > y[i]))
        keep[i] = not better.any()
    return keep & np.isfinite(x) & np.isfinite(y)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| dataset | model | method | compression | test acc (%) | achieved | MACs red. | CPU b1 (ms) | seeds | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in table.itertuples():
        acc = f"{r.test_acc:.2f} ± {r.test_acc_std:.2f}" if r.seeds else "—"
        num = lambda v, f: format(v, f) if np.isfinite(v) else "—"  # noqa: E731
        lines.append(f"| {r.dataset} | {r.model} | {r.method} | {r.compression_target:g} | {acc} | "
                     f"{num(r.compression, '.2f')} | {num(r.macs_reduction, '.2f')} | {num(r.latency_cpu_b1_ms, '.3f')} "
                     f"| {r.seeds} | {r.status}{f' ({r.failed} failed)' if r.failed else ''} |")
    return "\n".join(lines)


def _panels(table: pd.DataFrame):
    ok = table[table["seeds"] > 0]
    for col, ((dataset, model), group) in enumerate(ok.groupby(["dataset", "model"])):
        for row, (metric, label, larger) in enumerate(AXES):
            yield row, col, f"{dataset} / {model}", metric, label, larger, group


def plot_png(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(table[table["seeds"] > 0].groupby(["dataset", "model"]).ngroups, 1)
    fig, axes = plt.subplots(len(AXES), cols, figsize=(5 * cols, 3.6 * len(AXES)), squeeze=False)
    for row, col, title, metric, label, larger, group in _panels(table):
        ax = axes[row][col]
        for method, g in group.groupby("method"):
            g = g.sort_values(metric)
            ax.errorbar(g[metric], g["test_acc"], yerr=g["test_acc_std"], marker="o", capsize=3, label=method)
        front = group[pareto(group[metric].to_numpy(float), group["test_acc"].to_numpy(float), larger)]
        ax.scatter(front[metric], front["test_acc"], s=140, facecolors="none", edgecolors="k", label="Pareto front")
        if metric != "latency_cpu_b1_ms":
            ax.set_xscale("log", base=2)
        ax.set(title=title if row == 0 else None, xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_html(table: pd.DataFrame, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = table[table["seeds"] > 0].groupby(["dataset", "model"])
    cols = max(groups.ngroups, 1)
    titles = [f"{d} / {m}" for (d, m), _ in groups] + [""] * (cols * (len(AXES) - 1))
    fig = make_subplots(rows=len(AXES), cols=cols, subplot_titles=titles[: cols * len(AXES)])
    palette = {}
    for row, col, _, metric, label, larger, group in _panels(table):
        for method, g in group.groupby("method"):
            g = g.sort_values(metric)
            color = palette.setdefault(method, f"hsl({(len(palette) * 67) % 360},65%,45%)")
            fig.add_trace(go.Scatter(
                x=g[metric], y=g["test_acc"], error_y={"type": "data", "array": g["test_acc_std"]}, mode="lines+markers",
                name=method, legendgroup=method, showlegend=(row == 0 and col == 0), line={"color": color},
                customdata=np.stack([g["compression_target"], g["seeds"]], axis=-1),
                hovertemplate=f"{method}<br>requested %{{customdata[0]}}×<br>{label}: %{{x:.3g}}<br>"
                              "acc %{y:.2f}%<br>seeds %{customdata[1]}<extra></extra>"), row=row + 1, col=col + 1)
        front = group[pareto(group[metric].to_numpy(float), group["test_acc"].to_numpy(float), larger)]
        fig.add_trace(go.Scatter(x=front[metric], y=front["test_acc"], mode="markers", name="Pareto front",
                                 legendgroup="pareto", showlegend=(row == 0 and col == 0),
                                 marker={"size": 14, "symbol": "circle-open", "color": "black"}),
                      row=row + 1, col=col + 1)
        fig.update_xaxes(title_text=label, type="log" if metric != "latency_cpu_b1_ms" else "linear",
                         row=row + 1, col=col + 1)
        fig.update_yaxes(title_text="test accuracy (%)", row=row + 1, col=col + 1)
    fig.update_layout(height=330 * len(AXES), width=max(520 * cols, 700), title="prunelab: accuracy vs cost")
    fig.write_html(path, include_plotlyjs=True)  # self-contained: opens offline


def build(uri: str, experiment: str, sweep_id: str | None = None, parent_run_id: str | None = None,
          out_dir: str | Path | None = None) -> Report:
    """Read the runs, write the report files (to ``out_dir`` or a temporary folder) and log them to
    ``parent_run_id`` when given."""
    runs = load_runs(uri, experiment, sweep_id)
    table = summarize(runs)
    markdown = to_markdown(table)
    failed = [f"{r.method}@{r.compression_target:g}×/{r.dataset}/seed {r.seed}" for r in runs.itertuples()
              if r.status != "FINISHED"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "accuracy.png", folder / "accuracy.html", folder / "table.csv", folder / "table.md"]
        plot_png(table, files[0])
        plot_html(table, files[1])
        table.to_csv(files[2], index=False)
        files[3].write_text(markdown + "\n")
        if parent_run_id:
            client = mlflow.MlflowClient(tracking_uri=uri)
            for f in files:
                client.log_artifact(parent_run_id, str(f), "report")
            client.log_metric(parent_run_id, "sweep_runs_finished", int((runs["status"] == "FINISHED").sum()))
            client.log_metric(parent_run_id, "sweep_runs_failed", len(failed))
        return Report(table, markdown, failed, files if out_dir else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prunelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-id", help="report on one sweep and log the files to its parent run "
                                           "(default: every run of the experiment)")
    parser.add_argument("--experiment", default="prunelab", help="MLflow experiment name (default: prunelab)")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", default="outputs/report", help="folder for the files (default: outputs/report)")
    args = parser.parse_args(argv)
    from prunelab.tracking.store import tracking_uri

    uri = tracking_uri(args.tracking_uri, "outputs")
    parent = None
    if args.sweep_id:
        mlflow.set_tracking_uri(uri)
        parents = mlflow.search_runs(experiment_names=[args.experiment], output_format="list",
                                     filter_string=f"tags.sweep_id = '{args.sweep_id}' and tags.`{KIND_TAG}` = 'sweep'")
        if not parents:
            raise SystemExit(f"no sweep with sweep_id={args.sweep_id!r} in experiment {args.experiment!r} at {uri}")
        parent = parents[0].info.run_id
    report = build(uri, args.experiment, args.sweep_id, parent, args.out)
    print(report.markdown)
    print(f"\nfiles: {', '.join(str(f) for f in report.files)}")


if __name__ == "__main__":
    main()
