"""Report figures: what is drawn where (inspected on the figure objects, rendered once for the file formats)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from test_report_support import write_result, write_seeds

from vlprompt.harness.report.aggregate import BUDGET_BANNER, collect_results, group_records, partition_groups
from vlprompt.harness.report.plots import base2novel_figure, fewshot_figure, figure_bytes, partition_figures


def partition_of(root):
    (partition,) = partition_groups(group_records(collect_results(root).records))
    return partition


def series(ax):
    """label -> (x, y) of every error-bar line in a panel."""
    return {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}


@pytest.fixture
def fewshot_partition(tmp_path):
    write_seeds(tmp_path, [60.0, 62.0], dataset="dtd", shots=1)
    write_seeds(tmp_path, [70.0, 73.0], dataset="dtd", shots=16)
    write_seeds(tmp_path, [80.0, 81.0], dataset="eurosat", shots=16)
    write_result(tmp_path, method="zeroshot", dataset="dtd", shots=None, seed=None, accuracy=44.0)
    return partition_of(tmp_path)


def test_fewshot_curves_layout(fewshot_partition):
    figure = fewshot_figure(fewshot_partition)
    average, dtd, eurosat = figure.axes
    assert [ax.get_title() for ax in figure.axes] == [
        "Average over 2 datasets\n(incomplete points left out)", "DTD", "EuroSAT"]
    # x = log2(shots) + 1: 1 shot at 1, 16 shots at 5; zero-shot at 0
    assert series(dtd) == {"CoOp": ([1.0, 5.0], [61.0, 71.5])}
    assert series(eurosat) == {"CoOp": ([5.0], [80.5])}
    # the average exists only where every dataset has a value: 16 shots, (71.5 + 80.5) / 2
    assert series(average) == {"CoOp": ([5.0], [76.0])}
    # error bars are the sample std: std(60, 62) = sqrt(2), std(70, 73) = 1.5 sqrt(2)
    caps = sorted(float(y) for line in dtd.containers[0].lines[1] for y in line.get_ydata())
    assert caps == pytest.approx([61.0 - math.sqrt(2), 61.0 + math.sqrt(2), 71.5 - 1.5 * math.sqrt(2),
                                  71.5 + 1.5 * math.sqrt(2)], rel=1e-12)
    # zero-shot: a star at 0 shots and a dashed level
    star = [line for line in dtd.get_lines() if line.get_label() == "Zero-shot CLIP"]
    assert len(star) == 1 and star[0].get_marker() == "*"
    assert list(star[0].get_xdata()) == [0.0] and list(star[0].get_ydata()) == [44.0]
    dashed = [line for line in dtd.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [44.0, 44.0]
    assert [t.get_text() for t in dtd.get_xticklabels()] == ["0", "1", "16"]
    assert figure.get_suptitle() == "Few-shot accuracy – ViT-B/16"


def test_budget_marker_in_titles(tmp_path):
    write_seeds(tmp_path, [10.0, 12.0], dataset="dtd", shots=2, budget=True)
    write_result(tmp_path, protocol="base2novel", dataset="dtd", subset="base", accuracy=30.0, budget=True)
    figures = partition_figures(partition_of(tmp_path))
    assert set(figures) == {"fewshot", "base2novel"}
    for figure in figures.values():
        assert figure.get_suptitle().endswith(f"[{BUDGET_BANNER}]")


def test_base2novel_bars_with_harmonic_mean(tmp_path):
    write_seeds(tmp_path, [80.0, 82.0], protocol="base2novel", dataset="dtd", subset="base")
    write_seeds(tmp_path, [60.0, 64.0], protocol="base2novel", dataset="dtd", subset="new")
    write_result(tmp_path, protocol="base2novel", method="zeroshot", shots=None, seed=None, dataset="dtd",
                 subset="base", accuracy=70.0)
    write_result(tmp_path, protocol="base2novel", method="zeroshot", shots=None, seed=None, dataset="dtd",
                 subset="new", accuracy=75.0)
    figure = base2novel_figure(partition_of(tmp_path))
    (ax,) = figure.axes  # one dataset: no average panel
    assert ax.get_title() == "DTD"
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
    assert heights["Zero-shot CLIP"] == pytest.approx([70.0, 75.0, 2 * 70 * 75 / 145])
    assert heights["CoOp"] == pytest.approx([81.0, 62.0, 2 * 81 * 62 / 143])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Base", "Novel", "H"]


def test_nothing_to_draw(tmp_path):
    write_result(tmp_path, method="zeroshot", shots=None, seed=None)
    assert partition_figures(partition_of(tmp_path)) == {}


def test_figure_bytes_png_svg_and_deterministic(fewshot_partition):
    figure = fewshot_figure(fewshot_partition)
    png = figure_bytes(figure, "png", dpi=40)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    svg = figure_bytes(figure, "svg")
    assert ET.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    assert figure_bytes(figure, "svg") == svg
    with pytest.raises(ValueError, match="png, svg"):
        figure_bytes(figure, "pdf")
