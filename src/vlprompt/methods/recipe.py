"""Which official recipe a run trains with: :class:`RecipeContext` (shots, dataset, class subset, protocol).

The papers' official scripts train the same method differently in different settings (PromptSRC: 50 epochs and other
aggregation weights in few-shot, prompt depth 3 in cross-dataset transfer; MaPLe: depth 3, 2 epochs, lr 0.0026 in
cross-dataset transfer; KgCoOp / ProGrad: other schedules in base-to-novel). A method's recipe is a function of this
context in one place, its section of :mod:`vlprompt.methods.configs`: ``train_defaults(context)`` (the training
options its MethodSpec names) and, where config fields depend on the setting, ``config.for_recipe(context)`` filling
the fields left at None. :func:`vlprompt.methods.method_config` applies the latter; explicit values always win.

The setting is the protocol's recipe (:data:`~vlprompt.common.vocab.PROTOCOL_RECIPES`: ``domainshift`` trains as
``crossdataset``); without one of those protocols (none, or another label a run's results carry) it is
``base2novel`` when training on a class subset, else ``fewshot``.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlprompt.common.vocab import PROTOCOL_RECIPES, SUBSETS, Recipe
from vlprompt.errors import ConfigError


@dataclass(frozen=True)
class RecipeContext:
    """What selects a method's official recipe: ``shots`` per class (None: unknown, 0: all images), the training
    ``dataset`` (a registry name or custom spec; None: unknown), the class ``subset`` trained on, and the
    ``protocol`` (a :data:`~vlprompt.common.vocab.PROTOCOL_RECIPES` name; None or another label: inferred, see
    :attr:`recipe`)."""

    shots: int | None = None
    dataset: str | None = None
    subset: str = "all"
    protocol: str | None = None

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise ConfigError(f"subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")

    @property
    def recipe(self) -> Recipe:
        """The setting whose recipe applies: the protocol's; without one of the protocols ``base2novel`` for a class
        subset (base or new), else ``fewshot``."""
        if self.protocol in PROTOCOL_RECIPES:
            return PROTOCOL_RECIPES[self.protocol]  # type: ignore[index,return-value]
        return "base2novel" if self.subset != "all" else "fewshot"
