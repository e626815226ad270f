"""The sweep report's figure: laid out once from the report's table, drawn twice from that one layout, with plotly
for the interactive page and matplotlib for the PNG (plotly's own image export needs a browser).

One row of panels per cost (compression, MACs reduction, measured CPU latency), one column per dataset/model. A
method has one colour in every panel (the colour its runs have in the MLflow UI) and a line style per granularity;
points are mean ± std over seeds, joined in ratio order; latency points are the median over seeds with the spread of
the timing (the runs' interquartile range) as horizontal bars, not joined, so that load does not read as a trend; the
dense baseline is a dashed line; collapsed cells are crossed and kept off the Pareto front (open circles); failed
cells are red crosses at the requested ratio. One legend. The HTML page carries plotly.js inside it, so it draws its
figure wherever it is opened: in MLflow's artifact viewer, or downloaded from it.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunelab.tracking.server.ui import method_color

PNG_DPI = 110
AXES = (  # metric, axis title, larger is better, log-2 axis, spread of x (a column, shown as ± half of it) or None
    ("compression", "compression (× fewer nonzero weights)", True, True, None),
    ("macs_reduction", "MACs reduction (× fewer MACs)", True, True, None),
    ("latency_cpu_b1_ms", "CPU latency, batch 1 (ms): median, bars = IQR", False, False, "latency_cpu_b1_iqr_ms"),
)
# granularity → (plotly dash, plotly marker, matplotlib linestyle, matplotlib marker)
STYLES = {
    "weight": ("solid", "circle", "-", "o"),
    "filter": ("dash", "square", "--", "s"),
    "channel": ("dot", "diamond", ":", "D"),
    "column": ("dashdot", "triangle-up", "-.", "^"),
}
OTHER_STYLE = ("longdash", "star", (0, (8, 3)), "*")
DENSE, FRONT, COLLAPSED, FAILED = "dense baseline", "Pareto front", "collapsed (kept off the front)", "failed"
_MARKS = (FRONT, COLLAPSED, FAILED)


def _rank(entry: str) -> int:
    """Legend order: the dense baseline, the methods (in trace order), then the marks."""
    return 0 if entry == DENSE else 900 + _MARKS.index(entry) if entry in _MARKS else 100


@dataclass
class Series:
    method: str
    label: str
    color: str
    style: tuple
    x: np.ndarray
    y: np.ndarray
    std: np.ndarray
    seeds: np.ndarray
    requested: np.ndarray
    collapsed: np.ndarray
    x_spread: np.ndarray | None = None  # a measured x: its interquartile range (points not joined)


@dataclass
class Panel:
    row: int
    col: int
    title: str
    axis: str
    log2: bool
    series: list[Series]
    dense: tuple[float, int] | None  # mean dense test accuracy and its number of seeds
    front: tuple[np.ndarray, np.ndarray]
    failed: np.ndarray  # requested ratios of failed cells (compression panels only)
    floor: float  # y of the failed markers: the bottom of the panel's data


def _style(method: str) -> tuple:
    granularity = method.split(" (")[1].rstrip(")") if " (" in method else "weight"
    return STYLES.get(granularity, OTHER_STYLE)


def _label(table: pd.DataFrame, method: str) -> str:
    seeds = table.loc[(table["method"] == method) & (table["seeds"] > 0), "seeds"]
    if seeds.empty:
        return method
    low, high = int(seeds.min()), int(seeds.max())
    return f"{method} (n={low})" if low == high else f"{method} (n={low}–{high})"


def panels(table: pd.DataFrame, dense: pd.DataFrame, pareto) -> list[Panel]:
    """The figure's panels from the report table (``report.summarize``) and dense baselines."""
    ok = table[table["seeds"] > 0]
    axes = [a for a in AXES if ok[a[0]].notna().any()] or list(AXES[:1])
    groups = sorted({(r.dataset, r.model) for r in table.itertuples() if r.seeds or r.failed})
    methods = sorted(table["method"].dropna().unique())
    if not groups:  # no run finished or failed yet: one empty panel
        empty = np.empty(0)
        return [Panel(0, 0, "no finished run", AXES[0][1], True, [], None, (empty, empty), empty, 0.0)]
    out = []
    for row, (metric, axis, larger, log2, spread) in enumerate(axes):
        for col, (dataset, model) in enumerate(groups):
            cells = ok[(ok["dataset"] == dataset) & (ok["model"] == model) & ok[metric].notna()]
            series = []
            for method in methods:
                g = cells[cells["method"] == method].sort_values(["compression_target", metric])
                if not g.empty:
                    x_spread = None
                    if spread is not None:
                        x_spread = (g[spread] if spread in g else pd.Series(np.nan, index=g.index)).to_numpy(float)
                    series.append(
                        Series(
                            method,
                            _label(table, method),
                            method_color(method),
                            _style(method),
                            g[metric].to_numpy(float),
                            g["test_acc"].to_numpy(float),
                            g["test_acc_std"].fillna(0.0).to_numpy(float),
                            g["seeds"].to_numpy(int),
                            g["compression_target"].to_numpy(float),
                            g["collapsed"].to_numpy(int) > 0,
                            x_spread,
                        )
                    )
            kept = cells[cells["collapsed"] == 0]
            mask = pareto(kept[metric].to_numpy(float), kept["test_acc"].to_numpy(float), larger)
            base = dense[(dense["dataset"] == dataset) & (dense["model"] == model)]
            failed = table[(table["dataset"] == dataset) & (table["model"] == model) & (table["status"] == "FAILED")]
            low = (cells["test_acc"] - cells["test_acc_std"].fillna(0)).min()
            out.append(
                Panel(
                    row,
                    col,
                    f"{dataset} / {model}",
                    axis,
                    log2,
                    series,
                    (float(base["dense"].iloc[0]), int(base["dense_seeds"].iloc[0])) if len(base) else None,
                    (kept[metric].to_numpy(float)[mask], kept["test_acc"].to_numpy(float)[mask]),
                    failed["compression_target"].to_numpy(float) if metric == "compression" else np.empty(0),
                    float(low) if np.isfinite(low) else 0.0,
                )
            )
    return out


def _extent(panel: Panel) -> tuple[float, float]:
    spans = [s.x if s.x_spread is None else np.concatenate([s.x - _half(s), s.x + _half(s)]) for s in panel.series]
    xs = np.concatenate([*spans, panel.failed]) if panel.series or len(panel.failed) else []
    xs = np.asarray(xs, float)
    return (float(xs.min()), float(xs.max())) if len(xs) else (1.0, 2.0)


def _half(s: Series) -> np.ndarray:
    """Half the x spread of each point (0 where unknown): the bars drawn either side of the median."""
    return np.nan_to_num(s.x_spread / 2.0) if s.x_spread is not None else np.zeros_like(s.x)


def log2_ticks(low: float, high: float, most: int = 8) -> list[float]:
    """Powers of two covering [low, high], at most ``most`` of them (every k-th when the range is wide)."""
    first, last = math.floor(math.log2(max(low, 1e-9))), math.ceil(math.log2(max(high, 1e-9)))
    step = max(1, math.ceil((last - first + 1) / most))
    return [2.0**e for e in range(first, last + 1, step)]


def _ratio(value: float) -> str:
    return f"{value:g}×"


def to_plotly(panels_: list[Panel], title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = max(p.row for p in panels_) + 1, max(p.col for p in panels_) + 1
    titles = [p.title if p.row == 0 else "" for p in sorted(panels_, key=lambda p: (p.row, p.col))]
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=0.32 / rows, horizontal_spacing=0.08
    )
    shown: set[str] = set()

    def once(key: str) -> bool:
        first = key not in shown
        shown.add(key)
        return first

    for p in panels_:
        at = {"row": p.row + 1, "col": p.col + 1}
        low, high = _extent(p)
        if p.dense:
            fig.add_trace(
                go.Scatter(
                    x=[low, high],
                    y=[p.dense[0]] * 2,
                    mode="lines",
                    name=DENSE,
                    legendgroup=DENSE,
                    showlegend=once(DENSE),
                    line={"color": "#555", "dash": "dash", "width": 1.5},
                    hovertemplate=f"dense {p.dense[0]:.2f}% (n={p.dense[1]})<extra></extra>",
                ),
                **at,
            )
        for s in p.series:
            measured = s.x_spread is not None
            fig.add_trace(
                go.Scatter(
                    x=s.x,
                    y=s.y,
                    error_y={"type": "data", "array": s.std, "visible": True, "thickness": 1},
                    error_x={"type": "data", "array": _half(s), "visible": True, "thickness": 1} if measured else None,
                    mode="markers" if measured else "lines+markers",
                    name=s.label,
                    legendgroup=s.method,
                    showlegend=once(s.method),
                    line={"color": s.color, "dash": s.style[0]},
                    marker={"symbol": s.style[1], "size": 7, "color": s.color},
                    customdata=np.stack([s.requested, s.seeds, s.std, _half(s) * 2], axis=-1),
                    hovertemplate=f"{s.method}<br>requested %{{customdata[0]}}×<br>x %{{x:.3g}}"
                    + (" (IQR %{customdata[3]:.3g})" if measured else "")
                    + "<br>"
                    "test acc %{y:.2f}% ± %{customdata[2]:.2f} (n=%{customdata[1]})<extra></extra>",
                ),
                **at,
            )
            if s.collapsed.any():
                fig.add_trace(
                    go.Scatter(
                        x=s.x[s.collapsed],
                        y=s.y[s.collapsed],
                        mode="markers",
                        name=COLLAPSED,
                        legendgroup=COLLAPSED,
                        showlegend=once(COLLAPSED),
                        hoverinfo="skip",
                        marker={"symbol": "x-thin-open", "size": 16, "color": "black", "line": {"width": 2}},
                    ),
                    **at,
                )
        if len(p.front[0]):
            fig.add_trace(
                go.Scatter(
                    x=p.front[0],
                    y=p.front[1],
                    mode="markers",
                    name=FRONT,
                    legendgroup=FRONT,
                    showlegend=once(FRONT),
                    hoverinfo="skip",
                    marker={"symbol": "circle-open", "size": 17, "color": "black"},
                ),
                **at,
            )
        if len(p.failed):
            fig.add_trace(
                go.Scatter(
                    x=p.failed,
                    y=[p.floor] * len(p.failed),
                    mode="markers",
                    name=FAILED,
                    legendgroup=FAILED,
                    showlegend=once(FAILED),
                    hovertemplate="failed at requested %{x}×<extra></extra>",
                    marker={"symbol": "x", "size": 11, "color": "#d62728"},
                ),
                **at,
            )
        if p.log2:
            ticks = log2_ticks(low, high)
            fig.update_xaxes(type="log", tickvals=ticks, ticktext=[_ratio(t) for t in ticks], **at)
        fig.update_xaxes(title_text=p.axis, title_font_size=12, **at)
        fig.update_yaxes(title_text="test accuracy (%)" if p.col == 0 else None, title_font_size=12, **at)
    for trace in fig.data:
        trace.legendrank = _rank(trace.legendgroup)
    # title, then the legend (wrapping to the page's width), then the panels' titles: all above the plot area
    plot_height = 290 * rows - 20
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 0.995, "yref": "container", "yanchor": "top"},
        template="plotly_white",
        autosize=True,
        height=plot_height + 200,
        margin={"t": 150, "l": 60, "r": 20, "b": 50},
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1 + 40 / plot_height, "yanchor": "bottom"},
    )
    return fig


def to_matplotlib(panels_: list[Panel], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows, cols = max(p.row for p in panels_) + 1, max(p.col for p in panels_) + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols + 0.6, 3.2 * rows + 1.2), squeeze=False, layout="constrained"
    )
    handles: dict[str, object] = {}
    for p in panels_:
        ax = axes[p.row][p.col]
        if p.dense:
            handles.setdefault(DENSE, ax.axhline(p.dense[0], color="#555", ls="--", lw=1.2))
        for s in p.series:
            measured = s.x_spread is not None
            line = ax.errorbar(
                s.x,
                s.y,
                yerr=s.std,
                xerr=_half(s) if measured else None,
                color=s.color,
                ls="none" if measured else s.style[2],
                marker=s.style[3],
                ms=5,
                capsize=3,
                lw=1.5,
            )
            handles.setdefault(s.label, line)
            if s.collapsed.any():
                handles.setdefault(
                    COLLAPSED, ax.scatter(s.x[s.collapsed], s.y[s.collapsed], marker="x", s=90, c="k", zorder=5)
                )
        if len(p.front[0]):
            handles.setdefault(FRONT, ax.scatter(*p.front, s=170, facecolors="none", edgecolors="k", zorder=4))
        if len(p.failed):
            handles.setdefault(
                FAILED, ax.scatter(p.failed, [p.floor] * len(p.failed), marker="x", s=60, c="#d62728", zorder=5)
            )
        if p.log2:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(log2_ticks(*_extent(p))))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _ratio(v)))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set(title=p.title if p.row == 0 else None, xlabel=p.axis, ylabel="test accuracy (%)" if p.col == 0 else None)
        ax.grid(alpha=0.3)
    labels = sorted(handles, key=_rank)  # stable: methods keep their order
    # the title heads the legend: constrained layout places a suptitle over an "outside" legend
    fig.legend(
        [handles[k] for k in labels],
        labels,
        loc="outside upper left",
        frameon=False,
        fontsize=9,
        ncol=max(1, min(len(handles), 2 * cols)),
        title=title,
        alignment="left",
        title_fontproperties={"size": 12},
    )
    return fig


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{margin:0;font:14px sans-serif}} section{{margin:8px 16px}} h2{{font-size:16px}}
table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}}</style>
</head><body>{figure}
<section><p>{caption}</p><h2>Best method at each requested ratio</h2><p>{best_caption}</p>{best}
<h2>Every cell</h2>{table}</section>
</body></html>
"""

CAPTION = (
    "Points: mean test accuracy over seeds (n in the legend; error bars ± one std where n > 1), joined in "
    "order of the requested ratio. Latency: the median over seeds of each run's median time, the horizontal "
    "bar its interquartile range over the timing blocks; not joined, since latency measured on a loaded "
    "machine is noisy. Dashed: the dense baseline. Open circles: the Pareto front of each panel. Crossed: "
    "cells with a collapsed run (accuracy near chance or far below the dense model's, or a network with no path "
    "from input to output), kept off the front. Red crosses: failed runs, at their requested ratio."
)
BEST_CAPTION = (
    "Mean test accuracy over seeds; cells with a collapsed run left out. The margin is over the runner-up; "
    '"within noise" when it is not larger than the two cells\' standard deviations combined.'
)


def write_html(panels_: list[Panel], title: str, table: pd.DataFrame, path: Path, best: pd.DataFrame) -> None:
    """Write the interactive page: the figure with plotly.js inside it (about 5 MB, so that it draws offline and
    downloaded), the best method per ratio (``best``) and every cell (``table``), both as displayed."""
    fig = to_plotly(panels_, title)
    figure = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        div_id="figure",
        default_height=int(fig.layout.height),
        config={"responsive": True, "displaylogo": False},
    )
    path.write_text(
        _PAGE.format(
            title=html.escape(title),
            caption=html.escape(CAPTION),
            best_caption=html.escape(BEST_CAPTION),
            best=best.to_html(index=False, border=0),
            table=table.to_html(index=False, border=0),
            figure=figure,
        ),
        encoding="utf-8",
    )
