"""Tables in the papers' layouts, rendered as Markdown and CSV.

One :func:`build_tables` call turns one :class:`~vlprompt.harness.report.aggregate.Partition` (one backbone, budget or not)
into tables:

- few-shot (CoOp): one table per trained method (datasets x shots) and one per shot count (datasets x methods);
  methods without training images (zero-shot CLIP, prompt ensembling) are extra columns of both;
- base-to-novel (CoCoOp Table 1): one table per method (datasets x Base, Novel, H) and a summary of the dataset
  averages (methods x Base, Novel, H);
- cross-dataset (CoCoOp Table 2) and domain shift (CoOp Table 1, right): methods x (source, targets, target average);
- anything else (plain runs, unknown protocols, unusual combinations) in a generic table per protocol, so no result
  is ever left out silently.

Data cells show "mean ± std" over seeds (the mean alone for one seed); H and averages are single numbers. Dataset
averages need every dataset of the table (otherwise the cell reads "incomplete (k/n)" and the issue is listed).
Published values (see :mod:`vlprompt.harness.report.published`) appear as "(published)" rows right after the row they belong
to, only when the backbone matches and the results are not a smoke test. Smoke-test (budget) tables carry a banner
in Markdown and a ``budget`` column in CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from vlprompt.common.vocab import slug
from vlprompt.harness.report import published as pub
from vlprompt.harness.report.aggregate import (
    BUDGET_BANNER,
    Group,
    GroupIndex,
    Partition,
    Stats,
    dataset_label,
    dataset_sort_key,
    harmonic_mean,
    in_base2novel_layout,
    in_fewshot_layout,
    in_transfer_layout,
    mean_if_complete,
    method_label,
    method_sort_key,
)

MISSING = "–"
CELL_LEGEND = (
    "Cells: mean ± sample standard deviation over seeds (the mean alone for a single seed); 95% CIs in the CSV."
)


# ----------------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Cell:
    """One table cell: seed statistics, a single derived or published number, a note, or nothing."""

    mean: float | None = None
    std: float | None = None
    ci95: float | None = None
    n: int | None = None  # seeds behind a statistics cell; None for derived and published numbers
    decimals: int = 2
    note: str | None = None  # replaces the number, e.g. "incomplete (10/11)"
    published: bool = False  # a paper's number: shown with the paper's own precision everywhere
    recalled: bool = False

    @classmethod
    def of_group(cls, group: Group | None) -> Cell:
        """Statistics of a group (an empty cell for no group)."""
        if group is None:
            return cls()
        return cls.of_stats(group.stats)

    @classmethod
    def of_stats(cls, stats: Stats) -> Cell:
        return cls(mean=stats.mean, std=stats.std, ci95=stats.ci95, n=stats.n)

    @classmethod
    def of_published(cls, value: pub.PublishedValue | None) -> Cell:
        if value is None:
            return cls()
        return cls(mean=value.accuracy, decimals=value.decimals, published=True, recalled=value.recalled)

    @property
    def empty(self) -> bool:
        return self.mean is None and self.note is None

    def markdown(self) -> str:
        """Display text: "62.00 ± 2.00", "62.00", "59.6 (recalled)", a note, or "–"."""
        if self.note is not None:
            return self.note
        if self.mean is None:
            return MISSING
        text = f"{self.mean:.{self.decimals}f}"
        if self.std is not None:
            text += f" ± {self.std:.{self.decimals}f}"
        return text + (" (recalled)" if self.recalled else "")

    def csv_fields(self) -> list[str]:
        """The four CSV fields: mean (or the note), std, ci95, n; empty where undefined.

        Computed numbers have 4 decimals; published ones keep the paper's precision.
        """
        if self.note is not None:
            return [self.note, "", "", ""]
        if self.mean is None:
            return ["", "", "", ""]
        decimals = self.decimals if self.published else 4
        return [
            f"{self.mean:.{decimals}f}",
            "" if self.std is None else f"{self.std:.4f}",
            "" if self.ci95 is None else f"{self.ci95:.4f}",
            "" if self.n is None else str(self.n),
        ]


@dataclass(frozen=True)
class Row:
    """A table row; ``kind`` is "data", "average" or "published" (then ``sources`` name the papers)."""

    label: str
    cells: tuple[Cell, ...]
    kind: str = "data"
    sources: tuple[str, ...] = ()  # papers behind a published row


@dataclass(frozen=True)
class Table:
    """A rendered-agnostic table; ``table_id`` is unique within a partition and used in file names."""

    table_id: str
    title: str
    row_header: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    model: str
    budget: bool
    notes: tuple[str, ...] = ()
    issues: tuple[str, ...] = ()


@dataclass
class _Context:
    """What every builder needs: the partition, its index, and whether published values are shown."""

    partition: Partition
    index: GroupIndex
    show_published: bool

    def published(
        self, method: str, dataset: str, eval_dataset: str, subset: str, shots: int | None, protocol: str
    ) -> pub.PublishedValue | None:
        if not self.show_published:
            return None
        return pub.lookup(method, dataset, eval_dataset, subset, shots, self.partition.model, protocol)

    def table(self, table_id: str, title: str, row_header: str, columns: Sequence[str], rows: Sequence[Row],
              issues: Sequence[str] = ()) -> Table:
        sources = list(dict.fromkeys(s for r in rows for s in r.sources))
        notes = [CELL_LEGEND, *(f"Published: {s}" for s in sources)]
        if any(c.recalled for r in rows for c in r.cells):
            notes.append("(recalled): number recalled, not re-read from the paper; treat as approximate.")
        return Table(
            table_id=table_id,
            title=title,
            row_header=row_header,
            columns=tuple(columns),
            rows=tuple(rows),
            model=self.partition.model,
            budget=self.partition.budget,
            notes=tuple(notes),
            issues=tuple(issues),
        )


def _published_row(label: str, values: Sequence[pub.PublishedValue | None]) -> Row | None:
    """A published row with this label, or None when no column has a published value."""
    if all(v is None for v in values):
        return None
    sources = tuple(dict.fromkeys(v.source for v in values if v is not None))
    return Row(label, tuple(Cell.of_published(v) for v in values), kind="published", sources=sources)


def _published_label(label: str) -> str:
    return f"{label} (published)"


PUBLISHED_AVERAGE_LABEL = "Average (11 datasets, published)"


def _average_cell(values: Sequence[float | None]) -> Cell:
    mean = mean_if_complete(values)
    if mean is not None:
        return Cell(mean=mean)
    present = sum(v is not None for v in values)
    return Cell(note=f"incomplete ({present}/{len(values)})") if present else Cell()


def _average_label(count: int, unit: str = "datasets") -> str:
    return f"Average ({count} {unit})"


def _shots_label(shots: int) -> str:
    return "1 shot" if shots == 1 else f"{shots} shots"


def _missing_issue(title: str, column: str, labels: Sequence[str], values: Sequence[float | None]) -> str | None:
    missing = [label for label, v in zip(labels, values, strict=True) if v is None]
    if not missing or len(missing) == len(values):
        return None
    return f"{title}: average of '{column}' is incomplete, no result for {', '.join(missing)}"


# ----------------------------------------------------------------------------------------------------------- few-shot


@dataclass(frozen=True)
class _Column:
    header: str
    method: str
    shots: int | None


def _dataset_rows_table(ctx: _Context, table_id: str, title: str, datasets: Sequence[str],
                        columns: Sequence[_Column]) -> Table:
    """Datasets as rows, one (method, shots) per column, plus the dataset average (CoOp's few-shot layout)."""
    rows: list[Row] = []
    means: list[list[float | None]] = [[] for _ in columns]
    for dataset in datasets:
        groups = [ctx.index.get("fewshot", c.method, dataset, dataset, "all", c.shots) for c in columns]
        rows.append(Row(dataset_label(dataset), tuple(Cell.of_group(g) for g in groups)))
        for column_means, group in zip(means, groups, strict=True):
            column_means.append(None if group is None else group.stats.mean)
        published_row = _published_row(
            _published_label(dataset_label(dataset)),
            [ctx.published(c.method, dataset, dataset, "all", c.shots, "fewshot") for c in columns],
        )
        if published_row is not None:
            rows.append(published_row)
    issues: list[str] = []
    if len(datasets) >= 2:
        label = _average_label(len(datasets))
        rows.append(Row(label, tuple(_average_cell(m) for m in means), kind="average"))
        labels = [dataset_label(d) for d in datasets]
        issues = [i for c, m in zip(columns, means, strict=True) if (i := _missing_issue(title, c.header, labels, m))]
        published_row = _published_row(
            PUBLISHED_AVERAGE_LABEL,
            [ctx.published(c.method, pub.AVERAGE, pub.AVERAGE, "all", c.shots, "fewshot") for c in columns],
        )
        if published_row is not None:
            rows.append(published_row)
    return ctx.table(table_id, title, "Dataset", [c.header for c in columns], rows, issues)


def fewshot_tables(ctx: _Context) -> list[Table]:
    """CoOp few-shot tables: per trained method (datasets x shots) and per shot count (datasets x methods)."""
    groups = [g for g in ctx.partition.groups if in_fewshot_layout(g)]
    if not groups:
        return []
    datasets = sorted({g.key.dataset for g in groups}, key=dataset_sort_key)
    shotless = sorted({g.key.method for g in groups if not g.key.shots}, key=method_sort_key)
    trained = sorted({g.key.method for g in groups if g.key.shots}, key=method_sort_key)
    shots_of = {m: sorted({g.key.shots for g in groups if g.key.method == m and g.key.shots}) for m in trained}
    baseline_columns = [_Column(method_label(m), m, None) for m in shotless]
    tables = []
    for method in trained:
        columns = [_Column(_shots_label(k), method, k) for k in shots_of[method]] + baseline_columns
        title = f"Few-shot: {method_label(method)}"
        tables.append(_dataset_rows_table(ctx, f"fewshot_{slug(method)}", title, datasets, columns))
    for shots in sorted({k for ks in shots_of.values() for k in ks}):
        columns = [_Column(method_label(m), m, shots) for m in trained if shots in shots_of[m]] + baseline_columns
        title = f"Few-shot: {_shots_label(shots)}"
        tables.append(_dataset_rows_table(ctx, f"fewshot_{shots}shots", title, datasets, columns))
    if not trained:
        tables.append(_dataset_rows_table(ctx, "fewshot_baselines", "Few-shot: baselines", datasets, baseline_columns))
    return tables


# ----------------------------------------------------------------------------------------------------- base-to-novel


@dataclass(frozen=True)
class _B2NAverage:
    base_cell: Cell
    novel_cell: Cell
    h_cell: Cell


def _base2novel_method_table(ctx: _Context, method: str, shots: int, datasets: Sequence[str], table_id: str,
                             title: str) -> tuple[Table, _B2NAverage | None]:
    rows: list[Row] = []
    base_means: list[float | None] = []
    novel_means: list[float | None] = []
    issues: list[str] = []
    for dataset in datasets:
        base = ctx.index.get("base2novel", method, dataset, dataset, "base", shots)
        novel = ctx.index.get("base2novel", method, dataset, dataset, "new", shots)
        b = None if base is None else base.stats.mean
        n = None if novel is None else novel.stats.mean
        base_means.append(b)
        novel_means.append(n)
        h = harmonic_mean(b, n)
        rows.append(Row(dataset_label(dataset), (Cell.of_group(base), Cell.of_group(novel), Cell(mean=h))))
        published_row = _published_row(
            _published_label(dataset_label(dataset)),
            [ctx.published(method, dataset, dataset, subset, shots, "base2novel") for subset in pub.B2N_SUBSETS],
        )
        if published_row is not None:
            rows.append(published_row)
        if (b is None) != (n is None):
            have, lack = ("base", "novel") if n is None else ("novel", "base")
            issues.append(f"{title}: {dataset_label(dataset)} has {have} but no {lack} results, so no H")
    average = None
    if len(datasets) >= 2:
        label = _average_label(len(datasets))
        b_avg, n_avg = mean_if_complete(base_means), mean_if_complete(novel_means)
        average = _B2NAverage(
            base_cell=_average_cell(base_means),
            novel_cell=_average_cell(novel_means),
            h_cell=Cell(mean=harmonic_mean(b_avg, n_avg)),
        )
        rows.append(Row(label, (average.base_cell, average.novel_cell, average.h_cell), kind="average"))
        labels = [dataset_label(d) for d in datasets]
        for header, values in (("Base", base_means), ("Novel", novel_means)):
            if issue := _missing_issue(title, header, labels, values):
                issues.append(issue)
        published_row = _published_row(
            PUBLISHED_AVERAGE_LABEL,
            [
                ctx.published(method, pub.AVERAGE, pub.AVERAGE, subset, shots, "base2novel")
                for subset in pub.B2N_SUBSETS
            ],
        )
        if published_row is not None:
            rows.append(published_row)
    table = ctx.table(table_id, title, "Dataset", ("Base", "Novel", "H"), rows, issues)
    return table, average


def base2novel_tables(ctx: _Context) -> list[Table]:
    """CoCoOp's base-to-novel tables: per method (datasets x Base, Novel, H) and the averages per method."""
    groups = [g for g in ctx.partition.groups if in_base2novel_layout(g)]
    if not groups:
        return []
    datasets = sorted({g.key.dataset for g in groups}, key=dataset_sort_key)
    variants = sorted({(g.key.method, g.key.shots) for g in groups}, key=lambda v: (method_sort_key(v[0]), v[1]))
    several = {m for m, _ in variants if sum(1 for v in variants if v[0] == m) > 1}
    tables: list[Table] = []
    summary_rows: list[Row] = []
    for method, shots in variants:
        name = method_label(method) + (f" ({_shots_label(shots)})" if method in several else "")
        table_id = f"base2novel_{slug(method)}" + (f"_{shots}shots" if method in several else "")
        table, average = _base2novel_method_table(ctx, method, shots, datasets, table_id, f"Base-to-novel: {name}")
        tables.append(table)
        if average is not None:
            summary_rows.append(Row(name, (average.base_cell, average.novel_cell, average.h_cell), kind="average"))
    if summary_rows and ctx.show_published:
        for base in pub.dataset_averages(ctx.partition.model, "base"):
            values = [ctx.published(base.method, pub.AVERAGE, pub.AVERAGE, s, base.shots, "base2novel")
                      for s in pub.B2N_SUBSETS]
            row = _published_row(_published_label(method_label(base.method)), values)
            if row is not None:
                summary_rows.append(row)
    if summary_rows:
        title = f"Base-to-novel: {_average_label(len(datasets))}"
        tables.append(ctx.table("base2novel_average", title, "Method", ("Base", "Novel", "H"), summary_rows))
    return tables


# ----------------------------------------------------------------------------------------------------------- transfer


_TRANSFER_TITLES = {"crossdataset": "Cross-dataset transfer", "domainshift": "Domain generalisation"}


def transfer_tables(ctx: _Context, protocol: str) -> list[Table]:
    """Methods as rows; the source dataset, each target, and the target average as columns (one table per source)."""
    groups = [g for g in ctx.partition.groups if in_transfer_layout(g, protocol)]
    tables = []
    for source in sorted({g.key.dataset for g in groups}, key=dataset_sort_key):
        members = [g for g in groups if g.key.dataset == source]
        targets = sorted({g.key.eval_dataset for g in members} - {source}, key=dataset_sort_key)
        variants = sorted({(g.key.method, g.key.shots) for g in members}, key=lambda v: (method_sort_key(v[0]), v[1]))
        several = {m for m, _ in variants if sum(1 for v in variants if v[0] == m) > 1}
        title = f"{_TRANSFER_TITLES.get(protocol, protocol)}: source {dataset_label(source)}"
        columns = [f"{dataset_label(source)} (source)", *(dataset_label(t) for t in targets)]
        with_average = len(targets) >= 2
        if with_average:
            columns.append(_average_label(len(targets), "targets"))
        rows: list[Row] = []
        issues: list[str] = []
        for method, shots in variants:
            name = method_label(method) + (f" ({_shots_label(shots)})" if method in several and shots else "")
            source_group = ctx.index.get(protocol, method, source, source, "all", shots)
            target_groups = [ctx.index.get(protocol, method, source, t, "all", shots) for t in targets]
            cells = [Cell.of_group(source_group), *(Cell.of_group(g) for g in target_groups)]
            published = [ctx.published(method, source, t, "all", shots, protocol) for t in (source, *targets)]
            if with_average:
                target_means = [None if g is None else g.stats.mean for g in target_groups]
                cells.append(_average_cell(target_means))
                if issue := _missing_issue(title, f"{name} target average", [dataset_label(t) for t in targets],
                                           target_means):
                    issues.append(issue)
                published.append(ctx.published(method, source, pub.AVERAGE, "all", shots, protocol))
            rows.append(Row(name, tuple(cells)))
            published_row = _published_row(_published_label(name), published)
            if published_row is not None:
                rows.append(published_row)
        table_id = f"{protocol}_{slug(source)}"
        tables.append(ctx.table(table_id, title, "Method", columns, rows, issues))
    return tables


# ----------------------------------------------------------------------------------------------------------- the rest


def _column_label(group: Group) -> str:
    key = group.key
    parts = [method_label(key.method)]
    if key.shots:
        parts.append(_shots_label(key.shots))
    if key.subset != "all":
        parts.append(f"{key.subset} classes")
    if key.eval_dataset != key.dataset:
        parts.append(f"trained on {dataset_label(key.dataset)}")
    return ", ".join(parts)


def other_tables(ctx: _Context, groups: Sequence[Group]) -> list[Table]:
    """Generic tables (evaluation datasets x method variants), one per protocol, for groups no layout covers."""
    tables = []
    for protocol in sorted({g.key.protocol for g in groups}):
        members = [g for g in groups if g.key.protocol == protocol]
        datasets = sorted({g.key.eval_dataset for g in members}, key=dataset_sort_key)
        variants: dict[str, list[Group]] = {}
        ordered = sorted(members, key=lambda g: (method_sort_key(g.key.method), g.key.shots, g.key.subset,
                                                 dataset_sort_key(g.key.dataset)))
        for group in ordered:
            variants.setdefault(_column_label(group), []).append(group)
        rows = []
        for dataset in datasets:
            cells = []
            for column_groups in variants.values():
                match = [g for g in column_groups if g.key.eval_dataset == dataset]
                cells.append(Cell.of_group(match[0]) if match else Cell())
            rows.append(Row(dataset_label(dataset), tuple(cells)))
        name = protocol or "runs"
        title = "Runs (no protocol)" if not protocol else f"Other results: {protocol}"
        tables.append(ctx.table(f"other_{slug(name)}", title, "Evaluation dataset", list(variants), rows))
    return tables


def build_tables(partition: Partition, *, show_published: bool = True) -> list[Table]:
    """All tables of one partition; published rows only when asked, the backbone matches and it is not a budget run."""
    ctx = _Context(partition, GroupIndex(partition.groups), show_published and not partition.budget)
    tables = [
        *fewshot_tables(ctx),
        *base2novel_tables(ctx),
        *transfer_tables(ctx, "crossdataset"),
        *transfer_tables(ctx, "domainshift"),
    ]
    rest = [
        g for g in partition.groups
        if not (in_fewshot_layout(g) or in_base2novel_layout(g) or in_transfer_layout(g, "crossdataset")
                or in_transfer_layout(g, "domainshift"))
    ]
    return tables + other_tables(ctx, rest)


# ----------------------------------------------------------------------------------------------------------- rendering


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table, heading_level: int = 2) -> str:
    """The table as GitHub-flavoured Markdown: heading, budget banner, table, notes and issues."""
    lines = [f"{'#' * heading_level} {_md_escape(table.title)} ({_md_escape(table.model or 'unknown model')})", ""]
    if table.budget:
        lines += [f"> **{BUDGET_BANNER}**", ""]
    header = [table.row_header, *table.columns]
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("| :--- |" + " ---: |" * len(table.columns))
    for row in table.rows:
        cells = [_md_escape(row.label), *(_md_escape(c.markdown()) for c in row.cells)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for note in (*table.notes, *(f"Incomplete: {i}" for i in table.issues)):
        lines.append(f"- {_md_escape(note)}")
    return "\n".join(lines) + "\n"


def csv_header(table: Table) -> list[str]:
    """CSV columns: the row label, four fields per table column, then kind, model, source and budget."""
    header = [table.row_header]
    for column in table.columns:
        header += [f"{column} mean", f"{column} std", f"{column} ci95", f"{column} n"]
    return header + ["kind", "model", "source", "budget"]


def to_csv(table: Table) -> str:
    """The table as CSV (numbers to 4 decimals; budget tables say so in the ``budget`` column of every row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(table))
    budget = BUDGET_BANNER if table.budget else ""
    for row in table.rows:
        fields = [row.label]
        for cell in row.cells:
            fields += cell.csv_fields()
        writer.writerow(fields + [row.kind, table.model, "; ".join(row.sources), budget])
    return buffer.getvalue()


GROUPS_CSV_HEADER = (
    "protocol", "method", "dataset", "eval_dataset", "subset", "shots", "model", "budget", "n", "seeds",
    "mean", "std", "ci95", "accuracies",
)


def groups_csv(groups: Sequence[Group]) -> str:
    """Every group in long format (one row per experiment), with its seeds and per-seed accuracies."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(GROUPS_CSV_HEADER)
    for group in groups:
        key, stats = group.key, group.stats
        writer.writerow([
            key.protocol, key.method, key.dataset, key.eval_dataset, key.subset, key.shots or "", key.model,
            "true" if key.budget else "false", stats.n, " ".join("" if s is None else str(s) for s in group.seeds),
            f"{stats.mean:.4f}", "" if stats.std is None else f"{stats.std:.4f}",
            "" if stats.ci95 is None else f"{stats.ci95:.4f}", " ".join(f"{a:g}" for a in group.accuracies),
        ])
    return buffer.getvalue()
