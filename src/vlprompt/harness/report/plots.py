"""Report figures with matplotlib's Agg canvas (no pyplot, no global backend switch).

- :func:`fewshot_figure`: accuracy vs shots per class, one panel for the dataset average and one per dataset, one line
  per method with std error bars, zero-shot methods as a star at 0 shots and a dashed horizontal level (the layout of
  CoOp's Figure 3). Shots sit on a log2 axis (1, 2, 4, 8, 16 evenly spaced; 0 one step left of 1).
- :func:`base2novel_figure`: Base, Novel and H as grouped bars per method, one panel per dataset and the average.

Averages follow the tables' rule: a method's average at a shot count is drawn only when every dataset has it.
Figures of smoke-test (budget) results say so in their title. :func:`figure_bytes` renders PNG or SVG
deterministically (no timestamps), so a caller can write it atomically or embed it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlprompt.harness.report.aggregate import (
    BUDGET_BANNER,
    GroupIndex,
    Partition,
    dataset_label,
    dataset_sort_key,
    harmonic_mean,
    in_base2novel_layout,
    in_fewshot_layout,
    mean_if_complete,
    method_label,
    method_sort_key,
)

IMAGE_FORMATS: tuple[str, ...] = ("png", "svg")
_MAX_COLUMNS = 4
# one colour per known method, the same in every figure; other methods take the spare colours in order
_METHOD_COLORS: dict[str, str] = {
    "zeroshot": "#1f77b4",
    "ensemble": "#17becf",
    "linear_probe": "#7f7f7f",
    "coop": "#d62728",
    "cocoop": "#2ca02c",
    "kgcoop": "#ff7f0e",
    "prograd": "#9467bd",
    "maple": "#8c564b",
    "promptsrc": "#e377c2",
    "tcp": "#6b6ecf",
}
_SPARE_COLORS = ("#bcbd22", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#e6550d")


def _colors(names: Sequence[str]) -> dict[str, str]:
    """Colour of each series name: the method's own colour, or a spare one (cycled) for unknown names."""
    spare = iter(_SPARE_COLORS * (len(names) // len(_SPARE_COLORS) + 1))
    return {name: _METHOD_COLORS.get(name) or next(spare) for name in names}


def _title(text: str, partition: Partition) -> str:
    title = f"{text} – {partition.model or 'unknown model'}"
    return f"{title}\n[{BUDGET_BANNER}]" if partition.budget else title


def _grid(count: int) -> tuple[Figure, list]:
    columns = min(_MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(3.4 * columns, 2.9 * rows + 0.9), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def _average_title(count: int, left_out: bool) -> str:
    title = f"Average over {count} datasets"
    return title + "\n(incomplete points left out)" if left_out else title


def _shot_position(shots: int) -> float:
    return math.log2(shots) + 1.0 if shots else 0.0


@dataclass(frozen=True)
class _Point:
    shots: int
    mean: float
    std: float | None


def fewshot_figure(partition: Partition) -> Figure | None:
    """CoOp Fig. 3 layout for the partition's few-shot results, or None when there are none with shots."""
    groups = [g for g in partition.groups if in_fewshot_layout(g)]
    if not any(g.key.shots for g in groups):
        return None
    index = GroupIndex(groups)
    datasets = sorted({g.key.dataset for g in groups}, key=dataset_sort_key)
    methods = sorted({g.key.method for g in groups}, key=method_sort_key)
    shots_of = {m: sorted({g.key.shots for g in groups if g.key.method == m}) for m in methods}
    colors = _colors(methods)

    panels: list[tuple[str, dict[str, list[_Point]]]] = []
    if len(datasets) >= 2:
        average: dict[str, list[_Point]] = {}
        left_out = False
        for method in methods:
            for shots in shots_of[method]:
                mean = mean_if_complete([index.mean("fewshot", method, d, d, "all", shots) for d in datasets])
                if mean is None:
                    left_out = True
                else:
                    average.setdefault(method, []).append(_Point(shots, mean, None))
        panels.append((_average_title(len(datasets), left_out), average))
    for dataset in datasets:
        points: dict[str, list[_Point]] = {}
        for method in methods:
            for shots in shots_of[method]:
                group = index.get("fewshot", method, dataset, dataset, "all", shots)
                if group is not None:
                    points.setdefault(method, []).append(_Point(shots, group.stats.mean, group.stats.std))
        panels.append((dataset_label(dataset), points))

    all_shots = sorted({k for ks in shots_of.values() for k in ks})
    figure, axes = _grid(len(panels))
    for ax, (name, points) in zip(axes, panels, strict=True):
        for method in methods:
            series = points.get(method, [])
            if not series:
                continue
            if all(p.shots == 0 for p in series):
                level = series[0].mean
                ax.axhline(level, color=colors[method], linestyle="--", linewidth=1.0)
                ax.plot([0.0], [level], marker="*", markersize=11, color=colors[method], linestyle="none",
                        label=method_label(method))
                continue
            xs = [_shot_position(p.shots) for p in series]
            ys = [p.mean for p in series]
            errors = [p.std or 0.0 for p in series]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, color=colors[method], marker="o",
                        markersize=4, linewidth=1.5, capsize=2, label=method_label(method))
        ax.set_title(name, fontsize=10)
        ax.set_xticks([_shot_position(k) for k in all_shots], [str(k) for k in all_shots])
        ax.set_xlim(_shot_position(all_shots[0]) - 0.4, _shot_position(all_shots[-1]) + 0.4)
        ax.set_xlabel("Shots per class", fontsize=8)
        ax.set_ylabel("Accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    _legend(figure, axes)
    figure.suptitle(_title("Few-shot accuracy", partition), fontsize=11)
    return figure


def _legend(figure: Figure, axes: Sequence) -> None:
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(5, len(handles)),
                      fontsize=8, frameon=False)


def base2novel_figure(partition: Partition) -> Figure | None:
    """Base, Novel and H bars per method for each dataset and the dataset average, or None without results."""
    groups = [g for g in partition.groups if in_base2novel_layout(g)]
    if not groups:
        return None
    index = GroupIndex(groups)
    datasets = sorted({g.key.dataset for g in groups}, key=dataset_sort_key)
    variants = sorted({(g.key.method, g.key.shots) for g in groups}, key=lambda v: (method_sort_key(v[0]), v[1]))
    repeated = {m for m, _ in variants if sum(w[0] == m for w in variants) > 1}
    names = {v: method_label(v[0]) + (f" ({v[1]} shots)" if v[0] in repeated else "") for v in variants}
    # a method with several shot counts gets spare colours, so its bars stay apart
    by_key = _colors([v[0] if v[0] not in repeated else f"{v[0]}/{v[1]}" for v in variants])
    colors = {names[v]: by_key[v[0] if v[0] not in repeated else f"{v[0]}/{v[1]}"] for v in variants}

    def values(dataset: str, variant: tuple[str, int]) -> tuple[float | None, float | None]:
        method, shots = variant
        return (index.mean("base2novel", method, dataset, dataset, "base", shots),
                index.mean("base2novel", method, dataset, dataset, "new", shots))

    panels: list[tuple[str, dict[tuple[str, int], tuple[float | None, float | None]]]] = []
    if len(datasets) >= 2:
        average = {}
        for variant in variants:
            pairs = [values(d, variant) for d in datasets]
            average[variant] = (mean_if_complete([b for b, _ in pairs]), mean_if_complete([n for _, n in pairs]))
        left_out = any(b is None or n is None for b, n in average.values())
        panels.append((_average_title(len(datasets), left_out), average))
    for dataset in datasets:
        panels.append((dataset_label(dataset), {v: values(dataset, v) for v in variants}))

    figure, axes = _grid(len(panels))
    width = 0.8 / len(variants)
    for ax, (name, table) in zip(axes, panels, strict=True):
        lowest = 100.0
        for i, variant in enumerate(variants):
            base, novel = table[variant]
            bars = [base, novel, harmonic_mean(base, novel)]
            xs = [j - 0.4 + width * (i + 0.5) for j in range(3)]
            heights = [math.nan if b is None else b for b in bars]
            lowest = min([lowest, *(b for b in bars if b is not None)])
            ax.bar(xs, heights, width=width * 0.95, color=colors[names[variant]], label=names[variant])
        ax.set_xticks(range(3), ["Base", "Novel", "H"])
        ax.set_ylim(max(0.0, math.floor(lowest / 10.0) * 10.0 - 10.0), 100.0)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("Accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    _legend(figure, axes)
    figure.suptitle(_title("Base-to-novel generalisation", partition), fontsize=11)
    return figure


def figure_bytes(figure: Figure, image_format: str, dpi: int = 100) -> bytes:
    """Render a figure as PNG or SVG bytes, without timestamps, so the same figure gives the same file."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    buffer = io.BytesIO()
    metadata = {"Date": None} if image_format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "vlprompt", "svg.fonttype": "path"}):
        figure.savefig(buffer, format=image_format, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def partition_figures(partition: Partition) -> dict[str, Figure]:
    """The partition's figures by name ("fewshot", "base2novel"); absent when there is nothing to draw."""
    figures = {"fewshot": fewshot_figure(partition), "base2novel": base2novel_figure(partition)}
    return {name: figure for name, figure in figures.items() if figure is not None}
