"""`vlprompt report DIR` end to end: tables, plots and the HTML page written from hand-made result files."""

from __future__ import annotations

import argparse
import base64
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import pytest
from test_report_support import write_result, write_seeds

from vlprompt.harness.report.aggregate import BUDGET_BANNER
from vlprompt.harness.cli import report_cmd
from vlprompt.errors import ConfigError, RunError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def make_runs(root, budget=False):
    """Few-shot (two datasets, CoOp 1/16 shots, zero-shot) and base-to-novel results, plus one broken file."""
    for dataset, offset in (("dtd", 0.0), ("eurosat", 10.0)):
        write_seeds(root, [50.0 + offset, 52.0 + offset], dataset=dataset, shots=1, budget=budget)
        write_seeds(root, [60.0 + offset, 63.0 + offset], dataset=dataset, shots=16, budget=budget)
        write_result(root, method="zeroshot", dataset=dataset, shots=None, seed=None, accuracy=45.0 + offset,
                     budget=budget)
        for subset, acc in (("base", 80.0), ("new", 60.0)):
            write_seeds(root, [acc + offset, acc + offset + 1], protocol="base2novel", dataset=dataset,
                        subset=subset, budget=budget)
    broken = root / "broken-run" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"schema": 1, "method": ', encoding="utf-8")
    return broken


def parser():
    top = argparse.ArgumentParser(prog="vlprompt")
    report_cmd.add_parser(top.add_subparsers(dest="command"))
    return top


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    broken = make_runs(root)
    summary = report_cmd.write_report(root, now=NOW)
    return root, broken, summary


def test_report_writes_tables_plots_and_html(full_report):
    root, _, summary = full_report
    out = root / "report"
    assert summary.out == out
    names = sorted(p.name for p in out.iterdir())
    expected_tables = ["fewshot_coop", "fewshot_1shots", "fewshot_16shots", "base2novel_coop", "base2novel_average"]
    for stem in expected_tables:
        assert f"vit-b-16_{stem}.md" in names and f"vit-b-16_{stem}.csv" in names
    for stem in ("fewshot", "base2novel"):
        assert f"vit-b-16_{stem}.png" in names and f"vit-b-16_{stem}.svg" in names
    assert {"tables.md", "groups.csv", "report.html"} <= set(names)
    assert sorted(p.name for p in summary.written) == names  # nothing else, and no temp files left
    assert (summary.files_found, summary.runs_read, summary.groups) == (19, 18, 10)


def test_plots_are_valid_png_and_svg(full_report):
    out = full_report[0] / "report"
    for stem in ("fewshot", "base2novel"):
        assert (out / f"vit-b-16_{stem}.png").read_bytes()[:8] == PNG_MAGIC
        svg = ET.parse(out / f"vit-b-16_{stem}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"


def test_html_is_self_contained(full_report):
    root, broken, _ = full_report
    page = (root / "report" / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<table>") == 5
    assert "<caption>Few-shot: CoOp (ViT-B/16)</caption>" in page
    assert '<td class="num" title="n = 2, 95% CI ± 12.71">51.00 ± 1.41</td>' in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == 2
    assert all(base64.b64decode(data)[:8] == PNG_MAGIC for data in images)
    # nothing fetched from elsewhere: no URLs, no scripts, no external stylesheets
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    assert "generated 2025-01-02T03:04:05+00:00" in page
    assert f"<code>{broken}</code>: not valid JSON" in page
    assert BUDGET_BANNER not in page


def test_markdown_collects_every_table(full_report):
    text = (full_report[0] / "report" / "tables.md").read_text(encoding="utf-8")
    assert text.startswith("# vlprompt results\n")
    assert text.count("\n## ") == 5
    assert "| DTD | 51.00 ± 1.41 | 61.50 ± 2.12 | 45.00 |" in text


def test_budget_results_are_marked_everywhere(tmp_path):
    make_runs(tmp_path, budget=True)
    summary = report_cmd.write_report(tmp_path, tmp_path / "out", formats="md,csv,html,svg", now=NOW)
    assert summary.budget
    out = tmp_path / "out"
    for path in out.glob("*.md"):
        assert BUDGET_BANNER in path.read_text(encoding="utf-8"), path
    for path in out.glob("vit-b-16-budget_*.csv"):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert all(line.endswith(BUDGET_BANNER) for line in lines[1:]), path
    groups = (out / "groups.csv").read_text(encoding="utf-8").splitlines()
    assert all(",true," in line for line in groups[1:])
    for path in out.glob("*.svg"):
        assert path.name.startswith("vit-b-16-budget_")
        # text is drawn as paths; matplotlib keeps each text as an XML comment beside them
        assert f"[{BUDGET_BANNER}]" in path.read_text(encoding="utf-8"), path
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count(f'<div class="budget">{BUDGET_BANNER}</div>') == 2  # page top and the section
    assert not list(out.glob("*.png"))  # not asked for; the HTML still embeds its PNGs
    assert page.count("data:image/png;base64,") == 2


def test_cli_prints_summary_and_respects_format(tmp_path, capsys):
    make_runs(tmp_path)
    args = parser().parse_args(["report", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "md",
                                "--no-published"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"found 19 result file(s) under {tmp_path}: 18 run(s) in 10 group(s) over seeds, 1 skipped" in printed
    assert f"wrote 6 file(s) (md) to {tmp_path / 'o'}" in printed
    assert "skipped " in printed and "not valid JSON" in printed
    assert {p.suffix for p in (tmp_path / "o").iterdir()} == {".md"}
    assert "(published)" not in (tmp_path / "o" / "tables.md").read_text(encoding="utf-8")


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        report_cmd.write_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no result files"):
        report_cmd.write_report(tmp_path)
    write_result(tmp_path, accuracy=1.0)
    with pytest.raises(ConfigError, match="unknown output format.*pdf.*md,csv,html,png,svg"):
        report_cmd.write_report(tmp_path, formats="md,pdf")
    duplicate = tmp_path / "again" / "results.json"
    duplicate.parent.mkdir()
    duplicate.write_text(next(tmp_path.rglob("results.json")).read_text(), encoding="utf-8")
    with pytest.raises(RunError, match="duplicate results"):
        report_cmd.write_report(tmp_path)


def test_only_malformed_files_is_an_error(tmp_path):
    (tmp_path / "results.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError, match="every one was malformed"):
        report_cmd.write_report(tmp_path)


def test_parse_formats():
    assert report_cmd.parse_formats("md, CSV,md") == ("md", "csv")
    with pytest.raises(ConfigError):
        report_cmd.parse_formats(",")
