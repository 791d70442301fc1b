"""The HTML page: escaped text, embedded images, lists of skipped files and incomplete groups."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

from vlprompt.harness.report.aggregate import BUDGET_BANNER, SkippedFile
from vlprompt.harness.report.html import HtmlFigure, HtmlSection, render_html, table_html
from vlprompt.harness.report.tables import Cell, Row, Table

NOW = datetime(2025, 6, 7, 8, 9, 10, tzinfo=timezone.utc)


def small_table(label="DTD", budget=False):
    return Table(
        table_id="fewshot_coop",
        title="Few-shot: CoOp",
        row_header="Dataset",
        columns=("16 shots",),
        rows=(
            Row(label, (Cell(mean=62.0, std=2.0, ci95=4.968, n=3),)),
            Row("Average (2 datasets)", (Cell(note="incomplete (1/2)"),), kind="average"),
            Row("DTD (published)", (Cell(mean=59.6, decimals=1, published=True, recalled=True),), kind="published",
                sources=("CoOp <Fig. 3>",)),
        ),
        model="ViT-B/16",
        budget=budget,
        notes=("a note",),
        issues=("EuroSAT missing",),
    )


class _Collector(HTMLParser):
    """Checks the page is well nested and collects tag names."""

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag


def test_table_html_cells_rows_and_escaping():
    text = table_html(small_table(label="<script>alert(1)</script>"))
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert '<td class="num" title="n = 3, 95% CI ± 4.97">62.00 ± 2.00</td>' in text
    average = '<th scope="row">Average (2 datasets)</th><td class="num">incomplete (1/2)</td></tr>'
    assert f'<tr class="average">{average}' in text
    assert 'title="CoOp &lt;Fig. 3&gt;">DTD (published)</th><td class="num">59.6 (recalled)</td>' in text
    assert "<li>a note</li><li>Incomplete: EuroSAT missing</li>" in text


def test_page_structure_images_and_lists():
    png = b"\x89PNG\r\n\x1a\nfake"
    sections = [
        HtmlSection("ViT-B/16", False, (small_table(),), (HtmlFigure("curves & bars", png),), ("odd seeds <1>",)),
        HtmlSection(f"ViT-B/16 – {BUDGET_BANNER}", True, (small_table(budget=True),)),
    ]
    page = render_html(
        root="runs/<x>",
        generated=NOW,
        sections=sections,
        skipped=[SkippedFile(Path("runs/a/results.json"), "not valid JSON (x < y)")],
        summary=["found 3 files"],
    )
    collector = _Collector()
    collector.feed(page)
    collector.close()
    assert collector.stack == [] and collector.tags.count("table") == 2 and collector.tags.count("section") == 2
    assert '<img alt="curves &amp; bars" src="data:image/png;base64,iVBORw0KGgpmYWtl">' in page
    assert "<code>runs/&lt;x&gt;</code>; generated 2025-06-07T08:09:10+00:00." in page
    assert "<li><code>runs/a/results.json</code>: not valid JSON (x &lt; y)</li>" in page
    assert "<li>ViT-B/16: odd seeds &lt;1&gt;</li>" in page
    assert page.count(f'<div class="budget">{BUDGET_BANNER}</div>') == 2
    assert '<a href="#section-1">' in page  # contents, links inside the page only
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)


def test_page_without_problems_says_so():
    page = render_html(root="r", generated=NOW, sections=[HtmlSection("RN50", False, (small_table(),))], skipped=[])
    assert "<p>None: every result file was read.</p>" in page
    assert "<p>None: every group has the usual seeds and every average is complete.</p>" in page
    assert "budget" not in page.split("<body>")[1].split("<section")[0]
