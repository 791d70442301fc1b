"""What a protocol is made of: planned runs in a predictable folder tree, and what each one must produce.

A protocol (see :mod:`vlprompt.harness.bench.protocols`) is a tuple of :class:`PlannedRun`: one run folder, the
:class:`~vlprompt.training.config.RunConfig` trained there, and the extra evaluations it owes (each one an
``eval-<name>.json`` beside the run's own ``results.json``). Runs are independent: any order, any process.

Folder tree (``OUT`` is ``--out``; ``-budget`` is appended to the first level for smoke tests, so smoke-test runs
never share a folder with full ones)::

    OUT/<tree>/<model-tag>/<dataset>/<method>/shots<K>/seed<S>/   trained and closed-form methods
    OUT/<tree>/<model-tag>/<dataset>/<method>/                     zero-shot and prompt ensembling (nothing to learn)

``<tree>`` is the protocol's name, except for the ImageNet-trained runs that cross-dataset transfer and domain
generalisation share (``transfer``), so the source models are trained once and evaluated by both.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlprompt.training.config import RunConfig

RESULTS_NAME = "results.json"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class PlannedEval:
    """One evaluation a run owes besides its own test split: ``eval-<name>.json`` in the run folder.

    ``protocol`` is the protocol the evaluation belongs to (the report groups results by it); None means the run's.
    """

    dataset: str
    subset: str = "all"
    name: str = ""
    protocol: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", eval_name(self.dataset, self.subset))

    @property
    def filename(self) -> str:
        """``eval-<name>.json``."""
        return f"eval-{self.name}.json"


@dataclass(frozen=True)
class PlannedRun:
    """One independent run of a protocol: its folder, its configuration and the evaluations it owes.

    ``key`` is the run folder relative to the output folder (POSIX form): the run's name in every message, in
    claims and in error records.
    """

    key: str
    run_dir: Path
    config: RunConfig
    evals: tuple[PlannedEval, ...] = ()

    @property
    def result_files(self) -> tuple[str, ...]:
        """Every file whose presence makes the run finished: ``results.json`` and each ``eval-<name>.json``."""
        return (RESULTS_NAME, *(e.filename for e in self.evals))

    def describe(self) -> str:
        """One line: method, dataset, shots, seed, subset and evaluations."""
        config = self.config
        parts = [config.method, config.dataset]
        if config.shots:
            parts += [f"{config.shots}-shot", f"seed {config.seed}"]
        if config.subset != "all":
            parts.append(f"{config.subset} classes")
        if self.evals:
            parts.append("+ " + ", ".join(e.name for e in self.evals))
        return ", ".join(parts)


def eval_name(dataset: str, subset: str = "all") -> str:
    """The evaluation file stem: the dataset, with ``-<subset>`` for base / new classes (``dtd-new``)."""
    return dataset if subset == "all" else f"{dataset}-{subset}"


def slug(text: str) -> str:
    """A lower-case folder-name-safe form: ``"ViT-B/16"`` -> ``"vit-b-16"``."""
    value = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return value or "x"


def model_tag(model: str) -> str:
    """The folder name of a backbone: its slug, or the file's stem slug for a checkpoint path (``.../RN50.pt`` -> rn50).

    ``"ViT-B/16"`` -> ``vit-b-16``; ``hf:openai/clip-vit-base-patch16`` -> ``hf-openai-clip-vit-base-patch16``.
    """
    text = model.strip().replace("\\", "/")
    if text.lower().endswith(_WEIGHT_SUFFIXES) or text.startswith(("/", "./", "../", "~")):
        text = PurePosixPath(text.rstrip("/")).name
        for suffix in _WEIGHT_SUFFIXES:
            if text.lower().endswith(suffix):
                text = text[: -len(suffix)]
                break
    return slug(text)


def tree_name(name: str, budget: bool) -> str:
    """The first folder level: ``name``, or ``name-budget`` for smoke-test runs."""
    return f"{name}-budget" if budget else name


def run_key(tree: str, model: str, dataset: str, method: str, shots: int | None = None,
            seed: int | None = None) -> str:
    """The run folder relative to the output folder (see the module docstring)."""
    parts = [tree, model_tag(model), slug(dataset).replace("-", "_"), method]
    if shots is not None and seed is not None:
        parts += [f"shots{shots}", f"seed{seed}"]
    return "/".join(parts)


def make_run(out: Path, key: str, config: RunConfig, evals: tuple[PlannedEval, ...] = ()) -> PlannedRun:
    """A :class:`PlannedRun` whose folder is ``out / key``."""
    return PlannedRun(key=key, run_dir=Path(out).joinpath(*key.split("/")), config=config, evals=evals)
