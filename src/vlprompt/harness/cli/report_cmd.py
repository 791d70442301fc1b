"""``vlprompt report DIR``: aggregate every run's result JSON under DIR into tables, plots and one HTML page.

Outputs (in ``DIR/report`` unless ``--out``), each file prefixed by the backbone slug (``vit-b-16_``, and
``-budget`` for smoke-test results, which are never mixed with full ones):

- ``<slug>_<table>.md`` / ``.csv`` for every table, ``tables.md`` with all of them, ``groups.csv`` (one row per
  experiment, long format);
- ``<slug>_fewshot.png/.svg`` and ``<slug>_base2novel.png/.svg``;
- ``report.html``, self-contained.

All files are written atomically. Heavy modules (matplotlib) load only when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from vlprompt.common.io import atomic_write_bytes, atomic_write_text
from vlprompt.errors import ConfigError

if TYPE_CHECKING:
    from vlprompt.harness.report.aggregate import Partition
    from vlprompt.harness.report.html import HtmlFigure
    from vlprompt.harness.report.tables import Table

FORMATS: tuple[str, ...] = ("md", "csv", "html", "png", "svg")
_FIGURE_CAPTIONS = {
    "fewshot": "Few-shot accuracy vs shots per class (mean ± std over seeds; stars and dashed lines: zero-shot)",
    "base2novel": "Base-to-novel: base, novel and harmonic-mean accuracy",
}


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"md,csv"`` -> ``("md", "csv")``; raise ConfigError naming the valid formats for anything else."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(
            f"unknown output format(s) {', '.join(unknown) or '(none given)'}; use a comma-separated subset of "
            f"{','.join(FORMATS)}"
        )
    return formats


@dataclass
class ReportSummary:
    """What ``write_report`` found and wrote."""

    root: Path
    out: Path
    files_found: int
    runs_read: int
    groups: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    budget: bool = False

    def found_line(self) -> str:
        """One line: how many files, runs and groups, and how many files were skipped."""
        return (
            f"found {self.files_found} result file(s) under {self.root}: {self.runs_read} run(s) in {self.groups} "
            f"group(s) over seeds, {len(self.skipped)} skipped as malformed"
        )

    def lines(self) -> list[str]:
        """The summary as printed by the command."""
        lines = [self.found_line()]
        lines += [f"  {name}" for name in self.partitions]
        if self.budget:
            lines.append("SMOKE TEST (budget) results present: marked in every output; not comparable to papers")
        for path, reason in self.skipped:
            lines.append(f"skipped {path}: {reason}")
        if self.issues:
            lines.append(f"{len(self.issues)} incomplete group(s) or average(s); listed in the report")
        kinds = sorted({p.suffix.lstrip(".") for p in self.written})
        lines.append(f"wrote {len(self.written)} file(s) ({', '.join(kinds)}) to {self.out}")
        return lines


def _partition_summary(partition: Partition, tables: Sequence[Table]) -> str:
    counts: dict[str, int] = {}
    for group in partition.groups:
        name = group.key.protocol or "no protocol"
        counts[name] = counts.get(name, 0) + len(group.seeds)
    runs = ", ".join(f"{name} {count} run(s)" for name, count in sorted(counts.items()))
    return f"{partition.label}: {runs}; {len(tables)} table(s)"


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    published: bool = True,
    now: datetime | None = None,
) -> ReportSummary:
    """Aggregate the results under ``root`` and write the report files to ``out`` (default ``root/report``)."""
    # the report modules (~80 ms of imports: the published numbers as data) load only when a report is written
    from vlprompt.harness.report import html, tables
    from vlprompt.harness.report.aggregate import collect_results, group_records, partition_groups, seed_coverage_issues
    formats = parse_formats(formats)
    root = Path(root)
    out_dir = Path(out) if out is not None else root / "report"
    collection = collect_results(root)
    if not collection.records:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in collection.skipped[:5])
        raise ConfigError(f"no readable result file under {root}: every one was malformed ({reasons})")
    groups = group_records(collection.records)
    partitions = partition_groups(groups)
    summary = ReportSummary(
        root=root,
        out=out_dir,
        files_found=len(collection.files),
        runs_read=len(collection.records),
        groups=len(groups),
        skipped=[(s.path, s.reason) for s in collection.skipped],
        budget=any(p.budget for p in partitions),
    )

    def write_text(name: str, text: str) -> None:
        summary.written.append(atomic_write_text(out_dir / name, text))

    sections: list[html.HtmlSection] = []
    markdown_parts = ["# vlprompt results", ""]
    for partition in partitions:
        partition_tables = tables.build_tables(partition, show_published=published)
        issues = seed_coverage_issues(partition.groups) + [i for t in partition_tables for i in t.issues]
        summary.issues += issues
        summary.partitions.append(_partition_summary(partition, partition_tables))
        for table in partition_tables:
            stem = f"{partition.slug}_{table.table_id}"
            if "md" in formats:
                write_text(f"{stem}.md", tables.to_markdown(table, heading_level=1))
            if "csv" in formats:
                write_text(f"{stem}.csv", tables.to_csv(table))
        markdown_parts += [tables.to_markdown(t) for t in partition_tables]
        figures = _write_figures(partition, formats, out_dir, summary.written)
        sections.append(html.HtmlSection(partition.label, partition.budget, tuple(partition_tables), figures,
                                         tuple(issues)))

    if "md" in formats:
        if summary.budget:
            markdown_parts.insert(2, f"> **Some results are a {tables.BUDGET_BANNER}**\n")
        write_text("tables.md", "\n".join(markdown_parts))
    if "csv" in formats:
        write_text("groups.csv", tables.groups_csv(groups))
    if "html" in formats:
        page = html.render_html(
            root=str(root),
            generated=now or datetime.now(timezone.utc),
            sections=sections,
            skipped=collection.skipped,
            summary=[summary.found_line(), *summary.partitions],
        )
        write_text("report.html", page)
    return summary


def _write_figures(
    partition: Partition, formats: Sequence[str], out_dir: Path, written: list[Path]
) -> tuple[HtmlFigure, ...]:
    """Write the partition's figures in the image formats asked for; return the PNGs to embed in the HTML."""
    image_formats = [f for f in ("png", "svg") if f in formats]
    if not image_formats and "html" not in formats:
        return ()
    from vlprompt.harness.report import html, plots  # matplotlib
    embedded = []
    for name, figure in plots.partition_figures(partition).items():
        rendered: dict[str, bytes] = {}
        for image_format in image_formats:
            rendered[image_format] = plots.figure_bytes(figure, image_format)
            written.append(atomic_write_bytes(out_dir / f"{partition.slug}_{name}.{image_format}",
                                              rendered[image_format]))
        if "html" in formats:
            png = rendered.get("png") or plots.figure_bytes(figure, "png")
            embedded.append(html.HtmlFigure(f"{_FIGURE_CAPTIONS[name]} – {partition.label}", png))
    return tuple(embedded)


def _run(args: argparse.Namespace) -> int:
    summary = write_report(args.dir, args.out, formats=parse_formats(args.format), published=not args.no_published)
    print("\n".join(summary.lines()))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``vlprompt report``."""
    parser = subparsers.add_parser(
        "report",
        help="aggregate run results into tables, plots and an HTML report",
        description=(
            "Collect every results.json / eval-*.json under DIR, aggregate over seeds (mean, sample std, 95% "
            "Student-t CI) and write tables in the papers' layouts (Markdown, CSV), plots (PNG, SVG) and one "
            "self-contained report.html. Smoke-test (--budget) results are marked in every output."
        ),
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder holding run folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DIR/report)")
    parser.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated outputs to write, from {','.join(FORMATS)} (default: all)",
    )
    parser.add_argument(
        "--no-published", action="store_true", help="leave out the papers' published numbers"
    )
    parser.set_defaults(func=_run)
