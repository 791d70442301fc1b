"""Reports of finished runs: ``vlprompt report DIR``.

- ``aggregate``: find and parse result files, group them over seeds, and the statistics (mean, sample std,
  Student-t 95% confidence interval, harmonic mean, averages over datasets);
- ``published``: the papers' reported numbers as data, with source and backbone;
- ``tables``: tables in the papers' layouts, rendered as Markdown and CSV;
- ``plots``: few-shot curves and base-vs-novel charts (matplotlib, Agg);
- ``html``: the one-page offline HTML report.

Submodules are imported explicitly; importing this package loads nothing heavy.
"""
