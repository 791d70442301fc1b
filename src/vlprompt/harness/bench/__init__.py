"""The papers' protocols as plans of independent runs, and their execution.

- ``protocols``: PROTOCOLS, the plans of fewshot, base2novel, crossdataset and domainshift;
- ``plan`` / ``status``: planned runs and their state;
- ``claims`` / ``execute`` / ``workers`` / ``runner``: claiming runs, executing a plan, ``--jobs`` workers, the
  pipeline runner.

Submodules are imported explicitly; importing this package loads nothing heavy.
"""
