"""The default runner: one planned run through :mod:`vlprompt.harness.pipeline`.

- ``request.train``: :func:`~vlprompt.harness.pipeline.run_experiment` with ``resume=True`` (a new run starts, an interrupted
  one continues from its last checkpoint, a failed one is tried again) and the run's evaluations;
- otherwise the run is trained and only evaluations are missing: :func:`~vlprompt.harness.pipeline.evaluate_run` for each.

An evaluation asked for by another protocol than the run's own (domain generalisation on the shared ImageNet runs)
is labelled with that protocol by the pipeline (``EvalSpec.protocol``: the ``protocol`` field the report groups by).
One thing the pipeline does not do is done here: an evaluation of the run's own test split under another protocol's
label (``eval-imagenet-domainshift.json``, the source column of the domain generalisation table) is ``results.json``
relabelled: the same metrics, not recomputed.

Picklable (worker processes get a copy, without any loaded backbone); imports the pipeline, hence torch, only when
called.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.data.registry import same_dataset
from vlprompt.harness.bench.execute import RunRequest
from vlprompt.harness.bench.plan import PlannedRun
from vlprompt.harness.rundir import RESULTS_FILE, EvalSpec, read_result, write_result


def is_own_split(run: PlannedRun, evaluation: EvalSpec) -> bool:
    """True when ``evaluation`` is the run's own test split (dataset and class subset): ``results.json``'s."""
    return evaluation.subset == run.config.subset and same_dataset(evaluation.dataset, run.config.dataset)


def copy_own_result(run: PlannedRun, evaluation: EvalSpec) -> Path:
    """Write ``eval-<name>.json`` as the run's ``results.json`` under ``evaluation``'s protocol label."""
    data = read_result(run.run_dir / RESULTS_FILE)
    if evaluation.protocol is not None:
        data["protocol"] = evaluation.protocol
    return write_result(run.run_dir, evaluation.filename, data)


@dataclass(frozen=True)
class PipelineRunner:
    """Runs one :class:`~vlprompt.harness.bench.execute.RunRequest` with the pipeline.

    ``progress``: progress bars (None: when stderr is a terminal; workers pass False). ``feature_cache``: as
    :func:`~vlprompt.harness.pipeline.run_experiment` takes it (None: the default cache). The backbone of the last run is
    kept and reused while runs name the same model and device (a worker loads it once, not once per run).
    """

    progress: bool | None = None
    feature_cache: Any = None
    _backbone: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False, repr=False)

    def backbone(self, model: str, device: str) -> Any:
        """The loaded CLIP ``model`` on ``device`` (``auto`` resolved), loaded once and kept for the next runs."""
        # torch loads with the first run, not when a spawned worker unpickles the runner: the worker limits its
        # threads first (workers._limit_threads sets the OMP/MKL variables, read once when torch loads)
        from vlprompt.stages import load_backbone, resolve_device

        resolved = resolve_device(device)
        key = (model, str(resolved))
        if key not in self._backbone:
            self._backbone.clear()  # one backbone at a time
            self._backbone[key] = load_backbone(model, resolved)
        return self._backbone[key]

    def __getstate__(self) -> dict[str, Any]:  # a worker process starts with no loaded backbone
        return {"progress": self.progress, "feature_cache": self.feature_cache, "_backbone": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def __call__(self, request: RunRequest) -> None:
        from vlprompt.harness.pipeline import evaluate_run, run_experiment  # torch: see backbone()

        run = request.run
        config = run.config
        if request.device is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=request.device))
        computed = [e for e in request.evals if not is_own_split(run, e)]
        clip = self.backbone(config.model, config.train.device) if (request.train or computed) else None
        if request.train:
            run_experiment(config, run.run_dir, resume=True, progress=self.progress, feature_cache=self.feature_cache,
                           evals=[dataclasses.replace(e, protocol=_label(e, config.protocol)) for e in computed],
                           clip=clip)
        else:
            for evaluation in computed:
                evaluate_run(run.run_dir, dataset=evaluation.dataset, subset=evaluation.subset, name=evaluation.name,
                             clip=clip, feature_cache=self.feature_cache, progress=self.progress,
                             protocol=_label(evaluation, config.protocol))
        for evaluation in request.evals:
            if is_own_split(run, evaluation):
                copy_own_result(run, evaluation)


def _label(evaluation: EvalSpec, run_protocol: str | None) -> str | None:
    """The protocol an evaluation's result file is labelled with when it is not the run's own (else None)."""
    return evaluation.protocol if evaluation.protocol not in (None, run_protocol) else None
