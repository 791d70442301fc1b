"""End-to-end experiments in run folders: data -> features -> method -> trainer -> results.

:func:`run_experiment` runs one :class:`~vlprompt.training.config.RunConfig` in a run folder (:class:`~vlprompt.harness.rundir.RunDir`:
locked, configuration checked, resume / overwrite semantics) and writes, besides what ``runs.py`` documents
(``config.json``, ``log.txt``, ``params.safetensors`` / ``optim.safetensors`` / ``state.json`` checkpoints):

- ``fewshot.json``: the portable few-shot sample (methods that learn, ``shots > 0``), reused on resume;
- ``prompt.safetensors``: the learned prompt / classifier with its backbone's fingerprint
  (:mod:`vlprompt.methods.prompt_file`), written once fitting is done (zero-shot methods too: it records the config);
- ``results.json``: test metrics on the run's own dataset and class subset (this marks the run finished);
- ``eval-<name>.json``: one per :class:`EvalSpec` (cross-dataset, base-to-novel "new"), after ``results.json``.

Flow: the configuration is resolved first (complete method config, the method's default epochs / batch size; fixed
methods record ``shots = 0``) and the dataset(s) are loaded before the run folder is touched, so an unknown method or
dataset never leaves a half-made folder. Training checkpoints every epoch; if anything fails after training, re-running
with ``resume`` evaluates only. Under torchrun every rank runs the same steps (features and training are shared across
ranks) and only rank 0 opens the run folder and writes files.

:func:`evaluate_run` re-opens a finished (or at least fitted) run folder without taking its training lock: it holds a
*shared* lock on ``run.lock``, so any number of evaluations (of different datasets, in different processes) run at
once, while training in that folder (which holds the lock exclusively) makes it refuse, and vice versa. It reads
``config.json``, loads ``prompt.safetensors`` on the recorded backbone (or ``model``; a backbone with another
fingerprint is refused) and writes ``eval-<name>.json`` atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vlprompt import stages
from vlprompt.common import dist
from vlprompt.common.vocab import SUBSETS
from vlprompt.data import cap_test_split, load_dataset, subsample_classes
from vlprompt.data.registry import same_dataset
from vlprompt.errors import CheckpointError, ConfigError, RunError, VlpromptError
from vlprompt.harness.config import NON_IDENTITY_KEYS, RunConfig
from vlprompt.harness.rundir import (
    FEWSHOT_FILE,
    PROMPT_FILE,
    RESULTS_FILE,
    STATE_FILE,
    EvalSpec,
    RunDir,
    check_eval_name,
    eval_file,
    eval_name,
    read_run_config,
    reading_lock,
    result_payload,
    write_result,
)
from vlprompt.methods import get_method
from vlprompt.methods.prompt_file import load_prompt, read_prompt_header, save_prompt
from vlprompt.prediction.predictor import Predictor

if TYPE_CHECKING:
    import torch

    from vlprompt.backbone.model import CLIP
    from vlprompt.data import DatasetSplits
    from vlprompt.methods import MethodSpec
    from vlprompt.training.loop import EpochStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_run_config(config: RunConfig) -> RunConfig:
    """The configuration a run folder records: the method's complete config (defaults filled in; unknown options
    are a ConfigError), ``shots = 0`` for fixed methods (they use no training images), and the method's default
    epochs and batch size where left unset (gradient-trained methods only)."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"run_experiment needs a RunConfig, got {type(config).__name__}")
    spec = get_method(config.method)
    shots = config.shots if spec.training.uses_training_images else 0
    return dataclasses.replace(config, shots=shots).resolved()


# --------------------------------------------------------------------------------------------------- run_experiment


def run_experiment(config: RunConfig, out_dir: str | os.PathLike[str], *, resume: bool = False,
                   overwrite: bool = False, evals: Sequence[EvalSpec] = (), clip: CLIP | None = None,
                   feature_cache: Any = None, progress: bool | None = None,
                   on_epoch_end: Callable[[EpochStats], None] | None = None) -> dict[str, Any]:
    """Run ``config`` in ``out_dir`` and return the main results payload (the content of ``results.json``).

    ``resume`` continues an unfinished run (a finished one is refused: see :class:`~vlprompt.harness.rundir.RunDir`);
    ``overwrite`` starts again, keeping the old run in ``previous/`` until this one finishes. ``evals`` are evaluated
    after the main results. ``clip`` reuses a loaded backbone (it must be the one ``config.model`` names; its
    fingerprint goes into the prompt file). ``feature_cache``: None/True = the default cache, False = none, a path
    or a :class:`~vlprompt.features.cache.FeatureCache`. ``progress``: progress bars (default: when stderr is a
    terminal). ``on_epoch_end`` is called after each training epoch's checkpoint.
    """
    resolved = resolve_run_config(config)
    spec = get_method(resolved.method)
    for eval_spec in evals:
        if not isinstance(eval_spec, EvalSpec):
            raise ConfigError(f"evals must be EvalSpec objects, got {type(eval_spec).__name__}")
    root = resolved.root or None
    splits = load_dataset(resolved.dataset, root)  # errors here leave out_dir untouched
    targets = _named_targets([(eval_spec, load_dataset(eval_spec.dataset, root)) for eval_spec in evals], resolved)

    def open_dir() -> RunDir:
        return RunDir.create_or_open(out_dir, resolved.to_dict(), resume=resume, overwrite=overwrite,
                                     ignore_keys=NON_IDENTITY_KEYS)

    run_dir = _on_main(open_dir)  # None on ranks > 0
    try:
        with run_dir.capture_logs() if run_dir is not None else contextlib.nullcontext():
            return _execute(resolved, spec, splits, targets, run_dir, clip=clip, feature_cache=feature_cache,
                            progress=progress, on_epoch_end=on_epoch_end)
    finally:
        if run_dir is not None:
            run_dir.close()


Targets = list[tuple[EvalSpec, "DatasetSplits"]]
"""Evaluations with their loaded datasets."""


def run_summary(config: RunConfig) -> str:
    """One line naming a run: method, dataset (subset), shots, seed, backbone."""
    subset = f" ({config.subset} classes)" if config.subset != "all" else ""
    return (f"{config.method} on {config.dataset}{subset}, {config.shots} shots, seed {config.seed}, "
            f"backbone {config.model}")


def _named_targets(targets: Targets, config: RunConfig) -> Targets:
    """The evaluations with their result names set; the run's own dataset and subset are dropped (results.json)."""
    named: Targets = []
    seen: dict[str, EvalSpec] = {}
    for spec, target in targets:
        if same_dataset(spec.dataset, config.dataset) and spec.subset == config.subset:
            logger.info("evaluation of %s (%s classes) is the run's own test set: results.json", spec.dataset,
                        spec.subset)
            continue
        named_spec = spec.named(target.name)
        if named_spec.filename in seen:
            raise ConfigError(f"two evaluations would both write {named_spec.filename} ({seen[named_spec.filename]} "
                              f"and {spec}); give them different names")
        seen[named_spec.filename] = spec
        named.append((named_spec, target))
    return named


def _execute(config: RunConfig, spec: MethodSpec, splits: DatasetSplits, targets: Targets, run_dir: RunDir | None,
             *, clip: CLIP | None, feature_cache: Any, progress: bool | None,
             on_epoch_end: Callable[[EpochStats], None] | None) -> dict[str, Any]:
    """The run itself, in an open run folder (None on ranks > 0): data, backbone, method, fit, results, evals."""
    logger.info("run %s: %s", run_dir.path if run_dir is not None else "(rank > 0)", run_summary(config))
    data, eval_data = _run_data(config, spec, splits, targets, run_dir)
    device = stages.resolve_device(config.train.device) if clip is None else clip.device
    clip = clip if clip is not None else stages.load_backbone(config.model, device)
    options = stages.FeatureOptions(device=device, precision=config.train.precision,
                                    num_workers=config.train.num_workers,
                                    cache=stages.open_feature_cache(feature_cache), progress=progress,
                                    on_error="skip" if config.skip_bad_images else "raise")
    logger.info("precision %s%s (features and evaluation)", options.precision,
                " (auto: measured on this machine)" if config.train.precision == "auto" else "")
    method = stages.build_method_for(spec, clip, data.classnames, config.method_config, dataset=data.name,
                                     template=data.template, seed=config.seed)
    for eval_spec, target in eval_data:  # refuse impossible transfers (class-specific context ...) before training
        stages.adapt_method(method, spec, config.method_config, target,
                            same_dataset=same_dataset(eval_spec.dataset, config.dataset), seed=config.seed)
    fit = _fit(method, spec, clip, data, config, options, run_dir, on_epoch_end)
    payload = _main_results(method, clip, data, config, options, fit, run_dir)
    for eval_spec, target in eval_data:
        _extra_results(method, spec, clip, eval_spec, target, config, options, run_dir)
    return payload


def _run_data(config: RunConfig, spec: MethodSpec, splits: DatasetSplits, targets: Targets,
              run_dir: RunDir | None) -> tuple[DatasetSplits, Targets]:
    """The run's data (few-shot sample saved as fewshot.json, then the class subset) and the evaluations' test sets."""
    if not spec.training.uses_training_images:
        data = subsample_classes(splits, config.subset)  # type: ignore[arg-type]
    else:
        fewshot_path = run_dir.path / FEWSHOT_FILE if run_dir is not None else None
        data = _on_main(lambda: stages.training_splits(splits, shots=config.shots, seed=config.seed,
                                                       subset=config.subset, fewshot_path=fewshot_path))
        stages.require_images(data, "train")
    data = cap_test_split(data, config.max_test_images)
    stages.require_images(data, "test")
    eval_data = [(eval_spec, cap_test_split(subsample_classes(target, eval_spec.subset), config.max_test_images))
                 for eval_spec, target in targets]
    for _, target in eval_data:
        stages.require_images(target, "test")
    return data, eval_data


def _fit(method: Any, spec: MethodSpec, clip: CLIP, data: DatasetSplits, config: RunConfig,
         options: stages.FeatureOptions, run_dir: RunDir | None,
         on_epoch_end: Callable[[EpochStats], None] | None) -> stages.FitOutcome:
    """Training features, then fit by the method's kind; the learned prompt is saved as soon as it exists.

    SGD checkpoints every epoch and resumes from the last one; a closed-form fit is redone on resume (deterministic).
    """
    train_set, val_set = stages.training_sets(spec, clip, data, config.train, options)
    fit = stages.fit_method(method, spec, train_set, val_set, train=config.train, run_dir=run_dir,
                            device=options.device, on_epoch_end=on_epoch_end, progress=options.progress)
    if run_dir is not None:
        save_prompt(method, run_dir.path / PROMPT_FILE, run=config.config_hash())
    return fit


def _main_results(method: Any, clip: CLIP, data: DatasetSplits, config: RunConfig, options: stages.FeatureOptions,
                  fit: stages.FitOutcome, run_dir: RunDir | None) -> dict[str, Any]:
    """Test metrics on the run's own dataset and subset, written as results.json (the run is then finished)."""
    test = stages.evaluation_features(get_method(config.method), method, clip, data, "test", options)
    metrics, eval_s = stages.score(method, test, data.classnames, options)
    timing = {"feature_s": options.seconds, "train_s": fit.seconds, "eval_s": eval_s}
    payload = result_payload(config, metrics, eval_dataset=data.name, subset=config.subset, timing=timing,
                             backbone=clip.config.name)
    payload["precision"] = options.precision
    payload["fit"] = {"kind": fit.kind, **fit.summary}
    _record_skipped(payload, options.skipped)
    if run_dir is not None:
        run_dir.write_result("results", payload)
    logger.info("%s test accuracy %.2f%% (%d images)", data.name, metrics["accuracy"], metrics["num_samples"])
    return payload


def _extra_results(method: Any, spec: MethodSpec, clip: CLIP, eval_spec: EvalSpec, target: DatasetSplits,
                   config: RunConfig, options: stages.FeatureOptions, run_dir: RunDir | None) -> None:
    """One EvalSpec: the method moved to the target's classes, its test metrics written as eval-<name>.json."""
    options.seconds = 0.0
    options.skipped = []
    try:
        adapted = stages.adapt_method(method, spec, config.method_config, target,
                                      same_dataset=same_dataset(eval_spec.dataset, config.dataset), seed=config.seed)
        features = stages.evaluation_features(spec, adapted, clip, target, "test", options)
        metrics, seconds = stages.score(adapted, features, target.classnames, options)
    except VlpromptError as exc:
        where = run_dir.path if run_dir is not None else "the run folder"
        raise RunError(f"evaluation on {eval_spec.dataset} ({eval_spec.subset} classes) failed: {exc}. The run "
                       f"itself finished (results.json); evaluate again with `vlprompt eval {where} --dataset "
                       f"{eval_spec.dataset} --subset {eval_spec.subset}`") from exc
    payload = result_payload(config, metrics, eval_dataset=target.name, subset=eval_spec.subset,
                             timing={"feature_s": options.seconds, "eval_s": seconds}, backbone=clip.config.name)
    payload["precision"] = options.precision
    if eval_spec.protocol is not None:
        payload["protocol"] = eval_spec.protocol
    _record_skipped(payload, options.skipped)
    if run_dir is not None:
        run_dir.write_result(eval_spec.filename, payload)
    logger.info("%s (%s classes) test accuracy %.2f%%", target.name, eval_spec.subset, metrics["accuracy"])


SKIPPED_LISTED = 50  # unreadable images named in a result file (all are counted)


def _record_skipped(payload: dict[str, Any], skipped: list[str]) -> None:
    """Record the unreadable images left out (``--skip-bad-images``) in a result payload: count and first paths."""
    if skipped:
        payload["skipped_images"] = {"count": len(skipped), "paths": skipped[:SKIPPED_LISTED]}
        logger.warning("%d unreadable image(s) were left out of this run (listed in its results)", len(skipped))


def _on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result on every rank (a single process just computes it).

    A user error on rank 0 is re-raised there and raised as a RunError with the same message on the other ranks, so no
    rank waits forever for a broadcast that never comes.
    """
    if dist.world_size() == 1:
        return compute()
    error: VlpromptError | None = None
    value: Any = None
    if dist.is_main_process():
        try:
            value = compute()
        except VlpromptError as exc:
            error = exc
    # the run folder object itself stays on rank 0: other ranks get None in its place
    shared = dist.broadcast_object(("error", str(error)) if error is not None else
                                   ("ok", None if _is_run_dir(value) else value))
    if error is not None:
        raise error
    if shared[0] == "error":
        raise RunError(f"rank 0 stopped: {shared[1]}")
    return value if dist.is_main_process() else shared[1]


def _is_run_dir(value: Any) -> bool:
    return isinstance(value, RunDir)


# ------------------------------------------------------------------------------------------------------ evaluate_run


@dataclass
class TrainedRun:
    """A run folder's configuration with its learned method loaded on a backbone."""

    path: Path
    config: RunConfig
    method: Any
    clip: CLIP
    device: torch.device


def open_trained_run(run_dir: str | os.PathLike[str], *, model: str | None = None, clip: CLIP | None = None,
                     device: str | torch.device | None = None) -> TrainedRun:
    """Load a run folder's learned method (``prompt.safetensors``) on its backbone.

    The backbone is ``clip``, else ``model`` (a name or checkpoint path overriding the recorded one), else the
    ``model`` recorded in ``config.json``; a backbone whose fingerprint differs from the prompt's is refused
    (CheckpointError naming both). ``device`` defaults to the run's ``train.device``.
    """
    folder = Path(run_dir)
    config = read_run_config(folder)
    prompt = folder / PROMPT_FILE
    if not prompt.is_file():
        if (folder / STATE_FILE).is_file():
            raise RunError(f"{folder} has not finished training (it holds a checkpoint but no {PROMPT_FILE}); "
                           f"finish it with `vlprompt train ... --out {folder} --resume` (same options)")
        raise RunError(f"{folder} holds no learned prompt ({PROMPT_FILE}) yet: train it first, or resume it with "
                       "the same options and --resume")
    header = read_prompt_header(prompt)
    legacy = header.run is None and header.method == config.method  # written before prompts recorded their run
    if header.run != config.config_hash() and not legacy:
        first = ", ".join(header.classnames[:3]) + (", ..." if len(header.classnames) > 3 else "")
        raise RunError(f"{prompt} was not written by the run in {folder} (it holds a {header.method} prompt for "
                       f"{len(header.classnames)} classes: {first}; the run is {config.method} on {config.dataset}): "
                       "it was copied in from elsewhere. Copy whole run folders, not single files, or train this run "
                       "again with --overwrite")
    if clip is None:
        target = stages.resolve_device(device if device is not None else config.train.device)
        source = model or config.model
        try:
            clip = stages.load_backbone(source, target)
        except CheckpointError as exc:
            if model is not None:
                raise
            raise CheckpointError(f"the run's backbone {source!r} cannot be loaded ({exc}); pass --model with the "
                                  "checkpoint it was trained on") from None
    method = load_prompt(prompt, clip)
    return TrainedRun(folder, config, method, clip, clip.device)


def run_predictor(run_dir: str | os.PathLike[str], *, model: str | None = None, clip: CLIP | None = None,
                  device: str | torch.device | None = None, precision: str | None = None, **kwargs: Any) -> Any:
    """A :class:`~vlprompt.prediction.predictor.Predictor` of a run folder's learned method, on its recorded backbone
    (or ``model`` / ``clip``; a backbone with another fingerprint is refused); ``precision`` defaults to the run's
    (``train.precision``, as :func:`evaluate_run`; ``auto`` is resolved on this machine); ``kwargs`` go to the
    Predictor."""
    with reading_lock(run_dir):
        trained = open_trained_run(run_dir, model=model, clip=clip, device=device)
    return Predictor(trained.method, precision=precision or trained.config.train.precision, **kwargs)


def merge_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False,
              model: str | None = None, device: str | torch.device | None = None) -> Path:
    """Fold a clip_lora run folder's low-rank updates into its backbone (or ``model``) and write a plain CLIP
    checkpoint (:func:`vlprompt.methods.clip_lora.save_merged_clip`); returns the path."""
    from vlprompt.methods.clip_lora import save_merged_clip

    with reading_lock(run_dir):
        trained = open_trained_run(run_dir, model=model, device=device)
    if trained.config.method != "clip_lora":
        raise ConfigError(f"merge folds CLIP-LoRA's low-rank updates into the backbone; the run {str(run_dir)!r} "
                          f"({trained.config.method}) is not a clip_lora method (prompt learners keep their prompts "
                          "beside the backbone)")
    return save_merged_clip(trained.method, out, overwrite=overwrite)


def evaluate_run(run_dir: str | os.PathLike[str], *, dataset: str | None = None, subset: str = "all",
                 root: str | os.PathLike[str] | None = None, name: str | None = None, model: str | None = None,
                 clip: CLIP | None = None, device: str | torch.device | None = None, precision: str | None = None,
                 feature_cache: Any = None, progress: bool | None = None,
                 protocol: str | None = None) -> dict[str, Any]:
    """Evaluate a trained run on the test split of ``dataset`` (default: its own) restricted to ``subset`` and write
    ``eval-<name>.json`` in the run folder; returns the payload.

    ``root`` defaults to the run's data root. The run's own dataset and subset are refused (that is
    ``results.json``). Cross-dataset evaluation moves the learned context to the target's classes (CSC CoOp and the
    linear probe cannot: ConfigError); zero-shot methods use the target's own template. ``precision`` defaults to
    the run's. See the module docstring for locking.
    """
    if subset not in SUBSETS:
        raise ConfigError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if name is not None:
        check_eval_name(name)
    folder = Path(run_dir)
    with reading_lock(folder):
        config = read_run_config(folder)
        wanted = dataset or config.dataset
        same = same_dataset(wanted, config.dataset)
        if same and subset == config.subset:
            raise ConfigError(f"{wanted} ({subset} classes) is the run's own test set: its metrics are in "
                              f"{folder / RESULTS_FILE}; give another --dataset or --subset")
        target = load_dataset(wanted, root if root is not None else (config.root or None))
        target = cap_test_split(subsample_classes(target, subset), config.max_test_images)  # type: ignore[arg-type]
        stages.require_images(target, "test")
        trained = open_trained_run(folder, model=model, clip=clip, device=device)
        spec = get_method(config.method)
        method = stages.adapt_method(trained.method, spec, config.method_config, target, same_dataset=same,
                                     seed=config.seed)
        options = stages.FeatureOptions(device=trained.device, precision=precision or config.train.precision,
                                        num_workers=config.train.num_workers,
                                        cache=stages.open_feature_cache(feature_cache), progress=progress,
                                        on_error="skip" if config.skip_bad_images else "raise")
        features = stages.evaluation_features(spec, method, trained.clip, target, "test", options)
        metrics, eval_s = stages.score(method, features, target.classnames, options)
        payload = result_payload(config, metrics, eval_dataset=target.name, subset=subset,
                                 timing={"feature_s": options.seconds, "eval_s": eval_s},
                                 backbone=trained.clip.config.name)
        payload["precision"] = options.precision
        if protocol is not None:  # labelled for another protocol than the run's (see EvalSpec.protocol)
            payload["protocol"] = protocol
        _record_skipped(payload, options.skipped)
        out = write_result(folder, eval_file(name or eval_name(target.name, subset)), payload)
    logger.info("%s: %s (%s classes) accuracy %.2f%% -> %s", folder, target.name, subset, metrics["accuracy"], out)
    return payload


__all__ = [
    "EvalSpec",
    "TrainedRun",
    "evaluate_run",
    "open_trained_run",
    "resolve_run_config",
    "run_predictor",
    "run_experiment",
]
