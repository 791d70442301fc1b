"""The Python API: the whole workflow in a few documented functions.

    import vlprompt.api as vp

    clip = vp.load_clip("ViT-B/16")                          # a name, a checkpoint file or a Hugging Face folder
    data = vp.load_dataset("folder:~/my_photos")             # one sub-folder of images per class (split created)
    coop = vp.build_method("coop", clip, data, n_ctx=4)      # options: the fields of the method's config
    vp.fit(coop, data, shots=16, seed=1, epochs=50)          # training options: the fields of TrainConfig
    print(vp.evaluate(coop, data)["accuracy"])               # test split, percent
    predictor = vp.Predictor(coop)
    for p in predictor.predict(["new.jpg", "more_photos/"], top_k=3):
        print(p.source, p.labels, p.probs)
    vp.save_prompt(coop, "coop.safetensors")
    coop = vp.load_prompt("coop.safetensors", clip)          # refuses a backbone with other weights
    lora = vp.build_method("clip_lora", clip, data)          # low-rank q/k/v updates of both towers
    vp.fit(lora, data, shots=4)                              # 500 x 4 AdamW steps, images through the towers
    vp.merge(lora, "merged.safetensors")                     # a plain CLIP checkpoint: vp.load_clip reads it

Methods: "coop", "cocoop" (trained by SGD), "linear_probe" (closed form), "zeroshot", "ensemble" (nothing to fit),
"tpt" (nothing to fit: :func:`evaluate` and the Predictor tune its prompt on each test image), ... (``METHODS``).
For experiments with run folders, checkpoints, resume and result files use :func:`run_experiment` /
:func:`evaluate_run` (what ``vlprompt train`` / ``vlprompt eval`` run).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from vlprompt.common.vocab import DEFAULT_TEMPLATE
from vlprompt.backbone.loaders import load_clip
from vlprompt.backbone.model import CLIP
from vlprompt.harness.config import RunConfig
from vlprompt.training.config import TrainConfig, resolve_train_config
from vlprompt.data import DatasetSplits, load_dataset
from vlprompt.errors import ConfigError
from vlprompt.methods import METHODS, RecipeContext, get_method, method_config
from vlprompt.methods.prompt_file import load_prompt, save_prompt
from vlprompt.harness.pipeline import EvalSpec, evaluate_run, run_experiment
from vlprompt.methods.base import check_classnames
from vlprompt.prediction.predictor import Prediction, Predictor
from vlprompt.stages import (
    FeatureOptions,
    build_method_for,
    evaluation_features,
    fit_method,
    open_feature_cache,
    require_images,
    score,
    training_sets,
    training_splits,
)
from vlprompt.training.loop import EpochStats

__all__ = [
    "METHODS",
    "EvalSpec",
    "FitResult",
    "Prediction",
    "Predictor",
    "RunConfig",
    "TrainConfig",
    "build_method",
    "evaluate",
    "evaluate_run",
    "fit",
    "load_clip",
    "load_dataset",
    "load_prompt",
    "merge",
    "run_experiment",
    "save_prompt",
]



@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did.

    ``kind``: the method's ``Training`` value ("features", "closed_form", "none" = nothing fitted, ...). ``num_train``: training images used. ``history``:
    one :class:`~vlprompt.training.loop.EpochStats` per SGD epoch (loss, accuracy, lr). ``info``: the closed-form fit's
    record (the linear probe's chosen C, validation accuracy, search). Times in seconds.
    """

    kind: str
    num_train: int = 0
    train_s: float = 0.0
    feature_s: float = 0.0
    history: list[EpochStats] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def build_method(name: str, clip: CLIP, classes: DatasetSplits | Sequence[str], *, seed: int = 1,
                 protocol: str | None = None, **options: Any) -> Any:
    """A method on ``clip`` for the classes of ``classes`` (a dataset from :func:`load_dataset`, or class names).

    ``options`` are fields of the method's config (``METHODS[name].config_cls``), e.g. ``n_ctx=4``,
    ``ctx_init="a photo of a"``, ``csc=True`` for CoOp; unknown names raise ConfigError. A dataset also supplies
    its hand-crafted template (zero-shot, ensemble); with plain names the template is ``"a photo of a {}."``. The
    random initialisation (CoOp's context) is drawn from ``seed`` without touching torch's global RNG state.
    ``protocol`` ("fewshot", "base2novel", "crossdataset", "domainshift"; None = few-shot) selects the official
    recipe of the options left unset (MaPLe's / PromptSRC's prompt depth, PromptSRC's aggregation); give
    :func:`fit` the same ``protocol``.
    """
    spec = get_method(name)
    if isinstance(classes, DatasetSplits):
        classnames, dataset, template = list(classes.classnames), classes.name, classes.template
    else:
        classnames, dataset, template = check_classnames(classes), None, DEFAULT_TEMPLATE
    config = method_config(spec, options, RecipeContext(dataset=dataset, protocol=protocol))
    return build_method_for(spec, clip, classnames, config, dataset=dataset, template=template, seed=seed)


def fit(method: Any, data: DatasetSplits, *, shots: int = 16, seed: int = 1, train: TrainConfig | None = None,
        protocol: str | None = None, feature_cache: Any = None, progress: bool | None = None,
        on_epoch_end: Callable[[EpochStats], None] | None = None, **train_options: Any) -> FitResult:
    """Fit ``method`` on ``shots`` training images per class of ``data`` (0 = all), sampled with ``seed``.

    CoOp / CoCoOp are trained by SGD with the papers' recipe (``train_options`` are TrainConfig fields: ``epochs``,
    ``lr``, ``batch_size``, ``views``, ``precision``, ``device`` ...; or pass a whole ``train``); the linear probe is
    fitted in closed form (C searched on the few-shot validation split); zero-shot methods and test-time methods
    (TPT, which adapts to each test image in :func:`evaluate`) have nothing to fit.
    Training options left unset take the method's official recipe of ``protocol`` (None = few-shot; e.g.
    PromptSRC: 50 epochs few-shot, 20 in "base2novel" and "crossdataset"), as :func:`build_method`.
    Image features come from the frozen image tower through the feature cache (``feature_cache``: None = the
    default cache, False = none, or a folder). ``data`` must have the method's classes (same names, same order).
    ``progress``: progress bars (None: when stderr is a terminal); ``on_epoch_end(stats)`` after each SGD epoch.
    """
    spec = _spec_of(method)
    _require_same_classes(method, data)
    if train is not None and train_options:
        raise ConfigError("give either train=TrainConfig(...) or training options as keywords, not both")
    try:
        config = train if train is not None else TrainConfig(**train_options)
    except TypeError as exc:
        raise ConfigError(f"unknown training option: {exc}; use the fields of TrainConfig") from None
    config = resolve_train_config(dataclasses.replace(config, seed=seed), method=spec.name, shots=shots,
                                  dataset=data.name, protocol=protocol)
    if not spec.training.uses_training_images:
        return FitResult(spec.training.value)
    sample = training_splits(data, shots=shots, seed=seed, subset="all")
    require_images(sample, "train")
    options = FeatureOptions(device=method.clip.device, precision=config.precision, num_workers=config.num_workers,
                             cache=open_feature_cache(feature_cache), progress=progress)
    train_set, val_set = training_sets(spec, method.clip, sample, config, options)
    outcome = fit_method(method, spec, train_set, val_set, train=config, device=None, on_epoch_end=on_epoch_end,
                         progress=progress)
    info = {k: v for k, v in outcome.summary.items() if k != "num_train"} if not spec.training.uses_sgd else {}
    return FitResult(outcome.kind, len(train_set), outcome.seconds, options.seconds, outcome.history, info)


def evaluate(method: Any, data: DatasetSplits, *, split: str = "test", precision: str = "auto",
             feature_cache: Any = None, progress: bool | None = None) -> dict[str, Any]:
    """Metrics of ``method`` on ``split`` of ``data``: accuracy and macro F1 in percent, per-class accuracy,
    confusion matrix, number of images (see :func:`vlprompt.evaluation.metrics.evaluate`).

    ``data`` must have the method's classes; for another dataset (cross-dataset transfer) evaluate
    ``method.with_classnames(other.classnames)``, and for the novel classes of base-to-novel pass
    ``vlprompt.data.subsample_classes(data, "new")``. ``precision``: "auto" (bf16 where this machine's cached probe
    finds it faster, CUDA: where supported), "fp32" (exact), "bf16" or "fp16".
    """
    spec = _spec_of(method)
    _require_same_classes(method, data)
    require_images(data, split)
    options = FeatureOptions(device=method.clip.device, precision=precision, cache=open_feature_cache(feature_cache),
                             progress=progress)
    features = evaluation_features(spec, method, method.clip, data, split, options)
    metrics, _ = score(method, features, list(data.classnames), options)
    return metrics


def _spec_of(method: Any) -> Any:
    name = getattr(method, "method_name", None)
    if name not in METHODS or not hasattr(method, "clip"):
        raise ConfigError(f"expected a method from build_method() or load_prompt(), got {type(method).__name__}")
    return METHODS[name]


def _require_same_classes(method: Any, data: DatasetSplits) -> None:
    if not isinstance(data, DatasetSplits):
        raise ConfigError(f"expected a dataset from load_dataset(), got {type(data).__name__}")
    if list(method.classnames) != list(data.classnames):
        raise ConfigError(f"the method classifies {len(method.classnames)} classes ({', '.join(method.classnames[:3])}"
                          f"{', ...' if len(method.classnames) > 3 else ''}) but {data.name} has "
                          f"{len(data.classnames)} other ones; use method.with_classnames(data.classnames) for "
                          "cross-dataset transfer, or build the method for this dataset")


def merge(source: Any, out: str | os.PathLike[str], *, overwrite: bool = False, model: str | None = None,
          device: str | None = None) -> Path:
    """Fold a CLIP-LoRA method's low-rank updates into its backbone and write a plain CLIP checkpoint to ``out``
    (``*.safetensors``, OpenAI names: :func:`load_clip` reads it; a GELU backbone needs ``quick_gelu=False`` there,
    as its source did); returns the path.

    ``source``: a CLIP-LoRA method (from :func:`build_method` / :func:`load_prompt`) or a clip_lora run folder (its
    prompt on its recorded backbone, or ``model``). The file is written atomically; an existing ``out`` is replaced
    only with ``overwrite`` and only if an earlier merge wrote it (else OutputError, nothing changed).
    """
    if isinstance(source, str | os.PathLike):
        from vlprompt.harness.pipeline import merge_run

        return merge_run(source, out, overwrite=overwrite, model=model, device=device)
    from vlprompt.methods.clip_lora import save_merged_clip

    return save_merged_clip(source, out, overwrite=overwrite)
