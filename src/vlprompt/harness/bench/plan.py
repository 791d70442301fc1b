"""What a protocol is made of: planned runs in a predictable folder tree, and what each one must produce.

A protocol (see :mod:`vlprompt.harness.bench.protocols`) is a tuple of :class:`PlannedRun`: one run folder, the
:class:`~vlprompt.training.config.RunConfig` trained there, and the extra evaluations it owes (each one an
``eval-<name>.json`` beside the run's own ``results.json``). Runs are independent: any order, any process.

Folder tree (``OUT`` is ``--out``; ``-budget`` is appended to the first level for smoke tests, so smoke-test runs
never share a folder with full ones)::

    OUT/<tree>/<model-tag>/<dataset>/<method>/shots<K>/seed<S>/   trained and closed-form methods
    OUT/<tree>/<model-tag>/<dataset>/<method>/                     zero-shot and prompt ensembling (nothing to learn)

``<dataset>`` is a built-in dataset's registry key, or ``custom_<name>`` for a custom dataset (``folder:PATH``, ...,
named after its folder or list file). ``<tree>`` is the protocol's name, except for the ImageNet-trained runs that
cross-dataset transfer and domain generalisation share (``transfer``), so the source models are trained once and evaluated by both.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlprompt.common.vocab import slug
from vlprompt.harness.config import RunConfig
from vlprompt.harness.rundir import RESULTS_FILE, EvalSpec

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class PlannedRun:
    """One independent run of a protocol: its folder, its configuration and the evaluations it owes.

    ``key`` is the run folder relative to the output folder (POSIX form): the run's name in every message, in
    claims and in error records.
    """

    key: str
    run_dir: Path
    config: RunConfig
    evals: tuple[EvalSpec, ...] = ()

    @property
    def result_files(self) -> tuple[str, ...]:
        """Every file whose presence makes the run finished: ``results.json`` and each ``eval-<name>.json``."""
        return (RESULTS_FILE, *(e.filename for e in self.evals))

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


def make_run(out: Path, key: str, config: RunConfig, evals: tuple[EvalSpec, ...] = ()) -> PlannedRun:
    """A :class:`PlannedRun` whose folder is ``out / key``."""
    return PlannedRun(key=key, run_dir=Path(out).joinpath(*key.split("/")), config=config, evals=evals)
