"""The one-page HTML report: tables as HTML tables, figures as base64 PNG, nothing loaded from elsewhere.

The page is self-contained (inline CSS, ``data:`` images, no scripts, no links to other hosts), so it can be opened
offline or mailed as one file. Every text taken from results (dataset and method names, file paths, reasons) is
escaped. It lists when it was generated, the skipped (malformed) files with their reasons, and the incomplete groups
(missing seeds, incomplete averages, base results without novel ones); smoke-test (budget) sections carry a banner.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from vlprompt.harness.report.aggregate import BUDGET_BANNER, SkippedFile
from vlprompt.harness.report.tables import Cell, Table

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta { color: #555; margin-top: 0; }
.budget { background: #fff3cd; border: 2px solid #d39e00; color: #7a5a00; padding: 0.6rem 1rem; font-weight: bold;
          margin: 1rem 0; }
table { border-collapse: collapse; margin: 0.5rem 0 0.3rem; font-size: 0.9rem; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.3rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.average td { font-weight: bold; background: #f7f7f7; }
tr.published td { color: #555; font-style: italic; }
ul.notes { font-size: 0.8rem; color: #555; margin-top: 0.2rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
"""


@dataclass(frozen=True)
class HtmlFigure:
    """A figure to embed, as PNG bytes."""

    caption: str
    png: bytes


@dataclass(frozen=True)
class HtmlSection:
    """One partition of the report (one backbone, budget or not)."""

    title: str
    budget: bool
    tables: tuple[Table, ...]
    figures: tuple[HtmlFigure, ...] = ()
    issues: tuple[str, ...] = ()


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell_html(cell: Cell) -> str:
    tooltip = ""
    if cell.n is not None:
        parts = [f"n = {cell.n}"]
        if cell.ci95 is not None:
            parts.append(f"95% CI ± {cell.ci95:.2f}")
        tooltip = f' title="{_e(", ".join(parts))}"'
    return f'<td class="num"{tooltip}>{_e(cell.markdown())}</td>'


def table_html(table: Table) -> str:
    """One table with its caption, notes and incomplete-average issues."""
    lines = ["<table>", f"<caption>{_e(table.title)} ({_e(table.model or 'unknown model')})</caption>", "<thead><tr>"]
    lines.append("".join(f'<th scope="col">{_e(h)}</th>' for h in (table.row_header, *table.columns)))
    lines.append("</tr></thead>")
    lines.append("<tbody>")
    for row in table.rows:
        cells = "".join(_cell_html(c) for c in row.cells)
        source = f' title="{_e("; ".join(row.sources))}"' if row.sources else ""
        lines.append(f'<tr class="{_e(row.kind)}"><th scope="row"{source}>{_e(row.label)}</th>{cells}</tr>')
    lines.append("</tbody></table>")
    notes = [*table.notes, *(f"Incomplete: {i}" for i in table.issues)]
    if notes:
        lines.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(lines)


def _figure_html(figure: HtmlFigure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure.caption)}</figcaption></figure>"
    )


def _banner() -> str:
    return f'<div class="budget">{_e(BUDGET_BANNER)}</div>'


def render_html(
    *,
    root: str,
    generated: datetime,
    sections: Sequence[HtmlSection],
    skipped: Sequence[SkippedFile],
    summary: Sequence[str] = (),
) -> str:
    """The full page as a string (UTF-8 text; write it with ``atomic_write_text``)."""
    any_budget = any(s.budget for s in sections)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>vlprompt report</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>vlprompt report</h1>",
        f'<p class="meta">Results under <code>{_e(root)}</code>; '
        f'generated {_e(generated.isoformat(timespec="seconds"))}.</p>',
    ]
    if any_budget:
        out.append(_banner())
    if summary:
        out.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in summary) + "</ul>")
    if len(sections) > 1:
        links = "".join(f'<li><a href="#section-{i}">{_e(s.title)}</a></li>' for i, s in enumerate(sections))
        out.append(f"<nav><ul>{links}</ul></nav>")
    for i, section in enumerate(sections):
        out.append(f'<section id="section-{i}">')
        out.append(f"<h2>{_e(section.title)}</h2>")
        if section.budget:
            out.append(_banner())
        out.extend(table_html(t) for t in section.tables)
        out.extend(_figure_html(f) for f in section.figures)
        out.append("</section>")
    out.append("<h2>Skipped files</h2>")
    if skipped:
        out.append(
            "<ul>" + "".join(f"<li><code>{_e(s.path)}</code>: {_e(s.reason)}</li>" for s in skipped) + "</ul>"
        )
    else:
        out.append("<p>None: every result file was read.</p>")
    out.append("<h2>Incomplete groups</h2>")
    issues = [(s.title, issue) for s in sections for issue in s.issues]
    if issues:
        out.append("<ul>" + "".join(f"<li>{_e(t)}: {_e(i)}</li>" for t, i in issues) + "</ul>")
    else:
        out.append("<p>None: every group has the usual seeds and every average is complete.</p>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
